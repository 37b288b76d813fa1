"""SANP: per-sample, per-layer channel gating under a FLOPs budget (paper 002).

``gates``: the Saliency-and-Pruning Module, its binarization and the FIXED-K
and STATIC ablations, as modules of the core's gate hook. ``objective``:
Eq. 9-10's cost loss and its adaptive weight.
"""
