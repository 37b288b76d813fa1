"""002 Table 3 (§5.1) at the paper's scale, for a GPU: ResNet-18 on CIFAR-10,
SANP against FIXED-K and STATIC at about a third of the FLOPs pruned.

| model | test error | FLOPs (M / image) | pruned |
|---|---|---|---|
| FIXED K | 5.62% | 331 | 33.9% |
| STATIC | 5.48% | 337 | 32.8% |
| SANP | 5.41% | 333 | 33.5% |

The budget is SANP's 333 / 501 M. Settings:
:func:`experiments.configs.common.sanp_paper`.
"""

from experiments.configs import common

BUDGET = 333 / 501


def get_config():
  config = common.sanp_paper("cifar10", "resnet18", BUDGET)
  config.title = "002 Table 3: is each adaptiveness needed?"
  config.variants = {variant: common.overrides(**{"sanp.variant": variant})
                     for variant in ("fixed_k", "static", "sanp")}
  return config
