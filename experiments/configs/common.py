"""Config blocks shared by every method: data, model, optimizer, train, eval.

A config file composes these and overrides what its experiment needs; any
field can also be set on the command line, e.g. ``--config.train.num_epochs=3``.
"""

import ml_collections

from dynscale.train import protocols

DPS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def data(dataset: str = "mnist_sample", *, batch_size: int = 128, val_size: int = 500,
         augment="auto") -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      dataset=dataset,
      data_dir="",           # '' -> $DYNSCALE_DATA_DIR, then tensorflow-datasets
      val_size=val_size,     # examples held out of train for validation
      train_examples=0,      # 0: the whole train split; else a class-balanced subset of
                             # this size (one fixed subset), validation carved from it
      batch_size=batch_size,
      eval_batch_size=500,
      augment=augment,       # 'auto': crop+flip for CIFAR, none for MNIST; or 'on', 'off'
  ))


def model(name: str = "mlp", *, profile: str = "linear") -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name=name,
      profile=profile,
      idp_layers=ml_collections.config_dict.placeholder(object),  # None: as in the paper
      mp_profiles=ml_collections.config_dict.placeholder(tuple),  # MP-IDP DP ranges
      width_multiplier=1.0,
      dtype="float32",       # or 'bfloat16' compute with float32 parameters
      init_from="",          # an exported network (or a run directory with export/) to
                             # start from; its architecture replaces the fields above
  ))


def optimizer(name: str = "adam", *, learning_rate: float = 1e-3,
              momentum: float = 0.9) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name=name, learning_rate=learning_rate, momentum=momentum, nesterov=False,
      weight_decay=0.0, schedule="constant", warmup_steps=0,
      step_every=1, step_factor=0.1,  # schedule 'step': lr x step_factor every step_every steps
  ))


def cifar_sgd(learning_rate: float) -> ml_collections.ConfigDict:
  """SGD with momentum 0.9, cosine decay and weight decay 5e-4: the usual CIFAR recipe."""
  config = optimizer("sgd", learning_rate=learning_rate, momentum=0.9)
  config.schedule = "cosine"
  config.weight_decay = 5e-4
  return config


def train(*, num_epochs: int = 10, dp: float = 1.0, patience: int = 0) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      num_epochs=num_epochs,
      dp=dp,                 # the DP the network trains at (IDP: 100%)
      patience=patience,     # early stopping on validation accuracy; 0 = off
      steps_per_chunk=50,    # optimizer steps per dispatch (one lax.scan)
      checkpoint=True,
  ))


def evaluation(*, dps=DPS, bn_mode: str = "shared") -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      dps=dps,
      bn_mode=bn_mode,       # 'shared' (the papers') or 'recalibrated' per DP
      recalibration_batches=10,
  ))


def split_arg(arg: str, field: str, allowed, *, cpu_allowed=None) -> tuple[str, str]:
  """A config argument ``'<choice>[,<protocol>]'`` -> ``(choice, protocol)``, e.g.
  ``'vgg16,cpu' -> ('vgg16', 'cpu')``; the protocol defaults to ``'paper'``.

  Raises naming ``field`` and its allowed values, or the protocols
  (:data:`dynscale.train.protocols.NAMES`); ``cpu_allowed`` lists the choices the
  ``cpu`` protocol applies to (default: all).
  """
  choice, _, protocol = arg.partition(",")
  if choice not in allowed:
    raise ValueError(f"{field} must be one of {tuple(allowed)}, optionally followed by "
                     f"',<protocol>', got {arg!r}")
  protocol = protocol or "paper"
  protocols.check(protocol)
  cpu_allowed = tuple(allowed if cpu_allowed is None else cpu_allowed)
  if protocol == "cpu" and choice not in cpu_allowed:
    raise ValueError(f"{field}: the cpu protocol is for {cpu_allowed} (CIFAR), got {arg!r}")
  return choice, protocol


CPU_DP_CURVE = {"eval": {"bn_mode": "recalibrated"}}
"""What a DP curve (IDP, MP-IDP, TESLA on CIFAR) adds to the ``cpu`` protocol:
batch norm read with statistics re-estimated at each DP, for validation and
test alike. At width x 0.25 the trained running statistics put every network
at chance below 50-60% DP, whatever its profile (RESULTS.md, "Batch norm at
reduced DP decides the small network's curve")."""


def dp_curve_protocol(config: ml_collections.ConfigDict,
                      protocol: str) -> ml_collections.ConfigDict:
  """``config`` under ``protocol`` (:func:`dynscale.train.protocols.apply`), with
  :data:`CPU_DP_CURVE` under ``cpu``."""
  return protocols.apply(config, protocol, CPU_DP_CURVE if protocol == "cpu" else None)


def overrides(**dotted) -> dict:
  """Nested overrides from dotted paths: ``overrides(**{"model.profile": "linear"})``.

  A variant of a figure is the base config with these applied (ConfigDict
  keys cannot contain dots, so variants hold them nested).
  """
  nested: dict = {}
  for path, value in dotted.items():
    *parents, leaf = path.split(".")
    node = nested
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return nested


def base(method: str, **blocks) -> ml_collections.ConfigDict:
  """A full config for ``method`` (a key of ``experiments.main.METHODS``): every
  block at its default unless given."""
  config = ml_collections.ConfigDict()
  config.method = method
  config.protocol = "paper"  # or 'cpu': set by dynscale.train.protocols.apply
  config.seed = 0
  config.data = blocks.pop("data", data())
  config.model = blocks.pop("model", model())
  config.optimizer = blocks.pop("optimizer", optimizer())
  config.train = blocks.pop("train", train())
  config.eval = blocks.pop("eval", evaluation())
  config.tensorboard = True
  config.update(blocks)
  return config


def schedule(name: str = "tesla", *, tasks=(1.0, 0.7, 0.4, 0.1), alpha: float = 0.5,
             epoch_budget: int = 50, monitor: str = "objective",
             selection: str = "final") -> ml_collections.ConfigDict:
  """TESLA / R-TESLA (000 Algorithms 1-2); ``train.patience`` is the stopping rule."""
  return ml_collections.ConfigDict(dict(
      name=name,             # 'tesla' (decreasing DP) or 'rtesla' (sampled tasks)
      tasks=tasks,           # DP levels, decreasing for TESLA
      alpha=alpha,           # Eq. 3 aggregation coefficient
      monitor=monitor,       # early stopping reads: 'objective' (Eq. 3-weighted val accuracy)
                             # or 'newest_task' (val accuracy at the newest task's DP)
      selection=selection,   # the state reported: 'final' (the schedule's last, as in
                             # Algorithms 1-2) or 'best_mean' (best mean val accuracy
                             # over all tasks across the whole run)
      epoch_budget=epoch_budget,  # R-TESLA: total epochs over all stages
      stage_epochs=0,             # R-TESLA: the most epochs of one stage (0: until its
                                  # early stopping or the budget, as Algorithm 2)
      # R-TESLA task distribution: 'uniform' or explicit probabilities (a tuple),
      # so the field takes either type
      distribution=ml_collections.FieldReference("uniform", field_type=object),
  ))


def atp(enabled: bool = False) -> ml_collections.ConfigDict:
  """Trainable profiles (000 §3.4); needs ``model.profile='all-one'`` (start at one)."""
  return ml_collections.ConfigDict(dict(
      enabled=enabled,
      projection="clip",     # the paper's clip, or 'isotonic' (exact Euclidean projection)
      period_steps=1,        # weights and profiles alternate every this many steps
      learning_rate=1e-3,    # Adam on the profiles
  ))


def distill(weight: float = 0.0) -> ml_collections.ConfigDict:
  """In-place distillation from the 100% task (not in the paper; off by default)."""
  return ml_collections.ConfigDict(dict(weight=weight, temperature=1.0))


def cam(enabled: bool = False) -> ml_collections.ConfigDict:
  """Class activation maps after training (000 §4.2, Figs. 5-6); needs a GAP model."""
  return ml_collections.ConfigDict(dict(enabled=enabled, num_images=8, dps=(0.2, 0.5, 1.0)))


def tesla_base(**blocks) -> ml_collections.ConfigDict:
  """A TESLA config: the common blocks plus schedule, atp, distill and cam."""
  config = base("tesla", **{k: blocks.pop(k) for k in list(blocks)
                            if k in ("data", "model", "optimizer", "train", "eval")})
  config.schedule = blocks.pop("schedule", schedule())
  config.atp = blocks.pop("atp", atp())
  config.distill = blocks.pop("distill", distill())
  config.cam = blocks.pop("cam", cam())
  config.update(blocks)
  return config


def sanp(variant: str = "sanp", *, budget: float = 0.3, lambda0: float = 0.01
         ) -> ml_collections.ConfigDict:
  """SANP (002; :mod:`dynscale.sanp.training`): the gates, the budget and the stages."""
  return ml_collections.ConfigDict(dict(
      variant=variant,       # 'sanp', or the ablations 'static' and 'fixed_k' (§5.1)
      budget=budget,         # FLOPs as a fraction of the backbone's, in (0, 1)
      lambda0=lambda0,       # Eq. 10
      cost="filters",        # Eq. 9's 1/N_c; or 'layers', 'flops' (dynscale.sanp.objective)
      code="relaxed",        # penalise the relaxed codes s1; 'saliency': the literal L1 of s
      flops_window=20,       # p_t: mean evaluation-mode FLOPs of the last N batches
      flops_statistics="batch",  # their batch norm: the batch's statistics, or 'running'
      integral_rate=0.0,     # > 0 adds sum_t rate (p_t - p) to Eq. 10's lambda (not in 002)
      budget_ramp_epochs=0,  # the budget falls linearly from 1.0 over these fine-tune epochs
      reduction=16,          # r of Eq. 6
      floor=0,               # channels every gated layer keeps open at least
      floor_fraction=0.0,    # or this fraction of the layer's FIXED-K k, if more (not in 002)
      binarization=dict(a=1.2, b=0.1, sigma=1.0, mix=0.5, mix_per="sample"),  # Eq. 7-8
      pretrain_epochs=6,     # the backbone alone, unless model.init_from names one
      warmup_epochs=2,       # the gates alone, convolutions fixed
      gate_start="open",     # 'open': s = 1 (002); 'fixed_k': warm up as FIXED-K, hand off at the budget
      calibration_batches=20,  # training batches that place the handed-off decision points
      decision_point="layer",  # SPMs handed off: one per layer, or 'channel' (not in 002)
  ))


def sanp_base(**blocks) -> ml_collections.ConfigDict:
  """A SANP config: the common blocks plus ``sanp``; ``train.num_epochs`` is the fine-tune's."""
  config = base("sanp", **{k: blocks.pop(k) for k in list(blocks)
                           if k in ("data", "model", "optimizer", "train", "eval")})
  config.sanp = blocks.pop("sanp", sanp())
  config.update(blocks)
  return config



SANP_PAPER_STEPS_PER_EPOCH = {"cifar10": 45000 // 256, "cifar100": 45000 // 256}


def sanp_paper(dataset: str, model_name: str, budget: float) -> ml_collections.ConfigDict:
  """A SANP run at the paper's scale (002 §4.1.2), for a GPU: SGD momentum 0.9,
  batch 256, lr 0.1 divided by 10 every 100 epochs, lambda0 = 0.01, r = 16.

  002 gives no epoch counts; ours: the backbone 300 epochs, the gates' warm-up
  10, the fine-tune 300 (each stage's schedule restarts at 0.1). 5,000
  training images are held out for validation.
  """
  optimizer_block = optimizer("sgd", learning_rate=0.1, momentum=0.9)
  optimizer_block.schedule = "step"
  optimizer_block.step_every = 100 * SANP_PAPER_STEPS_PER_EPOCH[dataset]
  optimizer_block.weight_decay = 5e-4
  config = sanp_base(
      data=data(dataset, batch_size=256, val_size=5000),
      model=model(model_name, profile="all-one"),
      optimizer=optimizer_block,
      train=train(num_epochs=300),
      sanp=sanp("sanp", budget=budget, lambda0=0.01),
  )
  config.sanp.pretrain_epochs = 300
  config.sanp.warmup_epochs = 10
  config.eval.dps = (1.0,)
  return config


def sanp_paper_table(field: str, table: str, dataset: str, budgets: dict, backbone: str
                     ) -> ml_collections.ConfigDict:
  """One row of a SANP results table (``budgets``: backbone -> FLOPs budget) at
  the paper's scale (:func:`sanp_paper`), titled with the table; ``field`` names
  the config argument in the error for an unknown backbone."""
  if backbone not in budgets:
    raise ValueError(f"{field} must be one of {tuple(budgets)}, got {backbone!r}")
  config = sanp_paper(dataset, backbone, budgets[backbone])
  config.title = f"{table}: SANP on {backbone}"
  return config


def rmsprop(learning_rate: float, decay: float) -> ml_collections.ConfigDict:
  """TensorFlow's RMSPropOptimizer (004 Table 4: the "decay" column is its rho)."""
  config = optimizer("rmsprop", learning_rate=learning_rate, momentum=0.0)
  config.decay = decay
  return config


def compactnet(platform: str = "cpu-b64", *, t_final: float = 1.5, iterations: int = 6,
               decay: float = 0.96) -> ml_collections.ConfigDict:
  """CompactNet (004; :mod:`dynscale.compactnet.training`): platform, table, search, retrain."""
  return ml_collections.ConfigDict(dict(
      platform=platform,     # a name of dynscale.compactnet.platform.PLATFORMS
      measure_on=(),         # more platforms to measure the final models on (Table 7)
      table="",              # a latency table to use; '' measures <workdir>/latency-table.json
      table_settings=dict(   # dynscale.compactnet.simulator.TableSettings
          expansion="tied", grid_points=7, min_fraction=0.25, round_to=8, warmup=2,
          rounds=25, estimator="min", burst=5, processes=3, calibration_processes=1,
          calibration_variants=10, calibration_seed=1000, calibration_form="auto"),
      t_final=t_final,       # the target speed-up; T_init is solved from it (Eq. 1-2)
      iterations=iterations,  # N
      decay=decay,           # d
      corrections=2,         # extra iterations while the searched model measures short of t_final
      speedup_margin=0.0,    # the checks ask for t_final x (1 + margin): room for the spread
      min_width=0.25,        # the smallest fraction of a group the search keeps
      finetune_steps=30,     # a candidate's short fine-tune
      score_examples=0,      # validation images a candidate is scored on (0: all)
      finetune_optimizer=rmsprop(1e-3, 0.9),   # Table 4, fine-tune
      recalibration_batches=10,
      retrain_epochs=2,
      retrain_optimizer=rmsprop(1e-4, 0.95),   # Table 4, retraining
      retrain_seeds=(0, 1),
      # beyond the paper: the searched and uniform networks' retraining also learns the
      # original's retrained predictions, (1 - weight) CE + weight T^2 KL (0: off)
      distill=dict(weight=0.0, temperature=4.0),
      uniform_multipliers=tuple(round(1 - 0.01 * k, 2) for k in range(71)),  # 1.0 ... 0.3
  ))


def compactnet_base(**blocks) -> ml_collections.ConfigDict:
  """A CompactNet config: the common blocks (``train.num_epochs``: the pretraining)
  plus ``compactnet``."""
  config = base("compactnet", **{k: blocks.pop(k) for k in list(blocks)
                                 if k in ("data", "model", "optimizer", "train", "eval")})
  config.compactnet = blocks.pop("compactnet", compactnet())
  config.update(blocks)
  return config
