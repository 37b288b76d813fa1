"""CompactNet (004) at the paper's scale, for a GPU: Tables 3-5 and 7 on CIFAR-10.

MobileNetV2 with Table 1's strides at full width (``mobilenet_v2_imagenet``:
the final map is 1x1 at 32x32, as the authors' code). The paper pretrains on
the 50,000 training images and reports on the other 10,000; here 5,000
training images are held out for validation (candidate choice and early
stopping never read the test split).

* ``pretrain``: the original network (the paper gives no recipe: ours is SGD
  momentum 0.9, lr 0.1 cosine, weight decay 4e-5, batch 96, 200 epochs).
* Table 3's rows, each from the shared pretraining, with Table 4's training:
  short fine-tunes of 30 epochs (RMSProp lr 1e-3, rho 0.9, batch 96) and a
  500-epoch retraining (RMSProp lr 1e-4, rho 0.95):

  - ``gpu-b64-1_5x``: T_init 2.0, N = 24, d = 0.96 (T_final 1.48x);
  - ``gpu-b64-1_8x``: T_init 2.5, N = 30, d = 0.98 (1.83x);
  - ``gpu-b1-1_5x``: the 1.5x search on ``gpu-b1``, to exchange with
    ``gpu-b64-1_5x`` (Table 7);

  each measured on both GPU platforms. Table 3's NPU rows (1.5 / 36 / .96,
  2.0 / 48 / .98) run with ``--config.variants...`` on another platform.

The GPU platforms' tables are measured by each run in its workdir (a GPU
run must start with the device free). Needs CIFAR-10 files.
"""

from dynscale.compactnet.schedule import Schedule
from experiments.configs import common

MODEL = "mobilenet_v2_imagenet"
BATCH = 96
STEPS_PER_EPOCH = 45000 // BATCH
TABLE_3 = {"1.5": (2.0, 24, 0.96), "1.8": (2.5, 30, 0.98)}


def _row(t_init: float, iterations: int, decay: float) -> dict:
  """A Table 3 row as the run's settings: T_final solved back from T_init."""
  return {"compactnet.t_final": Schedule(t_init, iterations, decay).final_speedup,
          "compactnet.iterations": iterations, "compactnet.decay": decay}


def get_config():
  optimizer = common.cifar_sgd(0.1)
  optimizer.weight_decay = 4e-5
  config = common.compactnet_base(
      data=common.data("cifar10", batch_size=BATCH, val_size=5000),
      model=common.model(MODEL, profile="all-one"),
      optimizer=optimizer,
      train=common.train(num_epochs=200),
      compactnet=common.compactnet("gpu-b64"),
  )
  config.model.idp_layers = "none"
  config.eval.dps = (1.0,)
  c = config.compactnet
  c.measure_on = ("gpu-b64", "gpu-b1")
  c.finetune_steps = 30 * STEPS_PER_EPOCH
  c.finetune_optimizer = common.rmsprop(1e-3, 0.9)
  c.retrain_epochs = 500
  c.retrain_optimizer = common.rmsprop(1e-4, 0.95)
  c.retrain_seeds = (0,)
  config.title = "004 Tables 3-7, MobileNetV2 on CIFAR-10"
  start = {"model.init_from": "variant:pretrain"}
  variants = {
      "pretrain": {"method": "idp"},
      "gpu-b64-1_5x": {**start, **_row(*TABLE_3["1.5"])},
      "gpu-b64-1_8x": {**start, **_row(*TABLE_3["1.8"])},
      "gpu-b1-1_5x": {**start, **_row(*TABLE_3["1.5"]), "compactnet.platform": "gpu-b1"},
  }
  config.variants = {name: common.overrides(**v) for name, v in variants.items()}
  return config
