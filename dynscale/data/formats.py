"""Readers for the datasets' own distributed file formats.

Pure readers: each takes a path and returns numpy arrays; none downloads,
caches or looks at the environment. Everything comes back as a `Splits` of
uint8 NHWC images and int32 labels.

Formats:

* idx (MNIST, Fashion-MNIST): big-endian header, magic ``0x0000TTDD`` with
  type code ``TT`` and ``DD`` dimensions (2051 = uint8 images of rank 3, 2049 =
  uint8 labels of rank 1), then the dimensions as int32, then the data;
  optionally gzip-compressed (``.gz``).
* CIFAR "python version" (``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``
  or their extracted folders): pickled dicts with ``b'data'`` uint8 (N, 3072),
  each row 1024 red, then 1024 green, then 1024 blue values, each plane a
  row-major 32x32 image. Read with `restricted_unpickle`, which can rebuild
  numpy arrays and nothing else: a pickle that names any other global (for
  instance ``os.system`` in a ``__reduce__``) is refused before anything runs.
* CIFAR "binary version" (``cifar-10-binary.tar.gz`` / ``cifar-100-binary.tar.gz``
  or their extracted folders): fixed-size records of label byte(s) then the
  same 3072 pixel bytes. No pickles involved.
* ``cifar10_uint8.npz.xz`` / ``cifar100_uint8.npz.xz``: an ``.npz`` inside an
  ``.xz`` stream with ``x_train`` (N, 32, 32, 3) uint8, ``y_train``,
  ``x_test``, ``y_test`` (read with ``allow_pickle=False``).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import lzma
import pickle
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
from numpy._core.multiarray import _reconstruct
from numpy._core.numeric import _frombuffer

MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
"""The four MNIST / Fashion-MNIST files, in the order train images, train
labels, test images, test labels (same names for both datasets)."""

# idx type code -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

CIFAR_PIXELS = 32 * 32 * 3

# The only globals a CIFAR pickle may name: what numpy's ndarray/dtype
# __reduce__ emits (numpy 1 module paths as written by the original Python 2
# cPickle files, numpy 2 paths as written by current numpy; `_frombuffer` is
# what numpy emits under pickle protocol 5).
_NDARRAY_GLOBALS = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
}


class Splits(NamedTuple):
  """A dataset's official train/test splits as read from disk.

    train_x, test_x: (N, H, W, C) uint8. train_y, test_y: (N,) int32.
    """

  train_x: np.ndarray
  train_y: np.ndarray
  test_x: np.ndarray
  test_y: np.ndarray


# --------------------------------------------------------------------------
# idx (MNIST, Fashion-MNIST)


def read_idx(path: str | Path) -> np.ndarray:
  """Reads one idx file (gzip-compressed when the name ends in ``.gz``).

    Returns the array in native byte order with the shape from the header.
    Raises ValueError naming the file when the header or length is wrong.
    """
  path = Path(path)
  opener = gzip.open if path.suffix == ".gz" else open
  try:
    with opener(path, "rb") as f:
      raw = f.read()
  except (gzip.BadGzipFile, EOFError, zlib.error) as e:
    raise ValueError(f"{path}: corrupt gzip stream ({e})") from e
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
    raise ValueError(f"{path}: not an idx file (magic must start with two zero bytes)")
  type_code, ndim = raw[2], raw[3]
  if type_code not in _IDX_DTYPES:
    raise ValueError(f"{path}: idx type code must be one of "
                     f"{sorted(hex(c) for c in _IDX_DTYPES)}, got {hex(type_code)}")
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise ValueError(f"{path}: truncated idx header ({len(raw)} bytes, need {header})")
  shape = struct.unpack(f">{ndim}i", raw[4:header])
  dtype = _IDX_DTYPES[type_code]
  expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  if len(raw) - header != expected:
    raise ValueError(f"{path}: idx header says shape {shape} ({expected} data bytes), "
                     f"file has {len(raw) - header}")
  data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
  return data.astype(dtype.newbyteorder("="))


def read_mnist_dir(directory: str | Path) -> Splits:
  """Reads the four `MNIST_FILES` from one directory (MNIST or Fashion-MNIST).

    Returns images (N, 28, 28, 1) uint8 and labels (N,) int32.
    """
  directory = Path(directory)
  arrays = [read_idx(directory / name) for name in MNIST_FILES]
  for name, images in zip(MNIST_FILES[0::2], arrays[0::2]):
    if images.ndim != 3 or images.dtype != np.uint8:
      raise ValueError(f"{directory / name}: images must be uint8 of rank 3, "
                       f"got {images.dtype} of shape {images.shape}")
  train_x, train_y, test_x, test_y = arrays
  return validated_splits(
      Splits(train_x[..., None], train_y, test_x[..., None], test_y),
      image_shape=(28, 28, 1),
      num_classes=10,
      where=str(directory),
  )


# --------------------------------------------------------------------------
# Validation shared by every reader


def validated_labels(labels: object, *, num_examples: int, num_classes: int,
                     where: str) -> np.ndarray:
  """Returns labels as (N,) int32 after checking count, integer type and range."""
  labels = np.asarray(labels)
  if labels.shape != (num_examples,) or not (np.issubdtype(labels.dtype, np.integer) or
                                             labels.size == 0):
    raise ValueError(f"{where}: labels must be {num_examples} integers, "
                     f"got {labels.dtype} of shape {labels.shape}")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"{where}: labels must be in [0, {num_classes}), "
                     f"got range [{labels.min()}, {labels.max()}]")
  return labels.astype(np.int32)


def validated_splits(splits: Splits, *, image_shape: tuple[int, int, int], num_classes: int,
                     where: str) -> Splits:
  """Checks images are (N, *image_shape) uint8 and labels match; returns int32 labels."""
  out = []
  for split, x, y in (("train", splits.train_x, splits.train_y), ("test", splits.test_x,
                                                                  splits.test_y)):
    x = np.asarray(x)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != image_shape:
      raise ValueError(
          f"{where}: {split} images must be uint8 (N, {', '.join(map(str, image_shape))}), "
          f"got {x.dtype} of shape {x.shape}")
    out += [
        x,
        validated_labels(y,
                         num_examples=len(x),
                         num_classes=num_classes,
                         where=f"{where} ({split})")
    ]
  return Splits(*out)


# --------------------------------------------------------------------------
# CIFAR


@dataclasses.dataclass(frozen=True)
class CifarVariant:
  """Where CIFAR-10 / CIFAR-100 keep their files and labels.

    python_dir, binary_dir: the folder inside the python / binary tarball.
    train_files, test_files: the batch files inside those folders (the binary
      ones add ``.bin``).
    label_key: the pickle dict key of the labels used (fine labels for 100).
    label_bytes: bytes before each binary record's pixels; the label used is
      the last of them (CIFAR-100 binary records are coarse, fine).
    """

  name: str
  num_classes: int
  python_dir: str
  binary_dir: str
  train_files: tuple[str, ...]
  test_files: tuple[str, ...]
  label_key: bytes
  label_bytes: int


CIFAR10 = CifarVariant(
    name="cifar10",
    num_classes=10,
    python_dir="cifar-10-batches-py",
    binary_dir="cifar-10-batches-bin",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_files=("test_batch",),
    label_key=b"labels",
    label_bytes=1,
)
CIFAR100 = CifarVariant(
    name="cifar100",
    num_classes=100,
    python_dir="cifar-100-python",
    binary_dir="cifar-100-binary",
    train_files=("train",),
    test_files=("test",),
    label_key=b"fine_labels",
    label_bytes=2,
)


class ForbiddenGlobalError(ValueError):
  """A pickle named a global outside the numpy array reconstruction set."""


class _NdarrayOnlyUnpickler(pickle.Unpickler):
  """An unpickler whose only reachable globals are `_NDARRAY_GLOBALS`."""

  def __init__(self, file: io.BufferedIOBase, filename: str):
    super().__init__(file, encoding="bytes")
    self._filename = filename

  def find_class(self, module: str, name: str) -> object:
    try:
      return _NDARRAY_GLOBALS[(module, name)]
    except KeyError:
      allowed = ", ".join(sorted(f"{m}.{n}" for m, n in _NDARRAY_GLOBALS))
      raise ForbiddenGlobalError(
          f"{self._filename}: refusing to unpickle the global '{module}.{name}'; "
          f"a CIFAR pickle may only name {allowed}") from None


def restricted_unpickle(data: bytes, filename: str) -> object:
  """Unpickles `data` allowing only the globals needed to rebuild numpy arrays.

    Strings written by Python 2 come back as bytes (``encoding='bytes'``), as
    the original CIFAR pickles expect. Raises `ForbiddenGlobalError` (a
    ValueError) naming `filename` and the global when one outside numpy's
    array reconstruction is named -- before it could be called -- and
    ValueError naming `filename` for any other malformed pickle.
    """
  try:
    return _NdarrayOnlyUnpickler(io.BytesIO(data), filename).load()
  except ForbiddenGlobalError:
    raise
  except Exception as e:  # any failure of a malformed pickle means a bad file
    raise ValueError(f"{filename}: not a valid CIFAR pickle ({type(e).__name__}: {e})") from e


def cifar_rows_to_nhwc(rows: np.ndarray) -> np.ndarray:
  """(N, 3072) rows of 1024 R, 1024 G, 1024 B (row-major 32x32) -> (N, 32, 32, 3)."""
  return rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def _cifar_pickle_batch(data: bytes, variant: CifarVariant,
                        filename: str) -> tuple[np.ndarray, np.ndarray]:
  """One python-version batch -> (images (N, 32, 32, 3) uint8, labels (N,) int32)."""
  batch = restricted_unpickle(data, filename)
  if not isinstance(batch, dict) or b"data" not in batch or variant.label_key not in batch:
    raise ValueError(f"{filename}: a {variant.name} batch must be a dict with keys b'data' and "
                     f"{variant.label_key!r}, got {type(batch).__name__}" +
                     (f" with keys {sorted(map(repr, batch))}" if isinstance(batch, dict) else ""))
  rows = batch[b"data"]
  if not isinstance(
      rows,
      np.ndarray) or rows.dtype != np.uint8 or rows.ndim != 2 or rows.shape[1] != CIFAR_PIXELS:
    raise ValueError(f"{filename}: b'data' must be a uint8 array (N, {CIFAR_PIXELS}), got " +
                     (f"{rows.dtype} of shape {rows.shape}"
                      if isinstance(rows, np.ndarray) else type(rows).__name__))
  labels = validated_labels(batch[variant.label_key],
                            num_examples=len(rows),
                            num_classes=variant.num_classes,
                            where=filename)
  return cifar_rows_to_nhwc(rows), labels


def _cifar_binary_batch(data: bytes, variant: CifarVariant,
                        filename: str) -> tuple[np.ndarray, np.ndarray]:
  """One binary-version batch -> (images (N, 32, 32, 3) uint8, labels (N,) int32)."""
  record = variant.label_bytes + CIFAR_PIXELS
  if len(data) % record:
    raise ValueError(
        f"{filename}: length {len(data)} is not a multiple of the {record}-byte record")
  records = np.frombuffer(data, dtype=np.uint8).reshape(-1, record)
  labels = validated_labels(
      records[:, variant.label_bytes - 1],
      num_examples=len(records),
      num_classes=variant.num_classes,
      where=filename,
  )
  return cifar_rows_to_nhwc(records[:, variant.label_bytes:]), labels


MemberReader = Callable[[str], bytes]
"""Returns the bytes of a member given its path inside a tarball/root folder."""


def _read_from_tar(path: Path) -> tuple[tarfile.TarFile, MemberReader]:
  tar = tarfile.open(path, "r:*")

  def read(member: str) -> bytes:
    try:
      info = tar.getmember(member)
    except KeyError:
      raise FileNotFoundError(f"{path}: no member '{member}' in the tarball") from None
    if not info.isfile():
      raise ValueError(f"{path}: member '{member}' is not a regular file")
    return tar.extractfile(info).read()

  return tar, read


def _read_cifar(read: MemberReader, variant: CifarVariant, *, binary: bool, where: str) -> Splits:
  folder = variant.binary_dir if binary else variant.python_dir
  suffix = ".bin" if binary else ""
  parse = _cifar_binary_batch if binary else _cifar_pickle_batch

  def split(files: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    members = [f"{folder}/{f}{suffix}" for f in files]
    batches = [parse(read(m), variant, f"{where}:{m}") for m in members]
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])

  return validated_splits(
      Splits(*split(variant.train_files), *split(variant.test_files)),
      image_shape=(32, 32, 3),
      num_classes=variant.num_classes,
      where=where,
  )


def read_cifar_tarball(path: str | Path, variant: CifarVariant, *, binary: bool = False) -> Splits:
  """Reads CIFAR from its python (``binary=False``) or binary tarball.

    Only the expected members are read, into memory; nothing is extracted.
    """
  path = Path(path)
  tar, read = _read_from_tar(path)
  with tar:
    return _read_cifar(read, variant, binary=binary, where=str(path))


def read_cifar_folder(root: str | Path, variant: CifarVariant, *, binary: bool = False) -> Splits:
  """Reads CIFAR from an extracted tarball: `root` holds ``cifar-10-batches-py/``
    (or ``cifar-100-python/``, ``cifar-10-batches-bin/``, ``cifar-100-binary/``)."""
  root = Path(root)
  return _read_cifar(lambda member: (root / member).read_bytes(),
                     variant,
                     binary=binary,
                     where=str(root))


def read_cifar_npz_xz(path: str | Path, variant: CifarVariant) -> Splits:
  """Reads the ``cifar10_uint8.npz.xz`` / ``cifar100_uint8.npz.xz`` layout
    (fine labels for CIFAR-100)."""
  path = Path(path)
  with lzma.open(path) as f:
    try:
      raw = f.read()
    except (lzma.LZMAError, EOFError) as e:
      raise ValueError(f"{path}: not a valid .xz stream ({e})") from e
  try:
    arrays = np.load(io.BytesIO(raw), allow_pickle=False)
  except (zipfile.BadZipFile, ValueError, OSError) as e:
    raise ValueError(f"{path}: the .xz stream does not hold an .npz ({e})") from e
  if not isinstance(arrays, np.lib.npyio.NpzFile):
    raise ValueError(f"{path}: the .xz stream holds a single array, not an .npz")
  with arrays:
    missing = {"x_train", "y_train", "x_test", "y_test"} - set(arrays.files)
    if missing:
      raise ValueError(f"{path}: missing arrays {sorted(missing)}; has {sorted(arrays.files)}")
    try:
      splits = Splits(arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"])
    except ValueError as e:  # an object array: numpy refuses to unpickle it
      raise ValueError(f"{path}: {e}") from e
  return validated_splits(splits,
                          image_shape=(32, 32, 3),
                          num_classes=variant.num_classes,
                          where=str(path))


def file_md5(path: str | Path) -> str:
  """Hex md5 of a file, read in 1 MiB chunks."""
  digest = hashlib.md5()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()
