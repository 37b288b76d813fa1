r"""IDP launcher: the original recipe (train at 100% DP with a profile, evaluate
10-100%) and MP-IDP, singly or as a figure's variants.

python -m experiments.idp --config=experiments/configs/idp_fig7.py --workdir=runs/fig7
python -m experiments.idp --config=experiments/configs/idp_fig8.py:vgg16 --workdir=runs/fig8-vgg16
"""

from absl import app

from dynscale.idp import mpidp, training
from experiments import launch

METHODS = {"idp": training, "mpidp": mpidp}


train_and_evaluate = launch.dispatch(METHODS)


def main(argv):
  launch.run(argv, train_and_evaluate)


if __name__ == "__main__":
  launch.define_flags()
  app.run(main)
