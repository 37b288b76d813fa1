r"""TESLA launcher: TESLA, R-TESLA (optionally with ATP), and the original IDP
and MP-IDP baselines, one run or a table column's variants compared.

python -m experiments.tesla --config=experiments/configs/tesla_main.py --workdir=runs/tesla
python -m experiments.tesla --config=experiments/configs/tesla_mlp_mnist.py --workdir=runs/table1-mlp
"""

from absl import app

from dynscale.train import mpidp, supervised, sweep, tesla_training
from experiments import launch

METHODS = {"idp": supervised.train_and_evaluate, "mpidp": mpidp.train_and_evaluate,
           "tesla": tesla_training.train_and_evaluate}


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
