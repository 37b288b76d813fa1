"""The timing flags the CompactNet benchmarks share: how every network is timed
(:class:`dynscale.compactnet.simulator.TableSettings`, :mod:`dynscale.timing`)."""

from absl import flags

from dynscale.compactnet import simulator


def define() -> None:
  """``--warmup``, ``--rounds``, ``--burst`` and ``--estimator``, defaulting to
  the tables' settings."""
  defaults = simulator.TableSettings()
  flags.DEFINE_integer("warmup", defaults.warmup, "Untimed runs per network (compilation).")
  flags.DEFINE_integer("rounds", defaults.rounds, "Timed interleaved rounds.")
  flags.DEFINE_integer("burst", defaults.burst,
                       "Back-to-back timed runs of a network in each round (warm cache).")
  flags.DEFINE_string("estimator", defaults.estimator, "Latency estimator: median, min, q10.")


def values() -> dict:
  """The flags' values, as :class:`~dynscale.compactnet.simulator.TableSettings` fields."""
  f = flags.FLAGS
  return {"warmup": f.warmup, "rounds": f.rounds, "burst": f.burst, "estimator": f.estimator}
