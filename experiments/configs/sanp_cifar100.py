"""002 Table 2 (CIFAR-100) at the paper's scale, for a GPU: ``:vgg19``, ``:resnet18``.

| backbone | unpruned error | unpruned FLOPs | SANP error | SANP FLOPs (budget) |
|---|---|---|---|---|
| VGGNet (VGG-19) | 26.74% | 398.5 M | 26.47% | 170.6 M (42.8%) |
| ResNet-18 | 24.95% | 501 M | 25.20% | 189 M (37.7%) |

M-CifarNet has no unpruned CIFAR-100 baseline in 002. Settings:
:func:`experiments.configs.common.sanp_paper`.
"""

from experiments.configs import common

BUDGETS = {"vgg19": 170.6 / 398.5, "resnet18": 189 / 501}


def get_config(arg: str = "vgg19"):
  return common.sanp_paper_table("sanp_cifar100 backbone", "002 Table 2", "cifar100", BUDGETS, arg)
