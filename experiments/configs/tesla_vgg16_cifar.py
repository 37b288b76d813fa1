"""000 Table 1, VGG-16 columns: ``:cifar10`` (tasks 100/50/20, batch 32, Fig. 4a)
and ``:cifar100`` (tasks 100/70/50/30, batch 64, Fig. 4b).

SGD momentum 0.9, lr 0.004, alpha 0.5, TESLA patience 4, R-TESLA 35 epochs.
The paper starts from ImageNet weights; none can be downloaded here, so
VGG-16 trains from scratch (first the 100% task, as every schedule does).
Variants: original IDP with all-one and linear profiles, MP-IDP, TESLA and
R-TESLA (linear), and TESLA on the GAP variant of VGG-16 with class
activation maps at 20/50/100% DP (000 §4.2, Figs. 5-6). Needs CIFAR files (DYNSCALE_DATA_DIR); meant for a GPU.
"""

from experiments.configs import common

COLUMNS = {
    "cifar10": ((1.0, 0.5, 0.2), 32, ((0.0, 0.3), (0.3, 1.0))),
    "cifar100": ((1.0, 0.7, 0.5, 0.3), 64, ((0.0, 0.5), (0.5, 1.0))),
}


def get_config(arg: str = "cifar10"):
  if arg not in COLUMNS:
    raise ValueError(f"tesla_vgg16_cifar column must be one of {tuple(COLUMNS)}, got {arg!r}")
  tasks, batch, mp_ranges = COLUMNS[arg]
  optimizer = common.optimizer("sgd", learning_rate=0.004, momentum=0.9)
  optimizer.weight_decay = 5e-4
  config = common.tesla_base(
      data=common.data(arg, batch_size=batch, val_size=5000),
      model=common.model("vgg16", profile="linear"),
      optimizer=optimizer,
      train=common.train(num_epochs=60, patience=4),
      schedule=common.schedule("tesla", tasks=tasks, alpha=0.5, epoch_budget=35),
  )
  config.title = f"000 Table 1 / Fig. 4: VGG-16 on {arg.upper()} (from scratch)"
  idp = {"method": "idp", "train.num_epochs": 60, "train.patience": 8}
  config.variants = {name: common.overrides(**dotted) for name, dotted in {
      "idp-all-one": {**idp, "model.profile": "all-one"},
      "idp-linear": idp,
      "mp-idp": {**idp, "method": "mpidp", "model.mp_profiles": mp_ranges},
      "tesla": {},
      "rtesla": {"schedule.name": "rtesla"},
      "tesla-gap-cam": {"model.name": "vgg16_gap", "cam.enabled": True},
  }.items()}
  return config
