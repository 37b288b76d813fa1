"""The model zoo: architecture dicts of the networks of papers 001 and 000.

Figure 6 of McDanel et al. (paper 001) and Figure 2 of TESLA (paper 000) did
not survive the text conversion (only their captions did), so the layer lists
below are reconstructed from the papers' text and captions, with widths from
the IDP authors' public reference implementation where the text gives none.
Each entry says what it rests on. In every model the first layer sees the raw
image and is a complete (CDP) layer, as the blue first layer of Fig. 6; the
default IDP layers follow the figures as described in the text:

* ``mlp`` (001 Fig. 6a, §IV-A.1, MNIST): "single hidden layer MLP":
  flatten -> FC 100 (ReLU) -> FC 10. IDP on the classifier, i.e. on the 100
  hidden units (IDP over raw pixels would drop whole image rows).
* ``tesla_mlp`` (000 Fig. 2a, §4.1, MNIST): "3-layer MLP, IDP applied to the
  first hidden layer": flatten -> FC 100 -> FC 100 -> FC 10, 100 units as in
  the reference MLP. 000 Eq. 2 puts gamma_j on the OUTPUTS of the first
  hidden layer, which is IDP on the INPUTS of the second FC layer here.
* ``vgg16`` (001 Fig. 6b, §IV-A.2, CIFAR-10; 000 §4.2): 13 3x3 Conv blocks
  (64, 64 | 128, 128 | 256 x3 | 512 x3 | 512 x3, a 2x2 max-pool after each
  group, so 32x32 reaches 1x1x512), FC 512 (BN, ReLU), FC classes. All but
  the first conv are IDP; the MP-IDP separate layers are the first conv (64
  3x3 filters) and the classifier (10 neurons), as §III says.
* ``mobilenet`` (001 Fig. 6c, §IV-A.3, CIFAR-10): MobileNet v1 for 32x32:
  Conv 32, 13 S-Conv blocks (64, 128/2, 128, 256/2, 256, 512/2, 512 x5,
  1024/2, 1024), global average pooling, FC classes. IDP on the pointwise
  parts (§II-C.3: "IDP is only applied to the pointwise convolution") and on
  the classifier.
* ``binary_net`` (001 Fig. 6d, §IV-A.4, MNIST): binarized weights in every
  layer (B-Conv / B-FC) with sign activations (Binarized Networks, 001 ref.
  [7]); device part B-Conv 8, B-Conv 8, pool; cloud part B-Conv 32 x2, pool,
  B-Conv 64 x2, pool, B-FC classes. All but the first layer are IDP; the
  B-FC sees a 3x3x64 map, so its profile is per channel.

* ``resnet18`` (He et al. 2016, CIFAR variant as in the common CIFAR code):
  a 3x3 conv 64 stem (stride 1, no pool), four stages of two basic blocks
  (64, 128/2, 256/2, 512/2), global average pooling, FC classes. The
  channels of each stage are one tied group (its residual adds); the first
  block of stages 2-4 projects its shortcut with a 1x1 conv.
* ``mobilenet_v2`` (Sandler et al. 2018, Table 2) for 32x32: a 3x3 conv 32
  stem, seventeen inverted residual blocks (t, c, n, s) = (1, 16, 1, 1),
  (6, 24, 2, s), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
  (6, 320, 1, 1), a 1x1 conv 1280, global average pooling, FC classes. The
  CIFAR variant changes two strides for 32x32 inputs: the stem and the
  24-channel stage use stride 1 instead of 2, so the last map is 4x4 (with
  the paper's strides it would be 1x1). ``mobilenet_v2_imagenet`` keeps the
  paper's strides (2 and 2): at 224x224 it is the published network (about
  300 M multiply-adds, 3.5 M parameters), at 32x32 it ends at 1x1 as
  CompactNet's code does.
* ``m_cifarnet`` (SANP, paper 002 §4.1, from FBS): 3x3 convs 64 (VALID),
  64, 128/2, 128, 128, 192/2, 192, 192, global average pooling, FC classes:
  174.3 M multiply-adds at 32x32.
* ``vgg19`` (SANP's "VGGNet", 002 Table 1: Network Slimming's CIFAR VGG-19,
  whose 6.34% / 26.74% unpruned errors SANP reports): sixteen 3x3 convs
  (64 x2 | 128 x2 | 256 x4 | 512 x4 | 512 x4) with a 2x2 max-pool after
  each of the first four groups, so 32x32 reaches 2x2x512, then global
  average pooling (NS's 2x2 average pool) and FC classes: 398.5 M FLOPs by
  SANP's formula, 20.04 M parameters.

In the residual networks every layer but the stem is IDP (a block's
profile weights the inputs of its convolutions, not of its shortcut).

``width_multiplier`` scales every hidden width (not the classifier), so tests
can build the same topologies tiny.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dynscale.nn import spec
from dynscale.nn.layers import GateFactory, IDPNet

Width = Callable[[int], int]


def _conv(features: int, *, idp: bool = True, kernel: int = 3, stride: int = 1,
          **extra: Any) -> dict:
  return {"kind": "conv", "features": features, "kernel": kernel, "stride": stride, "idp": idp,
          "bn": True, "act": "relu", **extra}


def _sconv(features: int, stride: int) -> dict:
  return {"kind": "sconv", "features": features, "kernel": 3, "stride": stride, "idp": True,
          "bn": True, "act": "relu"}


def _dense(features: int, *, idp: bool, bn: bool = False, act: str | None = None,
           **extra: Any) -> dict:
  return {"kind": "dense", "features": features, "idp": idp, "bn": bn, "act": act, **extra}


_POOL = {"kind": "maxpool", "window": 2}
_FLATTEN = {"kind": "flatten"}


def _mlp(width: Width, classes: int) -> list[dict]:
  return [_FLATTEN, _dense(width(100), idp=False, act="relu"), _dense(classes, idp=True)]


def _tesla_mlp(width: Width, classes: int) -> list[dict]:
  return [_FLATTEN, _dense(width(100), idp=False, act="relu"),
          _dense(width(100), idp=True, act="relu"), _dense(classes, idp=False)]


_VGG16_BLOCKS = ((64, 1), (128, 2), (256, 3), (512, 3), (512, 3))  # after the first conv


def _vgg16_convs(width: Width, pools: int) -> list[dict]:
  """VGG-16's 13 convs (the first complete), a max-pool after each of the first ``pools`` groups."""
  layers = [_conv(width(64), idp=False)]
  for group, (features, repeat) in enumerate(_VGG16_BLOCKS):
    layers += [_conv(width(features)) for _ in range(repeat)]
    layers += [_POOL] if group < pools else []
  return layers


def _vgg16(width: Width, classes: int) -> list[dict]:
  return _vgg16_convs(width, pools=5) + [
      _FLATTEN, _dense(width(512), idp=True, bn=True, act="relu"), _dense(classes, idp=True)]


def _vgg16_gap(width: Width, classes: int) -> list[dict]:
  """VGG-16 with a GAP head for class activation maps (000 §4.2; Zhou et al. 2016).

  Three max-pools instead of five keep a 4x4 map at 32x32 input; then global
  average pooling and one IDP linear classifier.
  """
  return _vgg16_convs(width, pools=3) + [{"kind": "global_avgpool"}, _dense(classes, idp=True)]


_MOBILENET_BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1),
                     (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))


def _mobilenet(width: Width, classes: int) -> list[dict]:
  return ([_conv(width(32), idp=False)]
          + [_sconv(width(f), s) for f, s in _MOBILENET_BLOCKS]
          + [{"kind": "global_avgpool"}, _dense(classes, idp=True)])


def _binary_net(width: Width, classes: int) -> list[dict]:
  def bconv(features: int, idp: bool = True) -> dict:
    return _conv(width(features), idp=idp, binary=True, act="sign")
  return [bconv(8, idp=False), bconv(8), _POOL, bconv(32), bconv(32), _POOL,
          bconv(64), bconv(64), _POOL, _FLATTEN,
          _dense(classes, idp=True, bn=True, binary=True)]


def _resnet18(width: Width, classes: int) -> list[dict]:
  blocks = [{"kind": "resblock", "features": width(features), "stride": stride, "idp": True}
            for features, first_stride in ((64, 1), (128, 2), (256, 2), (512, 2))
            for stride in (first_stride, 1)]
  return ([_conv(width(64), idp=False)] + blocks
          + [{"kind": "global_avgpool"}, _dense(classes, idp=True)])


_MOBILENET_V2_STAGES = ((1, 16, 1, 1), (6, 24, 2, None), (6, 32, 3, 2), (6, 64, 4, 2),
                        (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def _mobilenet_v2_layers(width: Width, classes: int, stem_stride: int,
                         second_stride: int) -> list[dict]:
  blocks = []
  for t, c, n, s in _MOBILENET_V2_STAGES:
    s = second_stride if s is None else s
    blocks += [{"kind": "invres", "features": width(c), "expansion": t,
                "stride": s if i == 0 else 1, "idp": True} for i in range(n)]
  return ([_conv(width(32), idp=False, stride=stem_stride, act="relu6")] + blocks
          + [_conv(width(1280), kernel=1, act="relu6"), {"kind": "global_avgpool"},
             _dense(classes, idp=True)])


def _mobilenet_v2(width: Width, classes: int) -> list[dict]:
  return _mobilenet_v2_layers(width, classes, stem_stride=1, second_stride=1)


def _mobilenet_v2_imagenet(width: Width, classes: int) -> list[dict]:
  return _mobilenet_v2_layers(width, classes, stem_stride=2, second_stride=2)


_VGG19_GROUPS = (64, 128, 256, 512, 512)


def _vgg19(width: Width, classes: int) -> list[dict]:
  """Network Slimming's CIFAR VGG-19 (SANP's "VGGNet", 002 Table 1)."""
  layers = []
  for group, features in enumerate(_VGG19_GROUPS):
    layers += [_conv(width(features), idp=bool(layers))
               for _ in range(2 if group < 2 else 4)]
    layers += [_POOL] if group < len(_VGG19_GROUPS) - 1 else []
  return layers + [{"kind": "global_avgpool"}, _dense(classes, idp=True)]


def _m_cifarnet(width: Width, classes: int) -> list[dict]:
  convs = [_conv(width(64), idp=False, padding="VALID")]
  convs += [_conv(width(f), stride=s) for f, s in ((64, 1), (128, 2), (128, 1), (128, 1),
                                                   (192, 2), (192, 1), (192, 1))]
  return convs + [{"kind": "global_avgpool"}, _dense(classes, idp=True)]


MODELS: dict[str, Callable[[Width, int], list[dict]]] = {
    "mlp": _mlp,
    "tesla_mlp": _tesla_mlp,
    "vgg16": _vgg16,
    "vgg16_gap": _vgg16_gap,
    "mobilenet": _mobilenet,
    "binary_net": _binary_net,
    "resnet18": _resnet18,
    "mobilenet_v2": _mobilenet_v2,
    "mobilenet_v2_imagenet": _mobilenet_v2_imagenet,
    "m_cifarnet": _m_cifarnet,
    "vgg19": _vgg19,
}


def _apply_idp_layers(layers: list[dict], idp_layers: str | Sequence[int]) -> None:
  """Sets ``idp`` on the parametric layers: 'all', 'none', or a list of indices."""
  parametric = [i for i, layer in enumerate(layers) if layer["kind"] in spec.PARAMETRIC_KINDS]
  if isinstance(idp_layers, str):
    if idp_layers not in ("all", "none"):
      raise ValueError(f"idp_layers must be 'all', 'none' or a list of layer indices, "
                       f"got {idp_layers!r}")
    chosen = set(parametric) if idp_layers == "all" else set()
  else:
    chosen = set()
    for i in idp_layers:
      if not isinstance(i, int) or isinstance(i, bool) or i not in parametric:
        raise ValueError(f"idp_layers entries must be indices of parametric layers "
                         f"{parametric}, got {i!r}")
      chosen.add(i)
  for i in parametric:
    layers[i] = {**layers[i], "idp": i in chosen}
    if not layers[i]["idp"]:
      layers[i].pop("idp_depthwise", None)


def architecture(name: str, *, num_classes: int, input_shape: Sequence[int],
                 profile: str = "linear", idp_layers: str | Sequence[int] | None = None,
                 width_multiplier: float = 1.0,
                 mp_profiles: Sequence[Sequence[float]] | None = None) -> dict:
  """The architecture dict of zoo model ``name`` (validated, defaults filled in).

  Args:
    name: one of ``MODELS``.
    num_classes: classifier outputs.
    input_shape: ``[H, W, C]`` of one example (vgg16 and mobilenet expect
      32x32; vgg16 needs at least 32x32 for its five pools).
    profile: network profile, one of ``dynscale.idp.PROFILES``.
    idp_layers: which parametric layers are IDP: None (the paper's choice),
      'all', 'none', or a list of indices into the layer list.
    width_multiplier: scales every hidden width (rounded, at least 1).
    mp_profiles: MP-IDP DP ranges, e.g. ``[[0, .3], [.3, 1]]`` (001 §III).
  """
  if name not in MODELS:
    raise ValueError(f"model name must be one of {sorted(MODELS)}, got {name!r}")
  if isinstance(width_multiplier, bool) or not (isinstance(width_multiplier, (int, float))
                                                and width_multiplier > 0):
    raise ValueError(f"width_multiplier must be a positive number, got {width_multiplier!r}")
  layers = MODELS[name](lambda n: max(1, round(n * width_multiplier)), num_classes)
  layers = [dict(layer) for layer in layers]
  if idp_layers is not None:
    _apply_idp_layers(layers, idp_layers)
  return spec.validate_architecture({
      "name": name, "input_shape": list(input_shape), "num_classes": num_classes,
      "profile": profile, "profiles": None if mp_profiles is None else
      [list(r) for r in mp_profiles], "layers": layers})


def init_rngs(seed: int) -> nnx.Rngs:
  """Parameter-initialisation keys from ``seed``, on XLA's RBG generator.

  The layers' kernels are drawn on the host from these keys
  (:func:`dynscale.nn.layers.he_normal`); a gate module's initialisers (e.g.
  ``nnx.Linear``'s) are jitted once per distinct weight shape, which with
  the default threefry keys costs 1-6 s per shape on a CPU, with RBG about
  0.3 s. RBG is deterministic for a given backend, which is all that
  initialisation needs.
  """
  return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def build(arch: dict, *, rngs: nnx.Rngs, dtype=jnp.float32,
          gate: GateFactory | None = None) -> IDPNet:
  """The masked NNX network of ``arch`` (validated first), with the gate hook's modules.

  ``gate``: optional ``factory(name, in_channels, out_channels, rngs) ->
  module or None`` called for every gate point (:mod:`dynscale.nn.layers`).
  """
  return IDPNet(arch, rngs=rngs, dtype=dtype, gate=gate)
