"""Readers of the datasets' distributed formats, against files written here by hand."""

import builtins
import gzip
import io
import lzma
import os
import pickle
import struct
import tarfile

import numpy as np
import pytest

from dynscale.data import formats
from dynscale.data.formats import CIFAR10, CIFAR100


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
  """An idx file written by hand: big-endian magic, dims as int32, raw data."""
  return struct.pack(">i", magic) + struct.pack(f">{array.ndim}i", *array.shape) + array.tobytes()


def write_file(path, data: bytes, compress: bool) -> None:
  with (gzip.open if compress else open)(path, "wb") as f:
    f.write(data)


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("magic,shape", [(2051, (3, 4, 5)), (2049, (7,))],
                         ids=["idx3-images", "idx1-labels"])
def test_read_idx_round_trip(tmp_path, compress, magic, shape):
  array = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
  path = tmp_path / ("f.idx.gz" if compress else "f.idx")
  write_file(path, idx_bytes(array, magic), compress)
  out = formats.read_idx(path)
  assert out.dtype == np.uint8 and out.shape == shape
  np.testing.assert_array_equal(out, array)


def test_read_idx_big_endian_int32(tmp_path):
  values = np.array([1, -2, 70000], dtype=">i4")
  path = tmp_path / "ints.idx"
  write_file(path,
             struct.pack(">i", 0x0C01) + struct.pack(">i", 3) + values.tobytes(),
             compress=False)
  np.testing.assert_array_equal(formats.read_idx(path), [1, -2, 70000])


@pytest.mark.parametrize(
    "data,message",
    [
        (struct.pack(">i", 0x01000803) + b"\0" * 16, "magic"),
        (struct.pack(">i", 0x0801) + struct.pack(">i", 10) + b"\0" * 9, "data bytes"),
        (struct.pack(">i", 0x0A01) + struct.pack(">i", 1) + b"\0", "type code"),
        (struct.pack(">i", 0x0801) + struct.pack(">i", 2) + b"\0" * 3, "data bytes"),
    ],
    ids=["bad-magic", "truncated", "bad-type", "trailing-bytes"],
)
def test_read_idx_rejects_malformed(tmp_path, data, message):
  path = tmp_path / "bad.gz"
  write_file(path, data, compress=True)
  with pytest.raises(ValueError, match=message) as err:
    formats.read_idx(path)
  assert str(path) in str(err.value)


def test_read_idx_corrupt_gzip(tmp_path):
  path = tmp_path / "x.gz"
  path.write_bytes(gzip.compress(idx_bytes(np.zeros(4, np.uint8), 2049))[:-6])
  with pytest.raises(ValueError, match="x.gz: corrupt gzip"):
    formats.read_idx(path)


def test_read_mnist_dir(tmp_path):
  rng = np.random.default_rng(1)
  train_x = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
  test_x = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
  train_y = np.array([0, 9, 3, 3, 1], np.uint8)
  test_y = np.array([7, 2, 5], np.uint8)
  for name, array, magic in zip(formats.MNIST_FILES, (train_x, train_y, test_x, test_y),
                                (2051, 2049) * 2):
    write_file(tmp_path / name, idx_bytes(array, magic), compress=True)
  splits = formats.read_mnist_dir(tmp_path)
  assert splits.train_x.shape == (5, 28, 28, 1) and splits.test_x.shape == (3, 28, 28, 1)
  assert splits.train_y.dtype == np.int32
  np.testing.assert_array_equal(splits.train_x[..., 0], train_x)
  np.testing.assert_array_equal(splits.test_x[..., 0], test_x)
  np.testing.assert_array_equal(splits.train_y, train_y)
  np.testing.assert_array_equal(splits.test_y, test_y)


def test_read_mnist_dir_label_count_mismatch(tmp_path):
  arrays = [np.zeros((2, 28, 28), np.uint8), np.zeros(3, np.uint8)] * 2
  for name, array, magic in zip(formats.MNIST_FILES, arrays, (2051, 2049) * 2):
    write_file(tmp_path / name, idx_bytes(array, magic), compress=True)
  with pytest.raises(ValueError, match="labels must be 2 integers"):
    formats.read_mnist_dir(tmp_path)


# --------------------------------------------------------------------------
# CIFAR, python version


def expected_hwc(row: np.ndarray) -> np.ndarray:
  """The CIFAR row layout spelled out: pixel (r, c) of channel ch is
    row[ch * 1024 + r * 32 + c]."""
  image = np.zeros((32, 32, 3), np.uint8)
  for ch in range(3):
    for r in range(32):
      for c in range(32):
        image[r, c, ch] = row[ch * 1024 + r * 32 + c]
  return image


def cifar_batches(variant, per_file: int, seed: int = 0):
  """{file name: (rows (per_file, 3072) uint8, labels list)} for every batch file."""
  rng = np.random.default_rng(seed)
  return {
      name: (
          rng.integers(0, 256, (per_file, 3072), dtype=np.uint8),
          [int(v) for v in rng.integers(0, variant.num_classes, per_file)],
      ) for name in variant.train_files + variant.test_files
  }


def python_batch_pickle(variant, rows, labels, protocol: int) -> bytes:
  batch = {b"data": rows, b"batch_label": b"testing batch", b"filenames": [b"x.png"] * len(rows)}
  if variant is CIFAR100:
    batch[b"fine_labels"] = labels
    batch[b"coarse_labels"] = [v // 5 for v in labels]
  else:
    batch[b"labels"] = labels
  return pickle.dumps(batch, protocol=protocol)


def write_members(tmp_path, members: dict, as_tarball: bool, tar_name: str):
  """Writes {relative path: bytes} as a .tar.gz (returns its path) or as files
    under tmp_path (returns tmp_path)."""
  if as_tarball:
    path = tmp_path / tar_name
    with tarfile.open(path, "w:gz") as tar:
      for name, data in members.items():
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path
  for name, data in members.items():
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_bytes(data)
  return tmp_path


def read_python(path, variant, as_tarball):
  if as_tarball:
    return formats.read_cifar_tarball(path, variant)
  return formats.read_cifar_folder(path, variant)


def check_cifar_splits(splits, variant, batches):
  train = [batches[f] for f in variant.train_files]
  test = [batches[f] for f in variant.test_files]
  for x, y, parts in ((splits.train_x, splits.train_y, train), (splits.test_x, splits.test_y,
                                                                test)):
    rows = np.concatenate([p[0] for p in parts])
    labels = sum((p[1] for p in parts), [])
    assert x.shape == (len(rows), 32, 32, 3) and x.dtype == np.uint8
    assert y.dtype == np.int32
    np.testing.assert_array_equal(y, labels)
    for i, row in enumerate(rows):
      np.testing.assert_array_equal(x[i], expected_hwc(row))


@pytest.mark.parametrize("as_tarball", [True, False], ids=["tarball", "folder"])
@pytest.mark.parametrize("protocol", [4, 5])
@pytest.mark.parametrize("variant", [CIFAR10, CIFAR100], ids=["cifar10", "cifar100"])
def test_cifar_python(tmp_path, variant, protocol, as_tarball):
  batches = cifar_batches(variant, per_file=2)
  members = {
      f"{variant.python_dir}/{name}": python_batch_pickle(variant, rows, labels, protocol)
      for name, (rows, labels) in batches.items()
  }
  members[f"{variant.python_dir}/readme.html"] = b"<html></html>"
  path = write_members(tmp_path, members, as_tarball, "python.tar.gz")
  check_cifar_splits(read_python(path, variant, as_tarball), variant, batches)


def test_cifar_pixel_layout_one_pixel(tmp_path):
  """Row 0 of data_batch_1 has R = 10, G = 20, B = 30 except pixel (row 1, col 2)."""
  batches = cifar_batches(CIFAR10, per_file=1)
  row = np.repeat(np.array([10, 20, 30], np.uint8), 1024)
  row[0 * 1024 + 1 * 32 + 2], row[1 * 1024 + 1 * 32 + 2], row[2 * 1024 + 1 * 32 + 2] = 1, 2, 3
  batches["data_batch_1"] = (row[None], [4])
  members = {
      f"cifar-10-batches-py/{n}": python_batch_pickle(CIFAR10, r, y, 4)
      for n, (r, y) in batches.items()
  }
  splits = formats.read_cifar_folder(write_members(tmp_path, members, False, ""), CIFAR10)
  assert splits.train_x[0, 1, 2].tolist() == [1, 2, 3]
  assert splits.train_x[0, 2, 1].tolist() == [10, 20, 30]
  assert splits.train_y[0] == 4


class Py2StylePickler(pickle._Pickler):
  """Writes pickles as Python 2's cPickle wrote CIFAR: every string as a byte
    string (BINSTRING) and numpy 1's module path numpy.core.multiarray."""

  dispatch = dict(pickle._Pickler.dispatch)

  def save_bytes(self, obj):
    self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
    self.memoize(obj)

  def save_str(self, obj):
    self.save_bytes(obj.encode("latin-1"))

  def save_global(self, obj, name=None):
    module = obj.__module__.replace("numpy._core", "numpy.core")
    self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
    self.memoize(obj)

  dispatch[bytes] = save_bytes
  dispatch[str] = save_str


def test_cifar_python2_style_pickle(tmp_path):
  rows = np.random.default_rng(3).integers(0, 256, (2, 3072), dtype=np.uint8)
  buffer = io.BytesIO()
  Py2StylePickler(buffer, protocol=2).dump({b"data": rows, b"labels": [3, 8]})
  data = buffer.getvalue()
  assert b"numpy.core.multiarray\n_reconstruct" in data and b"_codecs" not in data
  batch = formats.restricted_unpickle(data, "data_batch_1")
  np.testing.assert_array_equal(batch[b"data"], rows)
  assert batch[b"labels"] == [3, 8]


# --------------------------------------------------------------------------
# Tampered pickles


class RunsShell:

  def __init__(self, command: str):
    self.command = command

  def __reduce__(self):
    return (os.system, (self.command,))


class RunsEval:

  def __init__(self, source: str):
    self.source = source

  def __reduce__(self):
    return (builtins.eval, (self.source,))


@pytest.mark.parametrize(
    "make_payload,global_name",
    [
        (lambda marker: RunsShell(f"echo pwned > {marker}"), "system"),
        (lambda marker: RunsEval(f"open({str(marker)!r}, 'w').write('pwned')"), "builtins.eval"),
    ],
    ids=["os.system", "builtins.eval"],
)
@pytest.mark.parametrize("as_tarball", [True, False], ids=["tarball", "folder"])
def test_tampered_pickle_refused(tmp_path, make_payload, global_name, as_tarball):
  marker = tmp_path / "side_effect"
  batches = cifar_batches(CIFAR10, per_file=1)
  members = {
      f"cifar-10-batches-py/{n}": python_batch_pickle(CIFAR10, r, y, 4)
      for n, (r, y) in batches.items()
  }
  members["cifar-10-batches-py/data_batch_2"] = pickle.dumps({
      b"data": make_payload(marker),
      b"labels": [0]
  })
  root = tmp_path / "data"
  root.mkdir()
  path = write_members(root, members, as_tarball, "cifar-10-python.tar.gz")
  with pytest.raises(ValueError, match="refusing to unpickle") as err:
    read_python(path, CIFAR10, as_tarball)
  assert "data_batch_2" in str(err.value) and global_name in str(err.value)
  assert not marker.exists()


def test_restricted_unpickle_refuses_plain_object():
  with pytest.raises(ValueError, match="collections.OrderedDict"):
    formats.restricted_unpickle(pickle.dumps(__import__("collections").OrderedDict(a=1)), "f")


def test_restricted_unpickle_garbage():
  with pytest.raises(ValueError, match="f.pkl: not a valid CIFAR pickle"):
    formats.restricted_unpickle(b"\x80\x04garbage", "f.pkl")


@pytest.mark.parametrize(
    "batch,message",
    [
        ({
            b"data": np.zeros((1, 3072), np.uint8),
            b"labels": [10]
        }, r"labels must be in \[0, 10\)"),
        ({
            b"data": np.zeros((1, 3072), np.uint8),
            b"labels": [-1]
        }, r"labels must be in \[0, 10\)"),
        ({
            b"data": np.zeros((1, 3071), np.uint8),
            b"labels": [1]
        }, "3072"),
        ({
            b"data": np.zeros((1, 3072), np.float32),
            b"labels": [1]
        }, "uint8"),
        ({
            b"data": np.zeros((2, 3072), np.uint8),
            b"labels": [1]
        }, "2 integers"),
        ({
            b"data": np.zeros((1, 3072), np.uint8)
        }, "b'labels'"),
    ],
    ids=["label-range", "negative-label", "row-length", "dtype", "label-count", "missing-key"],
)
def test_cifar_batch_validation(tmp_path, batch, message):
  batches = cifar_batches(CIFAR10, per_file=1)
  members = {
      f"cifar-10-batches-py/{n}": python_batch_pickle(CIFAR10, r, y, 4)
      for n, (r, y) in batches.items()
  }
  members["cifar-10-batches-py/test_batch"] = pickle.dumps(batch)
  with pytest.raises(ValueError, match=message):
    formats.read_cifar_folder(write_members(tmp_path, members, False, ""), CIFAR10)


def test_cifar_folder_missing_batch(tmp_path):
  (tmp_path / "cifar-10-batches-py").mkdir()
  with pytest.raises(FileNotFoundError, match="data_batch_1"):
    formats.read_cifar_folder(tmp_path, CIFAR10)


# --------------------------------------------------------------------------
# CIFAR, binary version


@pytest.mark.parametrize("as_tarball", [True, False], ids=["tarball", "folder"])
@pytest.mark.parametrize("variant", [CIFAR10, CIFAR100], ids=["cifar10", "cifar100"])
def test_cifar_binary(tmp_path, variant, as_tarball):
  batches = cifar_batches(variant, per_file=2, seed=5)
  members = {}
  for name, (rows, labels) in batches.items():
    records = b""
    for row, label in zip(rows, labels):
      # CIFAR-100 binary records: coarse label byte, fine label byte, pixels.
      prefix = bytes([label]) if variant is CIFAR10 else bytes([label // 5, label])
      records += prefix + row.tobytes()
    members[f"{variant.binary_dir}/{name}.bin"] = records
  path = write_members(tmp_path, members, as_tarball, "binary.tar.gz")
  if as_tarball:
    splits = formats.read_cifar_tarball(path, variant, binary=True)
  else:
    splits = formats.read_cifar_folder(path, variant, binary=True)
  check_cifar_splits(splits, variant, batches)


def test_cifar_binary_bad_length(tmp_path):
  members = {
      f"cifar-10-batches-bin/{n}.bin": b"\0" * 3073
      for n in CIFAR10.train_files + CIFAR10.test_files
  }
  members["cifar-10-batches-bin/data_batch_3.bin"] = b"\0" * 3000
  with pytest.raises(ValueError, match="data_batch_3.bin: length 3000"):
    formats.read_cifar_folder(write_members(tmp_path, members, False, ""), CIFAR10, binary=True)


# --------------------------------------------------------------------------
# npz.xz layout


@pytest.mark.parametrize("variant", [CIFAR10, CIFAR100], ids=["cifar10", "cifar100"])
def test_cifar_npz_xz_round_trip(tmp_path, variant):
  rng = np.random.default_rng(2)
  arrays = {
      "x_train": rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8),
      "y_train": rng.integers(0, variant.num_classes, 4).astype(np.uint8),
      "x_test": rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8),
      "y_test": rng.integers(0, variant.num_classes, 3).astype(np.uint8),
      "label_names": np.array([f"class{i}" for i in range(variant.num_classes)]),
  }
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  path = tmp_path / f"{variant.name}_uint8.npz.xz"
  path.write_bytes(lzma.compress(buffer.getvalue()))
  splits = formats.read_cifar_npz_xz(path, variant)
  for got, key in zip(splits, ("x_train", "y_train", "x_test", "y_test")):
    np.testing.assert_array_equal(got, arrays[key])
  assert splits.train_y.dtype == np.int32


def test_cifar_npz_xz_missing_array(tmp_path):
  buffer = io.BytesIO()
  np.savez(buffer, x_train=np.zeros((1, 32, 32, 3), np.uint8))
  path = tmp_path / "c.npz.xz"
  path.write_bytes(lzma.compress(buffer.getvalue()))
  with pytest.raises(ValueError, match="missing arrays"):
    formats.read_cifar_npz_xz(path, CIFAR10)


def test_cifar_npz_xz_never_unpickles(tmp_path):
  """An ``.npz`` member stored as a pickled object array is refused unread: with
  ``allow_pickle`` its payload would run while the array loads."""
  marker = tmp_path / "side_effect"
  payload = np.empty((1,), object)
  payload[0] = RunsEval(f"open({str(marker)!r}, 'w').write('pwned')")
  buffer = io.BytesIO()
  np.savez(buffer, x_train=np.zeros((1, 32, 32, 3), np.uint8), y_train=payload,
           x_test=np.zeros((1, 32, 32, 3), np.uint8), y_test=np.zeros((1,), np.uint8))
  path = tmp_path / "c.npz.xz"
  path.write_bytes(lzma.compress(buffer.getvalue()))
  with pytest.raises(ValueError, match="c.npz.xz: Object arrays cannot be loaded"):
    formats.read_cifar_npz_xz(path, CIFAR10)
  assert not marker.exists()


def test_cifar_npz_xz_not_xz(tmp_path):
  path = tmp_path / "c.npz.xz"
  path.write_bytes(b"not xz at all")
  with pytest.raises(ValueError, match="c.npz.xz"):
    formats.read_cifar_npz_xz(path, CIFAR10)


def test_file_md5(tmp_path):
  path = tmp_path / "f"
  path.write_bytes(b"abc")
  assert formats.file_md5(path) == "900150983cd24fb0d6963f7d28e17f72"  # RFC 1321 test vector
