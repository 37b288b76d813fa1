"""000 Table 1, VGG-16 columns: ``:cifar10`` (tasks 100/50/20, batch 32, Fig. 4(b);
Fig. 4(a) is its first two tasks) and ``:cifar100`` (tasks 100/70/50/30, batch 64,
Fig. 4(c)).

Table 1's settings: SGD momentum 0.9, lr 0.004 (constant), alpha 0.5, TESLA
patience 4, R-TESLA 35 epochs, and nothing else (no weight decay, no
learning-rate schedule). ``:cifar10-recipe`` / ``:cifar100-recipe`` add the
usual CIFAR recipe, which Table 1 does not have: weight decay 5e-4 and
cosine decay of the learning rate (:func:`experiments.configs.common.cifar_sgd`);
their results name it in the title. The paper starts from ImageNet weights;
none can be downloaded here, so VGG-16 trains from scratch (first the 100%
task, as every schedule does). Variants: original IDP with all-one and linear
profiles, MP-IDP, TESLA and R-TESLA (linear), and, in the CIFAR-10 column,
TESLA on the GAP variant of VGG-16 with class activation maps at
10/20/30/50/100% DP (000 §4.2, Figs. 5-6: CIFAR-10's tasks 20/50/100%).
Needs CIFAR files (DYNSCALE_DATA_DIR); meant for a GPU.

``:cifar10,cpu`` / ``:cifar100,cpu`` run the column under the ``cpu`` protocol
(:mod:`dynscale.train.protocols`: width x 0.25, 10 epochs per stage, one SGD
recipe; batch norm read recalibrated at each DP, :data:`common.CPU_DP_CURVE`);
its ``idp-all-one`` variant, the plain network trained at 100%,
is the unpruned baseline, and the IDP variants train without early stopping.
"""

from experiments.configs import common

COLUMNS = {
    "cifar10": ((1.0, 0.5, 0.2), 32, ((0.0, 0.3), (0.3, 1.0))),
    "cifar100": ((1.0, 0.7, 0.5, 0.3), 64, ((0.0, 0.5), (0.5, 1.0))),
}
RECIPE = "-recipe"
LEARNING_RATE = 0.004  # Table 1
CAM_DPS = (0.1, 0.2, 0.3, 0.5, 1.0)  # Figs. 5-6
CAM_COLUMN = "cifar10"  # 000 §4.2 trains the GAP network at 20/50/100%, CIFAR-10's tasks


def get_config(arg: str = "cifar10"):
  recipes = tuple(column + RECIPE for column in COLUMNS)
  choice, protocol = common.split_arg(arg, "tesla_vgg16_cifar column", (*COLUMNS, *recipes),
                                      cpu_allowed=tuple(COLUMNS))
  column = choice.removesuffix(RECIPE)
  recipe = choice.endswith(RECIPE)
  tasks, batch, mp_ranges = COLUMNS[column]
  optimizer = (common.cifar_sgd(LEARNING_RATE) if recipe
               else common.optimizer("sgd", learning_rate=LEARNING_RATE, momentum=0.9))
  config = common.tesla_base(
      data=common.data(column, batch_size=batch, val_size=5000),
      model=common.model("vgg16", profile="linear"),
      optimizer=optimizer,
      train=common.train(num_epochs=60, patience=4),
      schedule=common.schedule("tesla", tasks=tasks, alpha=0.5, epoch_budget=35),
  )
  config.title = "000 Table 1 / Fig. 4, from scratch" + (
      ", not Table 1's optimizer: weight decay 5e-4, cosine decay" if recipe else "")
  idp = ({"method": "idp", "train.num_epochs": 60, "train.patience": 8} if protocol == "paper"
         else {"method": "idp", "train.patience": 0})
  variants = {
      "idp-all-one": {**idp, "model.profile": "all-one"},
      "idp-linear": idp,
      "mp-idp": {**idp, "method": "mpidp", "model.mp_profiles": mp_ranges},
      "tesla": {},
      "rtesla": {"schedule.name": "rtesla"},
  }
  if column == CAM_COLUMN:
    variants["tesla-gap-cam"] = {"model.name": "vgg16_gap", "cam.enabled": True,
                                 "cam.dps": CAM_DPS}
  config.variants = {name: common.overrides(**dotted) for name, dotted in variants.items()}
  return common.dp_curve_protocol(config, protocol)
