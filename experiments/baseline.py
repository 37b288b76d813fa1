r"""Baseline launcher: train one network at a fixed DP, evaluate across DPs.

python -m experiments.baseline --config=experiments/configs/baseline.py \
    --workdir=runs/baseline [--config.train.num_epochs=3 ...]
"""

from absl import app

from dynscale.idp import training
from experiments import launch


def main(argv):
  launch.run(argv, training.train_and_evaluate)


if __name__ == "__main__":
  launch.define_flags()
  app.run(main)
