"""The main job: TESLA on 000's 3-layer MLP with the embedded MNIST sample.

Table 1's MLP column (tasks 100/70/40/10, Adam 1e-3, alpha 0.5; patience 2
here, the paper's 4) at a size that finishes in about 20 s on two CPU cores.
"""

from experiments.configs import common


def get_config():
  return common.tesla_base(
      data=common.data("mnist_sample", batch_size=28, val_size=500),
      model=common.model("tesla_mlp", profile="linear"),
      optimizer=common.optimizer("adam", learning_rate=1e-3),
      train=common.train(num_epochs=8, patience=2),
      schedule=common.schedule("tesla", tasks=(1.0, 0.7, 0.4, 0.1), alpha=0.5),
  )
