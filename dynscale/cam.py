"""Class activation maps (CAM) of an incomplete network at a static DP.

TESLA (paper 000) §4.2, Figs. 5-6, visualises "what the model sees at
different DP percentages" with the CAM of Zhou et al. (2016, "Learning Deep
Features for Discriminative Localization"): a network whose last conv block
is followed by global average pooling (GAP) and one linear classifier. With
``F_i(x, y)`` the i-th channel of the last feature map and ``W_ic`` the
classifier weight of channel i for class c, Zhou et al. Eq. 1 is
``CAM_c(x, y) = sum_i W_ic F_i(x, y)``, and the class score is the spatial
mean of the CAM plus the bias.

Under IDP the classifier is an incomplete dot product (paper 001 §II-C): at DP
``p`` it uses only the first ``k = num_kept(C, p)`` channels, each scaled by
its profile coefficient ``gamma_i``, so Eq. 1 becomes

    CAM_c(x, y) = sum_{i < k} gamma_i W_ic F_i(x, y),
    logit_c     = mean_{x, y} CAM_c(x, y) + b_c,

and the map is computed by the SLICED network (only the k channels that the
classifier reads are ever computed, DESIGN invariant 2). Channels dropped at
this DP contribute nothing, by construction.

The architecture is the zoo's ``vgg16_gap``: VGG-16's 13 conv layers
with the last two max-pools removed, so a 32x32 image keeps a 4x4 final map
(input / 8) instead of 1x1. TESLA's text says it "replace[s] the max-pooling
layers with average-pooling layers"; the architecture spec has no
average-pool layer, so the remaining pools stay max-pools and only the head
(GAP, then one linear classifier) follows the CAM design.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from matplotlib.figure import Figure

from dynscale import idp, plots
from dynscale.data.pipeline import normalize
from dynscale.nn import sliced, spec

Array = jax.Array

# The grid is CELL_INCHES per row and per column at DPI dots per inch; the
# margins below (inches) hold the column headers and the per-cell titles.
CELL_INCHES = 1.6
DPI = 100
_TOP_INCHES, _ROW_GAP_INCHES, _EDGE_INCHES = 0.45, 0.25, 0.05
_OVERLAY_ALPHA = 0.5
_COLORMAP = "jet"


# --------------------------------------------------------------------------
# Class activation maps
# --------------------------------------------------------------------------


def classifier_index(arch: dict) -> int:
  """Index of the classifier; raises unless the network ends in a CAM head."""
  layers = arch["layers"]
  head = layers[-1]
  if (len(layers) < 3 or layers[-2]["kind"] != "global_avgpool" or head["kind"] != "dense"
      or head["bn"] or head["act"] is not None):
    kinds = [layer["kind"] for layer in layers[-3:]]
    raise ValueError("arch must end in a map, 'global_avgpool' and one 'dense' classifier "
                     f"with bn=false and act=null (the CAM head), its last layers are {kinds}")
  return len(layers) - 1


def cam_classifier(arch: dict, variables: Mapping, dp: float) -> tuple[Array, Array]:
  """The classifier at DP ``dp`` with the profile folded in: ``(gamma_i W_ic, b_c)``.

  Returns weights ``(k, num_classes)`` for the ``k = num_kept(C, dp)`` kept
  channels of an IDP classifier (all C otherwise; sign(W) for a binary one)
  and the bias ``(num_classes,)``. MP-IDP networks use the profile chosen
  for ``dp``.
  """
  arch = spec.validate_architecture(arch)
  dp = idp.check_dp(dp)
  d = classifier_index(arch)
  s = spec.select_profile(arch, dp, None)
  compact = sliced.slice_variables(arch, variables, dp)
  v = compact["layers"][d] if s is None else compact["layers"][d][s]
  w = idp.binarize(v["kernel"]) if arch["layers"][d]["binary"] else v["kernel"]
  gamma = v["gamma"] if "gamma" in v else jnp.ones((w.shape[0],), w.dtype)
  return gamma[:, None] * w, v["bias"]


def class_maps(arch: dict, variables: Mapping, images: Array, dp: float
               ) -> tuple[Array, Array]:
  """Un-upsampled CAMs of every class at DP ``dp``, and the classifier bias.

  ``maps[b, x, y, c] = sum_{i<k} gamma_i W_ic F_i(x, y)`` (Zhou et al. Eq. 1
  on the incomplete dot product), with ``F`` the last feature map of the
  sliced network (the input of the GAP layer, only the kept channels).

  Args:
    arch: an architecture ending in a CAM head (map -> global_avgpool ->
      dense without batch norm or activation), e.g.
      the zoo's ``vgg16_gap`` or ``mobilenet``.
    variables: the model's pure variable dict (``model.pure_variables()``).
    images: ``(B, *input_shape)`` network inputs (already normalised).
    dp: static DP in (0, 1].

  Returns:
    ``maps`` ``(B, h, w, num_classes)`` float32 (``h x w``: the final map,
    4x4 for the GAP VGG-16 at 32x32) and ``bias`` ``(num_classes,)``, such
    that ``maps.mean((1, 2)) + bias`` are the logits of
    :func:`dynscale.nn.sliced.apply_sliced` at ``dp``.
  """
  arch = spec.validate_architecture(arch)
  dp = idp.check_dp(dp)
  d = classifier_index(arch)
  spec.check_input(arch, images)
  weights, bias = cam_classifier(arch, variables, dp)
  features = sliced.features_sliced(arch, variables, images, dp, d - 1)
  maps = jnp.einsum("bxyk,kc->bxyc", features, weights.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)
  return maps, bias.astype(jnp.float32)


def _check_classes(classes, batch: int, num_classes: int) -> np.ndarray | None:
  """None, or ``(batch,)`` class indices from an int or a sequence of them."""
  if classes is None:
    return None
  values = np.asarray(classes)
  if values.ndim == 0:
    values = np.full((batch,), values)
  if (values.shape != (batch,) or not np.issubdtype(values.dtype, np.integer)
      or values.min() < 0 or values.max() >= num_classes):
    raise ValueError(f"classes must be None, an int or {batch} ints in [0, {num_classes}), "
                     f"got {classes!r}")
  return values


def class_activation_maps(arch: dict, variables: Mapping, images: Array, dp: float, *,
                          classes: int | Sequence[int] | None = None
                          ) -> tuple[Array, Array]:
  """Per-image CAM of one class at DP ``dp``, upsampled to the input size.

  Args:
    arch, variables, images, dp: as in :func:`class_maps`.
    classes: the class of each image's map: None (the predicted class at
      this dp), one int for all images, or ``(B,)`` ints.

  Returns:
    ``cams`` ``(B, H, W)`` float32: ``CAM_c`` of :func:`class_maps` for the
    chosen class, resized bilinearly (``jax.image.resize``) from ``h x w``
    to the ``H x W`` input; and ``logits`` ``(B, num_classes)`` float32,
    the spatial mean of the un-upsampled maps plus the bias (the network's
    logits at ``dp``).
  """
  arch = spec.validate_architecture(arch)
  dp = idp.check_dp(dp)
  spec.check_input(arch, images)
  chosen = _check_classes(classes, images.shape[0], arch["num_classes"])
  maps, bias = class_maps(arch, variables, images, dp)
  logits = maps.mean(axis=(1, 2)) + bias
  index = jnp.argmax(logits, axis=-1) if chosen is None else jnp.asarray(chosen)
  selected = jnp.take_along_axis(maps, index[:, None, None, None], axis=-1)[..., 0]
  height, width = arch["input_shape"][:2]
  cams = jax.image.resize(selected, (selected.shape[0], height, width), method="bilinear")
  return cams, logits


# --------------------------------------------------------------------------
# Figure
# --------------------------------------------------------------------------


def _unit_range(cam: np.ndarray) -> np.ndarray:
  """Min-max scaling of one map to [0, 1] (zeros for a constant map), as Zhou et al."""
  low, span = cam.min(), np.ptp(cam)
  return (cam - low) / span if span > 0 else np.zeros_like(cam)


def _check_grid_inputs(images: np.ndarray, cams_by_dp: Mapping, path: str,
                       predictions_by_dp: Mapping | None, labels, class_names
                       ) -> tuple[list[float], dict[float, np.ndarray]]:
  """Validates :func:`save_cam_grid`'s arguments; returns the DPs ascending and the maps."""
  if (images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3)
      or images.shape[0] < 1):
    raise ValueError(f"images_uint8 must be uint8 (B >= 1, H, W, 1 or 3), got {images.dtype} "
                     f"of shape {images.shape}")
  if not str(path).lower().endswith(".png"):
    raise ValueError(f"path must end in .png, got {path!r}")
  if not cams_by_dp:
    raise ValueError("cams_by_dp must map at least one dp to (B, H, W) maps, got none")
  batch = images.shape[0]
  cams = {}
  for dp, maps in cams_by_dp.items():
    maps = np.asarray(maps, np.float32)
    if maps.shape != images.shape[:3]:
      raise ValueError(f"cams_by_dp[{dp}] must have shape {images.shape[:3]} (the images' "
                       f"B, H, W), got {maps.shape}")
    cams[idp.check_dp(dp, "cams_by_dp key")] = maps
  n_names = None if class_names is None else len(class_names)
  for name, ids in ([("labels", labels)] if labels is not None else []) + [
      (f"predictions_by_dp[{dp}]", p) for dp, p in (predictions_by_dp or {}).items()]:
    ids = np.asarray(ids)
    if (ids.shape != (batch,) or not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0
        or (n_names is not None and ids.max() >= n_names)):
      raise ValueError(f"{name} must be {batch} non-negative ints"
                       + ("" if n_names is None else f" below {n_names} (class_names)")
                       + f", got {ids!r}")
  if predictions_by_dp is not None and {idp.check_dp(d) for d in predictions_by_dp} != set(cams):
    raise ValueError(f"predictions_by_dp must have the same DPs as cams_by_dp {sorted(cams)}, "
                     f"got {sorted(predictions_by_dp)}")
  return sorted(cams), cams


def _class_text(index: int, class_names: Sequence[str] | None) -> str:
  return str(index) if class_names is None else str(class_names[index])


def save_cam_grid(images_uint8: np.ndarray, cams_by_dp: Mapping[float, Array], path: str, *,
                  predictions_by_dp: Mapping[float, Sequence[int]] | None = None,
                  labels: Sequence[int] | None = None,
                  class_names: Sequence[str] | None = None) -> None:
  """Writes a PNG grid of CAMs (000 Figs. 5-6): one row per image, one column per DP.

  The first column is the input image; then one column per DP, ascending,
  titled with the DP in percent, each showing the image with its CAM
  (min-max scaled per map, as Zhou et al.) overlaid in a colormap. With
  ``predictions_by_dp`` each cell is labelled with the predicted class,
  green when it equals ``labels``, red when not (Fig. 5's colouring),
  black without labels. The figure is ``rows * CELL_INCHES`` by
  ``columns * CELL_INCHES`` inches at ``DPI``, written
  atomically with :func:`dynscale.plots.save_png`. No pyplot state
  is touched (a bare :class:`matplotlib.figure.Figure` with the Agg canvas).

  Args:
    images_uint8: ``(B, H, W, C)`` uint8 images, C in {1, 3}.
    cams_by_dp: DP in (0, 1] -> ``(B, H, W)`` maps (e.g. from
      :func:`class_activation_maps`).
    path: the output ``.png`` file (parent folders are created).
    predictions_by_dp: optional DP -> ``(B,)`` predicted class indices.
    labels: optional ``(B,)`` true classes (shown under the input image).
    class_names: optional names indexed by class.
  """
  images = np.asarray(images_uint8)
  dps, cams = _check_grid_inputs(images, cams_by_dp, path, predictions_by_dp, labels,
                                 class_names)
  rows, cols = images.shape[0], len(dps) + 1
  width, height = cols * CELL_INCHES, rows * CELL_INCHES
  fig = Figure(figsize=(width, height), dpi=DPI)
  axes = fig.subplots(rows, cols, squeeze=False)
  axes_height = (height - _TOP_INCHES - _EDGE_INCHES - (rows - 1) * _ROW_GAP_INCHES) / rows
  fig.subplots_adjust(left=_EDGE_INCHES / width, right=1 - _EDGE_INCHES / width,
                      bottom=_EDGE_INCHES / height, top=1 - _TOP_INCHES / height,
                      wspace=0.1, hspace=_ROW_GAP_INCHES / axes_height)
  colormap = matplotlib.colormaps[_COLORMAP]
  predictions = {idp.check_dp(d): np.asarray(p) for d, p in (predictions_by_dp or {}).items()}
  for r in range(rows):
    shown = images[r, ..., 0] if images.shape[-1] == 1 else images[r]
    gray = "gray" if images.shape[-1] == 1 else None
    axes[r, 0].imshow(shown, cmap=gray)
    if labels is not None:
      axes[r, 0].set_title(_class_text(int(labels[r]), class_names), fontsize=8)
    for c, dp in enumerate(dps, start=1):
      axes[r, c].imshow(shown, cmap=gray)
      axes[r, c].imshow(_unit_range(cams[dp][r]), cmap=colormap, alpha=_OVERLAY_ALPHA,
                        vmin=0.0, vmax=1.0)
      if dp in predictions:
        guess = int(predictions[dp][r])
        color = "black" if labels is None else ("green" if guess == int(labels[r]) else "red")
        axes[r, c].set_title(_class_text(guess, class_names), fontsize=8, color=color)
  for c, title in enumerate(["input"] + [f"DP {100 * dp:g}%" for dp in dps]):
    axes[0, c].annotate(title, xy=(0.5, 1.0), xycoords="axes fraction", xytext=(0, 14),
                        textcoords="offset points", ha="center", va="bottom", fontsize=9,
                        fontweight="bold")
  for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
  plots.save_png(fig, path, dpi=DPI)


def cam_figure(arch: dict, variables: Mapping, images_uint8: np.ndarray, dps: Sequence[float],
               path: str, *, normalization: tuple[Sequence[float], Sequence[float]] | None = None,
               labels: Sequence[int] | None = None, class_names: Sequence[str] | None = None,
               bn_stats_by_dp: Mapping[float, Mapping] | None = None) -> dict[float, Array]:
  """TESLA Figs. 5-6: CAMs of the predicted class at each DP, saved as a PNG grid.

  Args:
    arch, variables: a trained network with a CAM head (see :func:`class_maps`).
    images_uint8: ``(B, H, W, C)`` uint8 images of the architecture's input shape.
    dps: the DP levels, each in (0, 1].
    path: the output ``.png`` file.
    normalization: ``(mean, std)`` per channel as the training pipeline used
      (:func:`dynscale.data.pipeline.normalization_stats`); None feeds
      ``images / 255``.
    labels, class_names: as in :func:`save_cam_grid` (green/red titles).
    bn_stats_by_dp: optional DP -> batch-norm statistics (``bn_stats_of``
      layout, e.g. recalibrated) used at that DP instead of the shared ones
      (keys matched within float32 rounding, :func:`dynscale.idp.matching_dp`).

  Returns:
    DP -> logits ``(B, num_classes)`` of the sliced network at that DP.
  """
  arch = spec.validate_architecture(arch)
  dps = [idp.check_dp(dp) for dp in dps]
  if not dps:
    raise ValueError("dps must hold at least one DP in (0, 1], got none")
  images = np.asarray(images_uint8)
  if images.dtype != np.uint8:
    raise ValueError(f"images_uint8 must be uint8, got {images.dtype}")
  spec.check_input(arch, images)
  stats = {idp.check_dp(d, "bn_stats_by_dp key"): s for d, s in (bn_stats_by_dp or {}).items()}
  x = (jnp.asarray(images, jnp.float32) / 255.0 if normalization is None
       else normalize(jnp.asarray(images), *normalization))
  cams, logits = {}, {}
  for dp in dps:
    key = idp.matching_dp(dp, stats)
    at_dp = variables if key is None else sliced.merge_variables(variables, stats[key])
    cams[dp], logits[dp] = class_activation_maps(arch, at_dp, x, dp)
  save_cam_grid(images, cams, path, labels=labels, class_names=class_names,
                predictions_by_dp={dp: np.asarray(jnp.argmax(l, -1)) for dp, l in logits.items()})
  return logits
