"""002 Table 1 (CIFAR-10) at the paper's scale, for a GPU: ``:m_cifarnet``,
``:vgg19``, ``:resnet18``, each at the FLOPs SANP reached there.

| backbone | unpruned error | unpruned FLOPs | SANP error | SANP FLOPs (budget) |
|---|---|---|---|---|
| M-CifarNet | 8.63% | 174.3 M | 9.41% | 39.3 M (22.5%) |
| VGGNet (VGG-19) | 6.34% | 398.5 M | 6.18% | 133.9 M (33.6%) |
| ResNet-18 | 5.40% | 501 M | 5.64% | 163 M (32.5%) |

ResNet-18's 501 M is Table 1's; §4.1.1's formula gives 556 M for the CIFAR
ResNet-18 (ours: 555.4 M), so its budget is the printed ratio 163 / 501.
Settings: :func:`experiments.configs.common.sanp_paper`.
"""

from experiments.configs import common

BUDGETS = {"m_cifarnet": 39.3 / 174.3, "vgg19": 133.9 / 398.5, "resnet18": 163 / 501}


def get_config(arg: str = "m_cifarnet"):
  return common.sanp_paper_table("sanp_cifar10 backbone", "002 Table 1", "cifar10", BUDGETS, arg)
