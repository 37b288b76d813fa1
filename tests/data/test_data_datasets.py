"""Registry, source resolution and validation split of `dynscale.data.load`."""

import gzip
import importlib.resources
import io
import lzma
import os
import pickle
import struct
import tarfile

import numpy as np
import pytest

from dynscale.data import DATA_DIR_ENV, DATASETS, load, split_indices
from dynscale.data.datasets import balanced_subset, dataset_spec

MNIST_NAMES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def write_mnist_like(directory, n_train: int, n_test: int, label: int):
  """Four idx .gz files with n_train/n_test images, every label `label`."""
  directory.mkdir(parents=True, exist_ok=True)
  arrays = (
      np.full((n_train, 28, 28), label, np.uint8),
      np.full(n_train, label, np.uint8),
      np.full((n_test, 28, 28), label, np.uint8),
      np.full(n_test, label, np.uint8),
  )
  for name, a in zip(MNIST_NAMES, arrays):
    header = struct.pack(">i", 2051 if a.ndim == 3 else 2049) + struct.pack(f">{a.ndim}i", *a.shape)
    with gzip.open(directory / name, "wb") as f:
      f.write(header + a.tobytes())


@pytest.fixture
def no_env(monkeypatch, tmp_path):
  """No DYNSCALE_DATA_DIR, and an empty tensorflow-datasets directory."""
  monkeypatch.delenv(DATA_DIR_ENV, raising=False)
  return str(tmp_path / "tfds")


def test_registry_names():
  assert set(DATASETS) == {"mnist", "fashion_mnist", "cifar10", "cifar100", "mnist_sample"}


def test_class_names_name_every_label_once():
  for name in DATASETS:
    spec = dataset_spec(name)
    if spec.class_names is not None:
      assert len(set(spec.class_names)) == len(spec.class_names) == spec.num_classes, name


@pytest.mark.parametrize("name, key", [("cifar10", "label_names"),
                                       ("cifar100", "fine_label_names")])
def test_class_names_are_the_releases_label_names(name, key):
  path = os.path.join(os.environ.get(DATA_DIR_ENV, ""), f"{name}_uint8.npz.xz")
  if not os.path.exists(path):
    pytest.skip(f"needs {name}_uint8.npz.xz under ${DATA_DIR_ENV}")
  with lzma.open(path) as f:
    release = np.load(io.BytesIO(f.read()))[key]
  assert dataset_spec(name).class_names == tuple(str(n) for n in release)


def test_unknown_name_lists_allowed():
  with pytest.raises(ValueError, match="dataset must be one of .*mnist_sample.*got 'imagenet'"):
    load("imagenet", val_size=0)


# --------------------------------------------------------------------------
# Source resolution


def test_data_dir_beats_env_var(tmp_path, monkeypatch):
  write_mnist_like(tmp_path / "arg", 6, 2, label=1)
  write_mnist_like(tmp_path / "env", 9, 3, label=2)
  monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "env"))
  ds = load("mnist", data_dir=str(tmp_path / "arg"), val_size=2)
  assert len(ds.train_x) + len(ds.val_x) == 6 and set(ds.train_y) == {1}
  assert str(tmp_path / "arg") in ds.source


def test_env_var_used_without_data_dir(tmp_path, monkeypatch):
  write_mnist_like(tmp_path / "env", 9, 3, label=2)
  monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "env"))
  ds = load("mnist", val_size=1)
  assert (len(ds.train_x), len(ds.val_x), len(ds.test_x)) == (8, 1, 3)
  assert ds.train_x.shape[1:] == (28, 28, 1) and ds.image_shape == (28, 28, 1)


def test_named_subdir_before_flat_dir(tmp_path, no_env):
  write_mnist_like(tmp_path, 5, 2, label=3)
  write_mnist_like(tmp_path / "mnist", 7, 2, label=4)
  ds = load("mnist", data_dir=tmp_path, val_size=0, tfds_data_dir=no_env)
  assert len(ds.train_x) == 7 and set(ds.test_y) == {4}


def test_fashion_mnist_only_from_its_subdir(tmp_path, no_env):
  write_mnist_like(tmp_path, 5, 2, label=3)  # flat files are MNIST
  with pytest.raises(FileNotFoundError, match="fashion_mnist"):
    load("fashion_mnist", data_dir=tmp_path, val_size=0, tfds_data_dir=no_env)
  write_mnist_like(tmp_path / "fashion-mnist", 4, 2, label=7)
  ds = load("fashion_mnist", data_dir=tmp_path, val_size=0, tfds_data_dir=no_env)
  assert set(ds.train_y) == {7}
  assert set(load("mnist", data_dir=tmp_path, val_size=0).train_y) == {3}


def test_missing_files_message(tmp_path, no_env):
  with pytest.raises(FileNotFoundError) as err:
    load("mnist", data_dir=tmp_path, val_size=0, tfds_data_dir=no_env)
  message = str(err.value)
  for expected in (*MNIST_NAMES, str(tmp_path / "mnist"), str(tmp_path), DATA_DIR_ENV, "'mnist'"):
    assert expected in message


def test_missing_cifar_message_lists_formats(tmp_path, no_env):
  with pytest.raises(FileNotFoundError) as err:
    load("cifar100", data_dir=tmp_path, val_size=0, tfds_data_dir=no_env)
  for expected in ("cifar-100-python.tar.gz", "cifar-100-python", "cifar100_uint8.npz.xz",
                   str(tmp_path / "cifar100")):
    assert expected in str(err.value)


def test_no_directory_at_all(no_env):
  with pytest.raises(FileNotFoundError, match=f"{DATA_DIR_ENV} is unset"):
    load("cifar10", val_size=0, tfds_data_dir=no_env)


def test_partial_mnist_is_not_found(tmp_path, no_env):
  write_mnist_like(tmp_path, 3, 1, label=0)
  os.remove(tmp_path / MNIST_NAMES[3])
  with pytest.raises(FileNotFoundError, match=MNIST_NAMES[3]):
    load("mnist", data_dir=tmp_path, val_size=0, tfds_data_dir=no_env)


def write_cifar10_npz_xz(path, n_train: int, n_test: int):
  rng = np.random.default_rng(0)
  buffer = io.BytesIO()
  np.savez(
      buffer,
      x_train=rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8),
      y_train=rng.integers(0, 10, n_train).astype(np.uint8),
      x_test=rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8),
      y_test=rng.integers(0, 10, n_test).astype(np.uint8),
  )
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(lzma.compress(buffer.getvalue()))


def test_cifar10_from_npz_xz_in_subdir(tmp_path, no_env):
  write_cifar10_npz_xz(tmp_path / "cifar10" / "cifar10_uint8.npz.xz", 6, 3)
  ds = load("cifar10", data_dir=tmp_path, val_size=2, seed=1)
  assert ds.train_x.shape == (4, 32, 32, 3) and ds.val_x.shape == (2, 32, 32, 3)
  assert ds.test_x.shape == (3, 32, 32, 3) and ds.num_classes == 10
  assert "cifar10_uint8.npz.xz" in ds.source


def write_cifar10_python_tarball(path):
  """The python release's layout, one image of class 9 per batch."""
  with tarfile.open(path, "w:gz") as tar:
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
      data = pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [9]})
      info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def test_cifar10_python_tarball_md5_noted(tmp_path, no_env):
  write_cifar10_python_tarball(tmp_path / "cifar-10-python.tar.gz")
  ds = load("cifar10", data_dir=tmp_path, val_size=1)
  assert (len(ds.train_x), len(ds.val_x), len(ds.test_x)) == (4, 1, 1)
  assert "md5 differs from the official release" in ds.source


def test_the_datasets_own_subdir_is_searched_before_any_form_in_the_flat_dir(tmp_path, no_env):
  """Directories first, forms within each: a python tarball in the flat
  directory (the first form) does not win over the npz.xz in ``cifar10/``."""
  write_cifar10_python_tarball(tmp_path / "cifar-10-python.tar.gz")
  write_cifar10_npz_xz(tmp_path / "cifar10" / "cifar10_uint8.npz.xz", 6, 3)
  ds = load("cifar10", data_dir=tmp_path, val_size=0, tfds_data_dir=no_env)
  assert len(ds.train_x) == 6 and str(tmp_path / "cifar10") in ds.source


def test_a_balanced_subset_is_drawn_across_each_class():
  """Uniform within each class, not its first examples: over 10 classes of
  200 examples, 20 drawn from each, the mean rank of the drawn ones within
  their class is near the middle (99.5; its spread over a uniform draw of
  200 is about 4), and the draw is the same on every call."""
  labels = np.random.default_rng(3).permutation(np.repeat(np.arange(10), 200))
  chosen = balanced_subset(labels, 200, 10)
  np.testing.assert_array_equal(chosen, balanced_subset(labels, 200, 10))
  assert np.all(np.diff(chosen) > 0)
  assert np.bincount(labels[chosen], minlength=10).tolist() == [20] * 10
  ranks = [np.searchsorted(np.flatnonzero(labels == labels[i]), i) for i in chosen]
  assert 80 < np.mean(ranks) < 120 and max(ranks) > 150


def test_bad_labels_rejected(tmp_path, no_env):
  write_mnist_like(tmp_path, 3, 1, label=10)
  with pytest.raises(ValueError, match=r"labels must be in \[0, 10\)"):
    load("mnist", data_dir=tmp_path, val_size=0)


# --------------------------------------------------------------------------
# Validation split


@pytest.mark.parametrize("n,val_size", [(10, 0), (10, 3), (10, 9), (1, 0)])
def test_split_indices_partition(n, val_size):
  train_idx, val_idx = split_indices(n, val_size, seed=0)
  assert len(val_idx) == val_size
  assert sorted(train_idx.tolist() + val_idx.tolist()) == list(range(n))


@pytest.mark.parametrize("val_size", [10, 11, -1])
def test_split_indices_out_of_range(val_size):
  with pytest.raises(ValueError, match=rf"val_size must be in \[0, 9\].*got {val_size}"):
    split_indices(10, val_size, seed=0)


@pytest.mark.parametrize("val_size", [-1, 1.5, True, "3"])
def test_load_rejects_bad_val_size_before_reading(val_size):
  with pytest.raises(ValueError, match="val_size"):
    load("mnist", data_dir="/nonexistent", val_size=val_size)


@pytest.mark.parametrize("field, value", [
    ("seed", -1), ("seed", 1.5), ("train_examples", -10), ("train_examples", 100.9),
    ("train_examples", "100"), ("train_examples", True)])
def test_load_rejects_a_bad_seed_or_train_examples_before_reading(field, value):
  """The data directory does not exist: the error must come before any read."""
  with pytest.raises(ValueError, match=rf"{field} must be a non-negative int"):
    load("mnist", data_dir="/nonexistent", val_size=10, **{field: value})


def test_val_size_too_large_names_range():
  with pytest.raises(ValueError, match=r"val_size must be in \[0, 3999\].*got 4000"):
    load("mnist_sample", val_size=4000)


# --------------------------------------------------------------------------
# The packaged MNIST sample


def rows_as_set(x):
  return {row.tobytes() for row in x}


def test_mnist_sample_shapes_and_balance():
  ds = load("mnist_sample", val_size=500, data_dir="/nonexistent")
  assert ds.name == "mnist_sample" and ds.num_classes == 10 and ds.image_shape == (28, 28, 1)
  assert ds.train_x.shape == (3500, 28, 28, 1) and ds.val_x.shape == (500, 28, 28, 1)
  assert ds.test_x.shape == (1000, 28, 28, 1)
  for x in (ds.train_x, ds.val_x, ds.test_x):
    assert x.dtype == np.uint8
  for y in (ds.train_y, ds.val_y, ds.test_y):
    assert y.dtype == np.int32
  train_counts = np.bincount(np.concatenate([ds.train_y, ds.val_y]), minlength=10)
  np.testing.assert_array_equal(train_counts, np.full(10, 400))
  np.testing.assert_array_equal(np.bincount(ds.test_y, minlength=10), np.full(10, 100))
  assert not ds.train_x.flags.writeable


def test_mnist_sample_pixel_statistics_match_mnist():
  """The sample's pixel mean/std are close to MNIST's published 0.1307/0.3081."""
  x = load("mnist_sample", val_size=0).train_x / 255.0
  assert abs(x.mean() - 0.1307) < 0.01 and abs(x.std() - 0.3081) < 0.01


def test_val_split_disjoint_and_deterministic():
  full = load("mnist_sample", val_size=0)
  a = load("mnist_sample", val_size=300, seed=3)
  b = load("mnist_sample", val_size=300, seed=3)
  c = load("mnist_sample", val_size=300, seed=4)
  assert full.val_x.shape == (0, 28, 28, 1) and full.val_y.shape == (0,)
  np.testing.assert_array_equal(a.val_x, b.val_x)
  np.testing.assert_array_equal(a.train_y, b.train_y)
  assert not np.array_equal(a.val_x, c.val_x)
  # train + val is exactly the full training split, with nothing in both.
  paired = lambda x, y: {r + bytes([int(l)]) for r, l in zip(map(np.ndarray.tobytes, x), y)}
  train, val = paired(a.train_x, a.train_y), paired(a.val_x, a.val_y)
  assert not train & val
  assert train | val == paired(full.train_x, full.train_y)
  np.testing.assert_array_equal(a.test_x, full.test_x)


@pytest.mark.skipif(not os.environ.get(DATA_DIR_ENV),
                    reason=f"needs real MNIST under ${DATA_DIR_ENV}")
def test_mnist_sample_matches_original_files():
  mnist = load("mnist", val_size=0)
  with (importlib.resources.files("dynscale.data") / "mnist_sample.npz").open("rb") as f:
    sample = dict(np.load(f))
  np.testing.assert_array_equal(sample["train_x"], mnist.train_x[sample["train_index"]])
  np.testing.assert_array_equal(sample["train_y"], mnist.train_y[sample["train_index"]])
  np.testing.assert_array_equal(sample["test_x"], mnist.test_x[sample["test_index"]])
  np.testing.assert_array_equal(sample["test_y"], mnist.test_y[sample["test_index"]])


def test_a_balanced_training_subset_is_the_same_for_every_seed_and_holds_validation():
  full = load("mnist_sample", val_size=0)
  a = load("mnist_sample", val_size=100, seed=0, train_examples=1000)
  b = load("mnist_sample", val_size=100, seed=1, train_examples=1000)
  assert (len(a.train_y), len(a.val_y)) == (900, 100)
  labels = np.concatenate([a.train_y, a.val_y])
  assert np.bincount(labels, minlength=10).tolist() == [100] * 10
  def rows(d):
    return {x.tobytes() for x in np.concatenate([d.train_x, d.val_x])}
  assert rows(a) == rows(b)            # one subset, whatever the seed ...
  assert {x.tobytes() for x in a.val_x} != {x.tobytes() for x in b.val_x}  # ... its own val
  assert rows(a) <= {x.tobytes() for x in full.train_x}
  np.testing.assert_array_equal(a.test_x, full.test_x)  # the full test split


@pytest.mark.parametrize("size", [999, 5])
def test_a_subset_that_is_not_a_positive_multiple_of_the_classes_is_refused(size):
  with pytest.raises(ValueError, match=r"train_examples must be a positive multiple of the "
                                       r"10 classes"):
    load("mnist_sample", val_size=10, train_examples=size)
