"""001 Fig. 9: MP-IDP. ``:mlp`` has three profiles (0-20, 20-40, 40-100% DP) on
MNIST; ``:vgg16`` two (0-30, 30-100%) on CIFAR-10. Each is compared with the
single linear profile on the same network.

The MLP panel uses ``tesla_mlp`` (flatten -> FC 100 -> FC 100 (IDP) -> FC 10),
not 001's one-hidden-layer ``mlp``: MP-IDP holds the first and last layers
once per profile, and the one-hidden-layer MLP has no other layer, so its
profiles would share nothing. In ``tesla_mlp`` the profiles share the middle
IDP layer, as Fig. 9 says ("the beginning 40% of input channels in the IDP
layer are shared between all three profiles"). 001 gives no training
settings; the VGG-16 panel uses our recipe (``common.cifar_sgd``: SGD momentum
0.9, weight decay 5e-4, cosine decay), which its results must name.
``:vgg16,cpu`` runs it under the ``cpu`` protocol (:mod:`dynscale.train.protocols`),
batch norm read recalibrated at each DP (:data:`common.CPU_DP_CURVE`).
"""

from experiments.configs import common

PANELS = {
    "mlp": ("tesla_mlp", "mnist", 64, "adam", 1e-3, 20,
            ((0.0, 0.2), (0.2, 0.4), (0.4, 1.0))),
    "vgg16": ("vgg16", "cifar10", 128, "sgd", 0.05, 60, ((0.0, 0.3), (0.3, 1.0))),
}


def get_config(arg: str = "mlp"):
  panel, protocol = common.split_arg(arg, "idp_fig9 panel", PANELS, cpu_allowed=("vgg16",))
  model, dataset, batch, opt, lr, epochs, ranges = PANELS[panel]
  optimizer = (common.cifar_sgd(lr) if opt == "sgd"
               else common.optimizer(opt, learning_rate=lr))
  config = common.base(
      "idp",
      data=common.data(dataset, batch_size=batch, val_size=5000),
      model=common.model(model, profile="linear"),
      optimizer=optimizer,
      train=common.train(num_epochs=epochs),
  )
  config.title = "001 Fig. 9: MP-IDP against one profile"
  config.variants = {
      "linear": {},
      "mp-idp": common.overrides(**{"method": "mpidp", "model.mp_profiles": ranges}),
  }
  return common.dp_curve_protocol(config, protocol)
