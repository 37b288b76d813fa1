"""001 Fig. 7: the one-hidden-layer MLP on MNIST with the four profiles.

Needs the MNIST files (DYNSCALE_DATA_DIR); ``:sample`` runs on the embedded
sample instead.
"""

from experiments.configs import common


def get_config(arg: str = "mnist"):
  config = common.base(
      "idp",
      data=common.data("mnist_sample" if arg == "sample" else "mnist", batch_size=64,
                       val_size=5000 if arg != "sample" else 500),
      model=common.model("mlp"),
      optimizer=common.optimizer("adam", learning_rate=1e-3),
      train=common.train(num_epochs=20),
  )
  config.title = "001 Fig. 7: four profiles"
  config.variants = {p: common.overrides(**{"model.profile": p})
                     for p in ("all-one", "harmonic", "linear", "half-exp")}
  return config
