"""Pure JAX kernels, no Flax: :mod:`dynscale.kernels.idp` (incomplete dot products).

The method packages re-export what they build on (``dynscale.idp`` has the
IDP kernels), so ``from dynscale import idp; idp.conv(...)`` works too.
"""
