"""dynscale: dynamic computation scaling and compression of neural networks.

* ``dynscale.kernels``: pure JAX kernels, no Flax: incomplete dot products
  (masked and sliced).
* ``dynscale.idp``: IDP and MP-IDP (paper 001); re-exports the IDP kernels.
* ``dynscale.nn``: Flax NNX incomplete layers, the model zoo, whole-network
  slicing, export/load, batch norm at reduced width, per-layer costs.
* ``dynscale.tesla``: TESLA, R-TESLA and ATP (paper 000): schedules, the
  multi-task loss, ATP's profile projections and the training.
* ``dynscale.metrics``: FLOPs, parameters, compression and speed-up rates.
* ``dynscale.data``: datasets and the device-resident input pipeline.
* ``dynscale.train``: method-neutral infrastructure: train state, steps,
  loop, checkpoints, writers, early stopping, optimizers, runs, sweeps.
* ``dynscale.cam``: class activation maps at a DP.
"""

__version__ = "0.1.0"
