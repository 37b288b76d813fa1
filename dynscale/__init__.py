"""dynscale: dynamic computation scaling and compression of neural networks.

* ``dynscale.idp``: incomplete dot products as pure JAX kernels (masked and sliced).
* ``dynscale.nn``: Flax NNX incomplete layers, the model zoo, whole-network
  slicing, export/load, batch norm at reduced width, per-layer costs.
* ``dynscale.tesla``, ``dynscale.atp``: TESLA's loss aggregation and ATP's
  profile projections.
* ``dynscale.metrics``: FLOPs, parameters, compression and speed-up rates.
* ``dynscale.data``: datasets and the device-resident input pipeline.
* ``dynscale.train``: train state, steps, loop, checkpoints and the
  ``train_and_evaluate(config, workdir)`` of each method.
* ``dynscale.cam``: class activation maps at a DP.
"""

__version__ = "0.1.0"
