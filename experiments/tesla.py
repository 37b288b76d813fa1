r"""TESLA launcher: TESLA, R-TESLA (optionally with ATP), and the original IDP
and MP-IDP baselines, one run or a table column's variants compared.

python -m experiments.tesla --config=experiments/configs/tesla_main.py --workdir=runs/tesla
python -m experiments.tesla --config=experiments/configs/tesla_mlp_mnist.py --workdir=runs/table1-mlp
"""

from absl import app

from dynscale.idp import mpidp, training as idp_training
from dynscale.tesla import training as tesla_training
from experiments import launch

METHODS = {"idp": idp_training, "mpidp": mpidp, "tesla": tesla_training}


train_and_evaluate = launch.dispatch(METHODS)


def main(argv):
  launch.run(argv, train_and_evaluate)


if __name__ == "__main__":
  launch.define_flags()
  app.run(main)
