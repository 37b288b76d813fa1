"""Named datasets: registry, source resolution and the validation split.

`load(name, val_size=...)` returns a `Dataset` of numpy uint8 NHWC images and
int32 labels with train / val / test splits. The validation split is carved
from the official training split (model selection never looks at test,
DESIGN.md invariant 8); test is the official test split, untouched.

Where the data comes from, first match wins:

1. A local directory: the `data_dir` argument, else the environment variable
   ``DYNSCALE_DATA_DIR``. It holds the datasets' own distributed files; for
   dataset ``<name>`` the loader looks in ``<dir>/<name>/`` and then ``<dir>/``
   itself, except Fashion-MNIST, which is looked for only in
   ``<dir>/fashion_mnist/`` or ``<dir>/fashion-mnist/`` (its files have the same
   names as MNIST's, so files directly in ``<dir>`` are always MNIST):

   ============== ======================================================
   mnist          ``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``,
                  ``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``
   fashion_mnist  the same four file names, in ``<dir>/fashion_mnist/``
   cifar10        one of ``cifar-10-batches-py/`` (the extracted python
                  tarball), ``cifar-10-python.tar.gz``, ``cifar-10-batches-bin/``,
                  ``cifar-10-binary.tar.gz``, ``cifar10_uint8.npz.xz``
   cifar100       one of ``cifar-100-python/``, ``cifar-100-python.tar.gz``,
                  ``cifar-100-binary/``, ``cifar-100-binary.tar.gz``,
                  ``cifar100_uint8.npz.xz`` (fine labels)
   ============== ======================================================

   (CIFAR formats are tried in that order.) The layout of ``../shared/data``
   (all files side by side) works as it is.
2. tensorflow-datasets, when it is installed and the dataset is already
   prepared in its data directory (`tfds_data_dir`, default ``TFDS_DATA_DIR``
   or ``~/tensorflow_datasets``) in a random-access format (``array_record``),
   or when ``download=True`` lets it download and prepare it.
3. Otherwise FileNotFoundError, naming the directories looked in and the files
   to put where.

``mnist_sample`` always comes from the package itself
(``dynscale/data/mnist_sample.npz``: 4,000 train + 1,000 test real MNIST
digits, see ``MNIST_SAMPLE_LICENSE.md``); it never reads a directory.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
from pathlib import Path
from typing import Callable

import numpy as np

from dynscale.data import formats
from dynscale.data.formats import CIFAR10, CIFAR100, MNIST_FILES, Splits

DATA_DIR_ENV = "DYNSCALE_DATA_DIR"
"""Environment variable naming the local data directory when `data_dir` is not given."""

_OFFICIAL_MD5 = {
    "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
    "cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85",
}


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """A loaded dataset. Arrays are read-only numpy.

    train_x, val_x, test_x: (N, H, W, C) uint8.
    train_y, val_y, test_y: (N,) int32 in [0, num_classes).
    source: where the data came from (path or package file, format).
    """

  name: str
  train_x: np.ndarray = dataclasses.field(repr=False)
  train_y: np.ndarray = dataclasses.field(repr=False)
  val_x: np.ndarray = dataclasses.field(repr=False)
  val_y: np.ndarray = dataclasses.field(repr=False)
  test_x: np.ndarray = dataclasses.field(repr=False)
  test_y: np.ndarray = dataclasses.field(repr=False)
  num_classes: int
  source: str

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of every image."""
    return tuple(self.train_x.shape[1:])


@dataclasses.dataclass(frozen=True)
class LocalFormat:
  """One on-disk form of a dataset: `paths` (relative to a searched
    directory) must all exist; `read(directory)` then reads them. `note`
    explains the form in error messages."""

  paths: tuple[str, ...]
  read: Callable[[Path], Splits]
  note: str


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """Registry entry: how to find and check a named dataset.

    subdirs: subdirectories of the data directory searched, in order;
      ``""`` is the data directory itself.
    formats: local forms, tried in order within each searched directory.
    tfds_name: the tensorflow-datasets name, or None for package-only data.
    class_names: the name of each label, in label order (the release's
      metadata), or None where the label is its own name (digits).
    """

  num_classes: int
  image_shape: tuple[int, int, int]
  subdirs: tuple[str, ...]
  formats: tuple[LocalFormat, ...]
  tfds_name: str | None
  class_names: tuple[str, ...] | None = None


def _cifar_formats(variant: formats.CifarVariant, python_tar: str, binary_tar: str,
                   npz_xz: str) -> tuple[LocalFormat, ...]:
  return (
      LocalFormat((variant.python_dir,), lambda d: formats.read_cifar_folder(d, variant),
                  f"folder, extracted {python_tar}"),
      LocalFormat((python_tar,), lambda d: formats.read_cifar_tarball(d / python_tar, variant),
                  "python version"),
      LocalFormat(
          (variant.binary_dir,),
          lambda d: formats.read_cifar_folder(d, variant, binary=True),
          f"folder, extracted {binary_tar}",
      ),
      LocalFormat((binary_tar,),
                  lambda d: formats.read_cifar_tarball(d / binary_tar, variant, binary=True),
                  "binary version"),
      LocalFormat((npz_xz,), lambda d: formats.read_cifar_npz_xz(d / npz_xz, variant),
                  "uint8 arrays, .npz in .xz"),
  )


_MNIST_LOCAL = (LocalFormat(MNIST_FILES, formats.read_mnist_dir,
                            "the four original idx .gz files"),)

# The label names of the releases' metadata (``batches.meta`` / ``meta``), in label order.
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
    "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox",
    "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard",
    "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse",
    "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck",
    "pine_tree", "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray",
    "road", "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail",
    "snake", "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle",
    "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)

_REGISTRY: dict[str, DatasetSpec] = {
    "mnist":
        DatasetSpec(10, (28, 28, 1), ("mnist", ""), _MNIST_LOCAL, "mnist"),
    "fashion_mnist":
        DatasetSpec(10, (28, 28, 1), ("fashion_mnist", "fashion-mnist"), _MNIST_LOCAL,
                    "fashion_mnist"),
    "cifar10":
        DatasetSpec(
            10,
            (32, 32, 3),
            ("cifar10", ""),
            _cifar_formats(CIFAR10, "cifar-10-python.tar.gz", "cifar-10-binary.tar.gz",
                           "cifar10_uint8.npz.xz"),
            "cifar10",
            CIFAR10_CLASSES,
        ),
    "cifar100":
        DatasetSpec(
            100,
            (32, 32, 3),
            ("cifar100", ""),
            _cifar_formats(CIFAR100, "cifar-100-python.tar.gz", "cifar-100-binary.tar.gz",
                           "cifar100_uint8.npz.xz"),
            "cifar100",
            CIFAR100_CLASSES,
        ),
    "mnist_sample":
        DatasetSpec(10, (28, 28, 1), (), (), None),
}

DATASETS: tuple[str, ...] = tuple(_REGISTRY)
"""Names accepted by `load`."""

MNIST_SAMPLE_FILE = "mnist_sample.npz"


def dataset_spec(name: str) -> DatasetSpec:
  """The registry entry of `name`; ValueError listing the names otherwise."""
  if name not in _REGISTRY:
    raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
  return _REGISTRY[name]


# --------------------------------------------------------------------------
# Sources


def _describe(fmt: LocalFormat) -> str:
  return " + ".join(fmt.paths)


def _source_note(directory: Path, fmt: LocalFormat) -> str:
  """Human-readable source, with the md5 verdict for official tarballs."""
  note = f"local files in {directory}: {_describe(fmt)}"
  official = _OFFICIAL_MD5.get(fmt.paths[0])
  if official is not None:
    verdict = "matches" if formats.file_md5(directory /
                                            fmt.paths[0]) == official else "differs from"
    note += f" (md5 {verdict} the official release)"
  return note


def _from_directory(name: str, root: Path) -> tuple[Splits, str] | None:
  """First local form of `name` found under `root`, read; None when none is there."""
  entry = dataset_spec(name)
  for sub in entry.subdirs:
    directory = root / sub
    for fmt in entry.formats:
      if all((directory / p).exists() for p in fmt.paths):
        return fmt.read(directory), _source_note(directory, fmt)
  return None


def _from_tfds(name: str, tfds_data_dir: str | None, download: bool) -> tuple[Splits, str] | str:
  """Reads `name` through tensorflow-datasets' random-access data source.

    Returns (splits, source) or, when tfds is missing or cannot provide the
    data, the reason as a string.
    """
  try:
    import tensorflow_datasets as tfds  # optional dependency, imported only here
  except ImportError:
    return "tensorflow-datasets is not installed"
  tfds_name = dataset_spec(name).tfds_name
  try:
    builder = tfds.builder(tfds_name, data_dir=tfds_data_dir, file_format="array_record")
    if not (download or builder.is_prepared()):
      return f"tensorflow-datasets has not prepared '{tfds_name}' in {builder.data_dir} (download=False)"
    if download:
      builder.download_and_prepare()
    arrays = []
    for source in builder.as_data_source(split=["train", "test"]):
      records = source.__getitems__(range(len(source)))
      arrays += [np.stack([r["image"] for r in records]), np.asarray([r["label"] for r in records])]
  except Exception as e:  # tfds raises many kinds; all mean "not available here"
    return f"tensorflow-datasets could not provide '{tfds_name}' ({type(e).__name__}: {e})"
  return Splits(*arrays), f"tensorflow-datasets '{tfds_name}' in {builder.data_dir} (array_record)"


def _not_found_message(name: str, root: tuple[Path, str] | None, tfds_reason: str) -> str:
  entry = dataset_spec(name)
  if root is None:
    looked = f"no directory (no data_dir given and {DATA_DIR_ENV} is unset)"
  else:
    looked = " and ".join(f"{root[0] / sub}" for sub in entry.subdirs) + f" (from the {root[1]})"
  where = " or ".join(f"<dir>/{sub}/" if sub else "<dir>/" for sub in entry.subdirs)
  wanted = "\n".join(f"  - {_describe(fmt)} ({fmt.note})" for fmt in entry.formats)
  return (f"dataset '{name}' not found. Looked in: {looked}. {tfds_reason}.\n"
          f"Put one of these into {where}:\n{wanted}\n"
          f"and pass data_dir=<dir> or set {DATA_DIR_ENV}=<dir>.")


def _read_sample() -> tuple[Splits, str]:
  resource = importlib.resources.files("dynscale.data") / MNIST_SAMPLE_FILE
  with resource.open("rb") as f, np.load(f, allow_pickle=False) as arrays:
    splits = Splits(arrays["train_x"], arrays["train_y"], arrays["test_x"], arrays["test_y"])
  return splits, (
      f"package file dynscale/data/{MNIST_SAMPLE_FILE}: 4000 train + 1000 test MNIST digits, "
      "class-balanced draw from the original files (CC BY-SA 3.0, LeCun & Cortes)")


def _data_root(data_dir: str | None) -> tuple[Path, str] | None:
  """(local data directory, where it came from): `data_dir`, else $DYNSCALE_DATA_DIR."""
  if data_dir is not None:
    return Path(data_dir), "data_dir argument"
  if os.environ.get(DATA_DIR_ENV):
    return Path(os.environ[DATA_DIR_ENV]), f"{DATA_DIR_ENV} environment variable"
  return None


def _read_named(name: str, data_dir: str | None, tfds_data_dir: str | None,
                download: bool) -> tuple[Splits, str]:
  if name == "mnist_sample":
    return _read_sample()
  root = _data_root(data_dir)
  if root is not None:
    found = _from_directory(name, root[0])
    if found is not None:
      return found
  found = _from_tfds(name, tfds_data_dir, download)
  if isinstance(found, str):
    raise FileNotFoundError(_not_found_message(name, root, found))
  return found


# --------------------------------------------------------------------------
# Validation split


def split_indices(n: int, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Disjoint (train_idx, val_idx) covering range(n), each sorted ascending.

    val_idx is `val_size` indices drawn uniformly without replacement with
    ``numpy.random.default_rng(seed)``; train_idx is the rest.
    """
  if not 0 <= val_size < n:
    raise ValueError(
        f"val_size must be in [0, {n - 1}] (the training split has {n} examples), got {val_size}")
  perm = np.random.default_rng(seed).permutation(n)
  return np.sort(perm[val_size:]), np.sort(perm[:val_size])


SUBSET_SEED = 0
"""Seed of :func:`balanced_subset`: one fixed subset, whatever the run's seed."""


def balanced_subset(labels: np.ndarray, size: int, num_classes: int) -> np.ndarray:
  """Sorted indices of ``size`` examples, ``size / num_classes`` of each class,
  drawn uniformly within each class with ``numpy.random.default_rng(SUBSET_SEED)``."""
  per_class, remainder = divmod(size, num_classes)
  if remainder or size <= 0:
    raise ValueError(f"train_examples must be a positive multiple of the {num_classes} "
                     f"classes, got {size}")
  rng = np.random.default_rng(SUBSET_SEED)
  chosen = []
  for c in range(num_classes):
    members = np.flatnonzero(labels == c)
    if len(members) < per_class:
      raise ValueError(f"train_examples={size} needs {per_class} examples of class {c}; "
                       f"the training split has {len(members)}")
    chosen.append(rng.choice(members, per_class, replace=False))
  return np.sort(np.concatenate(chosen))


def _readonly(a: np.ndarray) -> np.ndarray:
  a.setflags(write=False)
  return a


def load(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    val_size: int,
    seed: int = 0,
    train_examples: int = 0,
    tfds_data_dir: str | None = None,
    download: bool = False,
) -> Dataset:
  """Loads a named dataset with a validation split carved from train.

    Args:
      name: one of `DATASETS`.
      data_dir: local directory with the datasets' distributed files (see the
        module docstring for the layout); default ``$DYNSCALE_DATA_DIR``.
      val_size: number of training examples held out as validation, in
        [0, len(train) - 1]; 0 gives empty val arrays.
      seed: seed of the validation draw (same seed, same split).
      train_examples: 0 for the whole training split, else a class-balanced
        subset of it of this size (:func:`balanced_subset`, the same subset
        for every seed); validation is carved from the subset.
      tfds_data_dir: tensorflow-datasets data directory (default: tfds's own).
      download: let tensorflow-datasets download and prepare the dataset
        when it is not found locally (needs network access).

    Returns:
      A `Dataset`; train and val keep the original order of the training file.

    Raises:
      ValueError: unknown `name`, bad `val_size`/`seed`, or malformed files.
      FileNotFoundError: no source has the dataset (the message says which
        files to put where).
    """
  entry = dataset_spec(name)
  if isinstance(val_size, bool) or not isinstance(val_size, (int, np.integer)) or val_size < 0:
    raise ValueError(f"val_size must be a non-negative int, got {val_size!r}")
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed must be a non-negative int, got {seed!r}")
  if (isinstance(train_examples, bool) or not isinstance(train_examples, (int, np.integer))
      or train_examples < 0):
    raise ValueError(f"train_examples must be a non-negative int (0: all), got "
                     f"{train_examples!r}")
  splits, source = _read_named(name, None if data_dir is None else str(data_dir), tfds_data_dir,
                               download)
  splits = formats.validated_splits(splits,
                                    image_shape=entry.image_shape,
                                    num_classes=entry.num_classes,
                                    where=source)
  if train_examples:
    subset = balanced_subset(splits.train_y, int(train_examples), entry.num_classes)
    splits = Splits(splits.train_x[subset], splits.train_y[subset], splits.test_x,
                    splits.test_y)
  train_idx, val_idx = split_indices(len(splits.train_x), int(val_size), int(seed))
  arrays = [
      splits.train_x[train_idx],
      splits.train_y[train_idx],
      splits.train_x[val_idx],
      splits.train_y[val_idx],
      splits.test_x,
      splits.test_y,
  ]
  return Dataset(name, *map(_readonly, arrays), num_classes=entry.num_classes, source=source)
