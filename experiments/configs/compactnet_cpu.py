"""CompactNet (004) under the ``cpu`` protocol: MobileNetV2 trimmed for two CPU platforms.

MobileNetV2 with Table 1's strides (``mobilenet_v2_imagenet``: the final map
is 1x1 at 32x32, as the authors' code) at full width: 6 M multiply-adds,
cheaper than the protocol's VGG-16 x 0.25, so the width stays 1.0 (a
protocol size, recorded). CIFAR-10 45k / 5k, the full test split.

``:pretrain`` trains the original network once (``PRETRAIN_EPOCHS``: 20,
twice the protocol's cap per stage, a recorded protocol size: 10 reached
54.5%, under the issue's 58%, and the issue allows 45 minutes), with the
protocol's SGD at learning rate 0.02, not 0.05, which does not train this
network (``LEARNING_RATE``); every other variant starts from its export
(``model.init_from='variant:pretrain'``, a figure runs it first):

* ``b64-1_5x``, ``b64-1_8x``: T_final 1.5x and 1.8x on ``cpu-b64`` (XLA:CPU,
  float32, batch 64, one thread), N = 6 and 8, d = 0.96 (with N = 6, each
  of 1.8x's steps must take 7.7% of the original latency from one group,
  and after four steps no group can);
* ``b1-1_5x``: 1.5x on ``cpu-b1`` (batch 1), N = 6, d = 0.96 as
  ``b64-1_5x``. (It ran N = 24 while the networks' variables were handed
  over one array at a time: a fixed cost per array was then a third of
  MobileNetV2's batch-1 latency, every group at a quarter of its width
  gave only 1.59x and no group alone could take a sixth of the way in one
  step. Bound as deployed, the tables of 2026-12-04 give 3.0-3.2x with
  every group at a quarter and 3-29% from single groups at a quarter, and
  20 of 20 random paths of N = 6 reach 1.5x: ``benchmarks.compactnet_paths``.)
* ``bf16-1_5x``: 1.5x on ``cpu-b64-bf16`` (batch 64 in bfloat16), N = 6,
  d = 0.96, the third platform of Table 7's exchange (on this CPU bf16
  runs 2.9x slower than float32 and its costs lie elsewhere: halving the
  first conv saves 16% there, 8% on ``cpu-b64``);
* ``b64-1_5x-n24``: ``b64-1_5x`` with N = 24 (Table 3's N for 1.5x), so
  10-step fine-tunes and 5 recalibration batches, a study beside the
  issue's N ~ 6: with N = 6 each step must take about 6% of the original
  latency from one group in one cut, and every candidate of the 1.5x
  search lost accuracy in it (RESULTS); Table 3 runs N = 24-48, steps of
  about 1.5%, each a gentler cut;
* ``b64-1_5x-kd``: ``b64-1_5x`` (the same search) whose searched and uniform
  networks retrain on ``(1 - 0.5) CE + 0.5 T^2 KL`` against the original as
  retrained with the same seed (``compactnet.distill``, beyond the paper): in
  every 1.5x run the searched network ended 0.9-2.0 points under the original
  after the same retraining;
* ``b64-1_8x-kd``: ``b64-1_8x`` (the same search) retrained as ``b64-1_5x-kd``;
* ``b64-1_8x-kd-m3``: ``b64-1_8x-kd`` whose checks ask for 1.8 x 1.03
  (``compactnet.speedup_margin``, up to 4 corrections): ``b64-1_8x-kd``'s
  network, checked at 1.841x, measured 1.742x and 1.780x in two final
  measurements and 1.82-1.84x in three others (per process 1.78-1.84x), so
  a model checked just above 1.8x meets it or not by the reading;
* ``b1-1_5x-m8``: ``b1-1_5x`` whose checks ask for 1.5 x 1.08: ``b1-1_5x``'s
  network, checked at 1.570x, measured 1.607x in its run and 1.481x in a
  later final measurement (the original's batch-1 latency moved from 0.356
  to 0.323 ms, the searched model's stayed at 0.22 ms): 5.7% under its
  check, so a margin just above that;
* ``b1-1_5x-m8-kd``: ``b1-1_5x-m8`` retrained as ``b64-1_5x-kd``, searched
  after the depthwise kernel stopped computing its input twice (a fresh
  ``cpu-b1`` table): ``b1-1_5x-m8`` met the speed bar and lost 0.93 points
  to the original, and distillation gave ``b64-1_5x`` 0.9 points back;
* ``b64-1_5x-m8-kd``: ``b64-1_5x-kd`` held to the same 8% margin as
  ``b1-1_5x-m8-kd``, for Table 7's exchange at matched targets: against
  ``b64-1_5x-kd`` (no margin) the margin model of ``cpu-b1`` was the faster
  on both platforms;
* ``bf16-1_5x-m8-kd``: ``bf16-1_5x`` held to the same 8% margin and retrained
  as the two above, the third platform of the matched-target exchange:
  ``cpu-b64`` and ``cpu-b1`` trim alike (both cut the late stages, and their
  models ran within 3.1% and 2.3% of each other on either platform), which
  is the case where the issue allows ``cpu-b64-bf16`` in Table 7;

each with short RMSProp fine-tunes (Table 4's optimizer; candidates scored
on 2,000 of the validation images), then ``RETRAIN_EPOCHS`` (10, the
protocol's cap per stage) of retraining of the searched, uniform and
original networks for retrain seeds 0 and 1 with the pretraining's SGD
(cosine over the retraining; Table 4's RMSProp at 1e-4 recovered less:
chosen on validation, see ``_base``; 1, 2 and 4 epochs, a later study,
put the searched model further from the original and, but for one epoch
at 1.5x, still under 3 points above the uniform one: RESULTS.md), measured on both
CPU platforms (Table 7's exchange).
``:smoke`` is one quick search (T_final 1.8 on ``cpu-b64``, a small table,
one process per measurement, 2-step fine-tunes) from a 1-epoch pretraining
on 2,000 images, to check the pipeline in a few minutes. Needs CIFAR-10 files (DYNSCALE_DATA_DIR).
"""

from dynscale.train import protocols
from experiments.configs import common

MODEL = "mobilenet_v2_imagenet"
PRETRAIN_EPOCHS = 20  # 10 (the cpu protocol's cap per stage) reached 54.5%; the bar is 58%
RETRAIN_EPOCHS = 10  # the cpu protocol's cap per training stage
# The protocol's learning rate, 0.05, does not train this network: its training
# accuracy rose to 24% in the first epoch and fell to 13% by the third (loss
# above chance, validation 22.7 -> 15.7%; weight decay 4e-5 did no better);
# at 0.02 it rose steadily (34% at the end of the first epoch). Chosen on the
# training curve (2026-12-02).
LEARNING_RATE = 0.02
SIZES = {"model": {"width_multiplier": 1.0}, "train": {"num_epochs": PRETRAIN_EPOCHS},
         "optimizer": {"learning_rate": LEARNING_RATE},
         "compactnet": {"retrain_epochs": RETRAIN_EPOCHS}}
SUBSETS = ("all", "smoke")
MEASURE_ON = ("cpu-b64", "cpu-b1")
# N = 24 steps (Table 3's N for 1.5x), each with a shorter fine-tune and recalibration
SMALL_STEPS = {"compactnet.iterations": 24, "compactnet.finetune_steps": 10,
               "compactnet.recalibration_batches": 5}
# The searched and uniform networks' retraining half distilled from the retrained
# original (beyond the paper; T = 4, the common block's default)
DISTILL = {"compactnet.distill.weight": 0.5}
SCORE_EXAMPLES = 2000  # of the 5,000 validation images, to keep a search near 25 minutes


def _base():
  config = common.compactnet_base(
      data=common.data("cifar10"),
      model=common.model(MODEL, profile="all-one"),
      train=common.train(num_epochs=PRETRAIN_EPOCHS),
      compactnet=common.compactnet("cpu-b64"),
  )
  config.model.idp_layers = "none"
  config.eval.dps = (1.0,)
  config.compactnet.measure_on = MEASURE_ON
  config.compactnet.score_examples = SCORE_EXAMPLES
  config = protocols.apply(config, "cpu", SIZES)
  # Retraining the searched 1.5x network (validation 41.8% after its search) 2 epochs:
  # Table 4's RMSProp at 1e-4 reached 47.7%, the pretraining's SGD 52.0% (the original:
  # 54.9% and 55.5%); 6 epochs of SGD: 56.7% and 59.4%. Chosen on validation
  # (2026-12-03, RESULTS.md). A copy: --config.optimizer.* changes the pretraining's
  # optimizer only, --config.compactnet.retrain_optimizer.* the retraining's.
  config.compactnet.retrain_optimizer = config.optimizer.copy_and_resolve_references()
  config.title = "004 CompactNet, MobileNetV2 on two CPU platforms"
  return config


def _smoke(config):
  config.data.train_examples = 2000
  config.data.val_size = 500
  config.train.num_epochs = 1
  c = config.compactnet
  c.t_final, c.iterations = 1.8, 8
  c.table_settings.update(dict(grid_points=3, rounds=3, warmup=1, processes=1,
                               calibration_variants=3))
  c.finetune_steps, c.recalibration_batches = 2, 2
  c.retrain_epochs, c.retrain_seeds = 1, (0,)
  c.measure_on = ()
  return config


def get_config(arg: str = "all"):
  if arg not in SUBSETS:
    raise ValueError(f"compactnet_cpu subset must be one of {SUBSETS}, got {arg!r}")
  config = _base()
  if arg == "smoke":
    return _smoke(config)
  start = {"model.init_from": "variant:pretrain"}
  margin_8 = {"compactnet.speedup_margin": 0.08, "compactnet.corrections": 4}
  b1_margin = {**start, "compactnet.platform": "cpu-b1", "compactnet.t_final": 1.5, **margin_8}
  variants = {
      "pretrain": {"method": "idp"},
      "b64-1_5x": {**start, "compactnet.t_final": 1.5},
      "b64-1_8x": {**start, "compactnet.t_final": 1.8, "compactnet.iterations": 8},
      "b1-1_5x": {**start, "compactnet.platform": "cpu-b1", "compactnet.t_final": 1.5},
      "bf16-1_5x": {**start, "compactnet.platform": "cpu-b64-bf16", "compactnet.t_final": 1.5},
      "b64-1_5x-n24": {**start, "compactnet.t_final": 1.5, **SMALL_STEPS},
      "b64-1_5x-kd": {**start, "compactnet.t_final": 1.5, **DISTILL},
      "b64-1_8x-kd": {**start, "compactnet.t_final": 1.8, "compactnet.iterations": 8, **DISTILL},
      "b64-1_8x-kd-m3": {**start, "compactnet.t_final": 1.8, "compactnet.iterations": 8,
                         "compactnet.speedup_margin": 0.03, "compactnet.corrections": 4,
                         **DISTILL},
      "b1-1_5x-m8": b1_margin,
      "b1-1_5x-m8-kd": {**b1_margin, **DISTILL},
      "b64-1_5x-m8-kd": {**start, "compactnet.t_final": 1.5, **margin_8, **DISTILL},
      "bf16-1_5x-m8-kd": {**start, "compactnet.platform": "cpu-b64-bf16",
                          "compactnet.t_final": 1.5, **margin_8, **DISTILL},
  }
  config.variants = {name: common.overrides(**v) for name, v in variants.items()}
  return config
