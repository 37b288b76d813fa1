"""IDP and MP-IDP (paper 001): the kernels, and the training of the method.

This package re-exports the pure kernels of :mod:`dynscale.kernels.idp`
(profiles, masks, masked and sliced incomplete layers), so
``from dynscale import idp; idp.conv(...)`` works. The training submodules
are not imported here (``dynscale.nn`` imports this package for its kernels):

* :mod:`dynscale.idp.training`: train at one DP, evaluate across DPs (the
  original IDP recipe and the all-one baseline);
* :mod:`dynscale.idp.mpidp`: multiple-profile IDP (001 §III);
* :mod:`dynscale.idp.evaluation`: test accuracy across DPs under a named
  batch-norm mode, and the DP config checks, shared with TESLA.
"""

from dynscale.kernels.idp import (
    PROFILES,
    binarize,
    channel_mask,
    check_dp,
    check_profile,
    conv,
    conv_sliced,
    dense,
    dense_sliced,
    depthwise_conv,
    depthwise_conv_sliced,
    kept_width,
    masked_profile,
    matching_dp,
    num_kept,
    profile,
    resolve_profile,
    separable_conv,
    separable_conv_sliced,
)

__all__ = [
    "PROFILES", "binarize", "channel_mask", "check_dp", "check_profile", "conv", "conv_sliced",
    "dense", "dense_sliced", "depthwise_conv", "depthwise_conv_sliced", "kept_width",
    "masked_profile", "matching_dp",
    "num_kept", "profile", "resolve_profile", "separable_conv", "separable_conv_sliced",
]
