r"""The same network in PyTorch, timed on the same cores (never a dependency of dynscale).

python3 benchmarks/torch_reference.py --arch=ARCH.json --batch=64 --repeats=5

Runs under any Python that has PyTorch (e.g. Debian's ``python3-torch``)
and imports nothing from dynscale: :mod:`benchmarks.torch_side_by_side`
writes the architecture (the dict :func:`dynscale.nn.models.architecture`
returns) to a JSON file, runs this script in its own process and compares.
The network is rebuilt layer by layer from that dict (kinds ``conv``,
``dense``, ``sconv``, ``resblock``, ``invres``, ``maxpool``,
``global_avgpool``, ``flatten``; batch norm, biases, shortcuts and
activations as dynscale's ``dynscale.nn.kinds`` defines them; IDP profiles
are left out: they are dynscale's per-channel weights, not the network's
work). Prints one JSON line: the parameter count and the multiply-adds per
image (the driver checks them against ``dynscale.nn.costs``), images/s of a train step (SGD with
momentum, cross-entropy, batch norm in train mode) and of inference
(evaluation mode, no autograd), each the median of ``--repeats`` timed
calls after two warm-up calls, and the threads used.
"""

import argparse
import json
import os
import statistics
import time

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "relu6": nn.ReLU6, None: nn.Identity}


def _activation(name):
  if name not in ACTIVATIONS:
    raise ValueError(f"activation {name!r} has no PyTorch reference (allowed: "
                     f"{sorted(k for k in ACTIVATIONS if k)} or none)")
  return ACTIVATIONS[name]()


def _conv_bn(eps, c_in, c_out, kernel, stride, *, bn=True, groups=1, padding=None):
  """Conv (no bias under batch norm, as dynscale's) and its batch norm, as a list."""
  padding = (kernel - 1) // 2 if padding is None else padding
  conv = nn.Conv2d(c_in, c_out, kernel, stride, padding, groups=groups, bias=not bn)
  return [conv] + ([nn.BatchNorm2d(c_out, eps=eps)] if bn else [])


class Residual(nn.Module):
  """``act(body(x) + shortcut(x))``; shortcut None is the identity."""

  def __init__(self, body, shortcut, act):
    super().__init__()
    self.body, self.shortcut, self.act = body, shortcut, act

  def forward(self, x):
    return self.act(self.body(x) + (x if self.shortcut is None else self.shortcut(x)))


def _tied(layer, c_in):
  """Whether a residual block adds its input as it is (``dynscale.nn.kinds``)."""
  if layer["shortcut"] == "auto":
    return layer["stride"] == 1 and c_in == layer["features"]
  return layer["shortcut"] == "identity"


def build(arch):
  """The PyTorch module of a dynscale architecture dict, NCHW."""
  eps = arch["bn_epsilon"]
  h, w, c = arch["input_shape"]
  modules = []
  for i, layer in enumerate(arch["layers"]):
    kind = layer["kind"]
    if layer.get("binary"):
      raise ValueError(f"layers[{i}] is binarized: no PyTorch reference")
    if kind == "conv":
      k, s = layer["kernel"], layer["stride"]
      same = layer["padding"] == "SAME"
      modules += _conv_bn(eps, c, layer["features"], k, s, bn=layer["bn"],
                          padding=None if same else 0)
      modules.append(_activation(layer["act"]))
      h, w = ((-(-h // s), -(-w // s)) if same else ((h - k) // s + 1, (w - k) // s + 1))
      c = layer["features"]
    elif kind == "dense":
      m = layer["features"]
      modules.append(nn.Linear(c, m, bias=not layer["bn"]))
      if layer["bn"]:
        modules.append(nn.BatchNorm1d(m, eps=eps))
      modules.append(_activation(layer["act"]))
      c = m
    elif kind == "sconv":
      k, s, act = layer["kernel"], layer["stride"], layer["act"]
      modules += _conv_bn(eps, c, c, k, s, bn=layer["bn"], groups=c)
      modules.append(_activation(act))
      modules += _conv_bn(eps, c, layer["features"], 1, 1, bn=layer["bn"])
      modules.append(_activation(act))
      h, w, c = -(-h // s), -(-w // s), layer["features"]
    elif kind == "resblock":
      s, m, act = layer["stride"], layer["features"], layer["act"]
      mid = layer["mid_features"] or m
      body = nn.Sequential(*_conv_bn(eps, c, mid, 3, s), _activation(act),
                           *_conv_bn(eps, mid, m, 3, 1))
      shortcut = None if _tied(layer, c) else nn.Sequential(*_conv_bn(eps, c, m, 1, s))
      modules.append(Residual(body, shortcut, _activation(act)))
      h, w, c = -(-h // s), -(-w // s), m
    elif kind == "invres":
      s, m = layer["stride"], layer["features"]
      mid = c if layer["expansion"] == 1 else (layer["mid_features"] or layer["expansion"] * c)
      expand = [] if layer["expansion"] == 1 else [*_conv_bn(eps, c, mid, 1, 1), nn.ReLU6()]
      body = nn.Sequential(*expand, *_conv_bn(eps, mid, mid, 3, s, groups=mid), nn.ReLU6(),
                           *_conv_bn(eps, mid, m, 1, 1))
      modules.append(body if not _tied(layer, c) else Residual(body, None, nn.Identity()))
      h, w, c = -(-h // s), -(-w // s), m
    elif kind == "maxpool":
      win, s = layer["window"], layer["stride"]
      modules.append(nn.MaxPool2d(win, s))
      h, w = (h - win) // s + 1, (w - win) // s + 1
    elif kind == "global_avgpool":
      modules += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
      h, w = 1, 1
    elif kind == "flatten":
      modules.append(nn.Flatten())
      c, h, w = h * w * c, 1, 1
    else:
      raise ValueError(f"layers[{i}].kind {kind!r} has no PyTorch reference")
  return nn.Sequential(*modules)


def multiply_adds(model, input_shape):
  """Multiply-adds of one image, a bias add counting one (dynscale's FLOPs: SANP
  §4.1.1), counted by hooks on every convolution and linear layer."""
  total = [0]

  def count(module, inputs, output):
    per_output = (module.weight[0].numel() if isinstance(module, nn.Conv2d)
                  else module.in_features)
    total[0] += output[0].numel() * (per_output + (module.bias is not None))

  hooks = [m.register_forward_hook(count) for m in model.modules()
           if isinstance(m, (nn.Conv2d, nn.Linear))]
  model.eval()
  with torch.inference_mode():
    model(torch.zeros(1, input_shape[2], input_shape[0], input_shape[1]))
  for hook in hooks:
    hook.remove()
  return total[0]


def _median_seconds(fn, repeats):
  for _ in range(2):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def measure(arch, batch, repeats, channels_last=False, threads=None):
  """``{params, train_images_per_s, infer_images_per_s, threads}`` of the network."""
  torch.manual_seed(0)
  torch.set_num_threads(threads or os.cpu_count())
  model = build(arch)
  h, w, c = arch["input_shape"]
  x = torch.randn(batch, c, h, w)
  y = torch.randint(0, arch["num_classes"], (batch,))
  if channels_last:
    model, x = model.to(memory_format=torch.channels_last), x.contiguous(
        memory_format=torch.channels_last)
  optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
  loss_fn = nn.CrossEntropyLoss()

  def train():
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss_fn(model(x), y).backward()
    optimizer.step()

  def infer():
    model.eval()
    with torch.inference_mode():
      model(x)

  return {"params": sum(p.numel() for p in model.parameters()),
          "flops": multiply_adds(model, arch["input_shape"]),
          "train_images_per_s": batch / _median_seconds(train, repeats),
          "infer_images_per_s": batch / _median_seconds(infer, repeats),
          "threads": torch.get_num_threads(), "torch": torch.__version__,
          "channels_last": channels_last}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--arch", required=True, help="a dynscale architecture as JSON")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--channels_last", action="store_true")
  parser.add_argument("--threads", type=int, default=0, help="0: every core")
  args = parser.parse_args()
  with open(args.arch) as f:
    arch = json.load(f)
  print(json.dumps(measure(arch, args.batch, args.repeats, args.channels_last, args.threads)))


if __name__ == "__main__":
  main()
