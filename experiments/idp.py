r"""IDP launcher: the original recipe (train at 100% DP with a profile, evaluate
10-100%) and MP-IDP, singly or as a figure's variants.

python -m experiments.idp --config=experiments/configs/idp_fig7.py --workdir=runs/fig7
python -m experiments.idp --config=experiments/configs/idp_fig8.py:vgg16 --workdir=runs/fig8-vgg16
"""

from absl import app

from dynscale.train import mpidp, supervised, sweep
from experiments import launch

METHODS = {"idp": supervised.train_and_evaluate, "mpidp": mpidp.train_and_evaluate}


def train_and_evaluate(config, workdir):
  if config.get("variants"):
    return sweep.run_variants(config, workdir, METHODS)
  if config.method not in METHODS:
    raise ValueError(f"method must be one of {tuple(METHODS)}, got {config.method!r}")
  return METHODS[config.method](config, workdir)


def main(argv):
  launch.run(argv, train_and_evaluate)


if __name__ == "__main__":
  launch.define_flags()
  app.run(main)
