"""001 Fig. 8: all-one against linear for the MLP, VGG-16, MobileNet and the
binarized network. ``:mlp`` and ``:binary_net`` run on MNIST, ``:vgg16`` and
``:mobilenet`` on CIFAR-10 (both from DYNSCALE_DATA_DIR). 001 gives no training
settings; the CIFAR panels use our recipe (``common.cifar_sgd``: SGD momentum
0.9, weight decay 5e-4, cosine decay), which their results must name.
``:vgg16,cpu`` and ``:mobilenet,cpu`` run a CIFAR panel under the ``cpu``
protocol (:mod:`dynscale.train.protocols`), without early stopping, batch norm
read recalibrated at each DP (:data:`common.CPU_DP_CURVE`).
"""

from experiments.configs import common

PANELS = {
    # panel: dataset, batch, optimizer, learning rate, epochs
    "mlp": ("mnist", 64, "adam", 1e-3, 20),
    "binary_net": ("mnist", 64, "adam", 1e-3, 20),
    "vgg16": ("cifar10", 128, "sgd", 0.05, 60),
    "mobilenet": ("cifar10", 128, "sgd", 0.05, 60),
}


def get_config(arg: str = "mlp"):
  panel, protocol = common.split_arg(arg, "idp_fig8 panel", PANELS,
                                     cpu_allowed=("vgg16", "mobilenet"))
  dataset, batch, opt, lr, epochs = PANELS[panel]
  optimizer = (common.cifar_sgd(lr) if opt == "sgd"
               else common.optimizer(opt, learning_rate=lr))
  config = common.base(
      "idp",
      data=common.data(dataset, batch_size=batch, val_size=5000),
      model=common.model(panel),
      optimizer=optimizer,
      train=common.train(num_epochs=epochs),
  )
  config.title = "001 Fig. 8: all-one vs linear"
  config.variants = {p: common.overrides(**{"model.profile": p}) for p in ("all-one", "linear")}
  return common.dp_curve_protocol(config, protocol)
