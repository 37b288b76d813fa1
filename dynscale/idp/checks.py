"""Config checks of the DP fields, shared by the methods that train IDP networks.

``train.dp`` (the DP IDP trains at) and the ``eval`` block (the DPs the test
report covers, the batch-norm mode and its recalibration batches). They run
with the core checks of :mod:`dynscale.train.validation`, before any data is
read; every error names the config field.
"""

from __future__ import annotations

from dynscale.kernels import idp
from dynscale.nn.batchnorm import BN_MODES
from dynscale.train import validation


def dp(value, field: str) -> float:
  """``value`` as a DP in (0, 1] (:func:`dynscale.kernels.idp.check_dp`); the error names ``field``."""
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ValueError(f"{field} must be a number in (0, 1], got {value!r}")
  return idp.check_dp(value, field)


def dp_list(values, field: str) -> tuple[float, ...]:
  """A non-empty sequence of DPs in (0, 1]; an error names the entry (``field[i]``)."""
  if not values:
    raise ValueError(f"{field} must be a non-empty list of DPs in (0, 1]")
  return tuple(dp(value, f"{field}[{i}]") for i, value in enumerate(values))


def check_eval(config) -> None:
  """The ``eval`` block: ``dps``, ``bn_mode`` and ``recalibration_batches``."""
  dp_list(config.dps, "eval.dps")
  validation.one_of(config.bn_mode, BN_MODES, "eval.bn_mode")
  validation.positive(config.recalibration_batches, "eval.recalibration_batches", integer=True)
