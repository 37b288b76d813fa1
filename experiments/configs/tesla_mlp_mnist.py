"""000 Table 1, first column: the 3-layer MLP on MNIST (Fig. 3).

Tasks 100/70/40/10% DP, Adam 1e-3, batch 28, alpha 0.5, TESLA stops a stage
after 4 epochs without improvement, R-TESLA has 50 epochs in all. Variants:
the original IDP, TESLA and R-TESLA with the linear, harmonic and all-one
profiles, and both with ATP. ``:linear`` (or another profile, or ``atp``)
runs that subset only. ``:monitors`` is a seed study instead: TESLA linear
with each early-stopping monitor over seeds 0..3. ``:rtesla_selection`` is
another: R-TESLA linear and all-one over seeds 0..3 under
``schedule.selection='best_mean'``, whose results hold both readings (the
best-mean state's and the final state's). Needs the MNIST files
(DYNSCALE_DATA_DIR).
"""

from dynscale.tesla import training as tesla_training
from experiments.configs import common

PROFILES = ("linear", "harmonic", "all-one")
MONITOR_SEEDS = (0, 1, 2, 3)
SELECTION_PROFILES = ("linear", "all-one")  # the R-TESLA rows far below TESLA (issue 10)


def variants(subset: str) -> dict:
  chosen = {}
  for profile in PROFILES:
    if subset in ("all", profile):
      chosen[f"idp-{profile}"] = {"method": "idp", "model.profile": profile,
                                  "train.num_epochs": 20, "train.patience": 4}
      chosen[f"tesla-{profile}"] = {"model.profile": profile}
      chosen[f"rtesla-{profile}"] = {"model.profile": profile, "schedule.name": "rtesla"}
  if subset in ("all", "atp"):
    for name in ("tesla", "rtesla"):
      chosen[f"{name}-atp"] = {"model.profile": "all-one", "atp.enabled": True,
                               "schedule.name": name}
  if subset == "monitors":
    for monitor in tesla_training.MONITORS:
      for seed in MONITOR_SEEDS:
        chosen[f"tesla-linear-{monitor}-seed{seed}"] = {"schedule.monitor": monitor,
                                                        "seed": seed}
  if subset == "rtesla_selection":
    for profile in SELECTION_PROFILES:
      for seed in MONITOR_SEEDS:
        chosen[f"rtesla-{profile}-seed{seed}"] = {"model.profile": profile, "seed": seed,
                                                  "schedule.name": "rtesla",
                                                  "schedule.selection": "best_mean"}
  if not chosen:
    raise ValueError(f"tesla_mlp_mnist subset must be 'all', 'atp', 'monitors', "
                     f"'rtesla_selection' or one of {PROFILES}, got {subset!r}")
  return {name: common.overrides(**dotted) for name, dotted in chosen.items()}


def get_config(arg: str = "all"):
  config = common.tesla_base(
      data=common.data("mnist", batch_size=28, val_size=5000),
      model=common.model("tesla_mlp", profile="linear"),
      optimizer=common.optimizer("adam", learning_rate=1e-3),
      train=common.train(num_epochs=30, patience=4),
      schedule=common.schedule("tesla", tasks=(1.0, 0.7, 0.4, 0.1), alpha=0.5,
                               epoch_budget=50),
  )
  config.title = "000 Table 1 column 1 / Fig. 3"
  config.variants = variants(arg)
  return config
