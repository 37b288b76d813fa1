"""The main job of the foundation: the all-one MLP on the embedded MNIST sample.

python -m experiments.main --config=experiments/configs/baseline.py --workdir=runs/baseline
"""

from experiments.configs import common


def get_config():
  return common.base(
      "idp",
      data=common.data("mnist_sample", batch_size=64, val_size=500),
      model=common.model("mlp", profile="all-one"),
      optimizer=common.optimizer("adam", learning_rate=1e-3),
      train=common.train(num_epochs=10),
  )
