"""bind and export: a function with its arrays bound, or saved with them and loaded,
gives what the function gives them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynscale import bound


def tree():
  rng = np.random.default_rng(0)
  return {"kernel": jnp.asarray(rng.standard_normal((3, 4, 5)), jnp.float32),
          "layers": [{"bias": jnp.asarray(rng.standard_normal(4), jnp.float32),
                      "count": jnp.arange(3, dtype=jnp.int32)},
                     {"bias": jnp.asarray(rng.standard_normal(7), jnp.float32),
                      "scale": jnp.float32(2.5)}],
          "table": jnp.asarray(rng.standard_normal((2, 3)), jnp.float32)}


def use_every_leaf(t, x):
  """A different use of each array, so any swapped, shifted or recast one shows."""
  first, second = t["layers"]
  return (x @ t["kernel"].reshape(3, 20)[:, :4] + first["bias"]) * second["scale"], \
      jnp.sum(first["count"] * 7), second["bias"][::-1], t["table"].T


def test_bound_function_equals_the_function_on_its_arrays():
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 3)), jnp.float32)
  expected = use_every_leaf(tree(), x)
  for separate_from in (1, 5, 10, 10**6):  # all passed alone ... all packed
    got = bound.bind(use_every_leaf, tree(), separate_from=separate_from)(x)
    for g, e in zip(got, expected):
      assert g.dtype == e.dtype and g.shape == e.shape
      np.testing.assert_array_equal(g, e)


def test_bound_function_keeps_the_values_bound_at_binding():
  t = tree()
  f = bound.bind(lambda t, x: t["layers"][1]["bias"] + x, t)
  before = np.asarray(t["layers"][1]["bias"])
  t["layers"][1]["bias"] = jnp.zeros(7)  # rebinding a name in the caller's tree
  np.testing.assert_array_equal(f(jnp.float32(1.0)), before + 1)


def test_bound_function_is_traced_once_per_argument_shape():
  traces = []

  def f(t, x):
    traces.append(x.shape)
    return t["table"] * x
  g = bound.bind(f, tree())
  for _ in range(3):
    g(jnp.ones(()))
  g(jnp.ones((2, 3)))
  assert traces == [(), (2, 3)]


def test_an_exported_function_runs_from_its_files_alone(tmp_path):
  """The saved arrays are the bound ones, in their places: a swapped, shifted or
  recast array, or one packed in another order, changes an output."""
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 3)), jnp.float32)
  expected = use_every_leaf(tree(), x)
  for separate_from in (5, 10**6):  # some arrays packed, some alone; all packed
    directory = tmp_path / str(separate_from)
    bound.export(use_every_leaf, tree(), [x], directory, separate_from=separate_from)
    got = bound.load(directory)(x)
    for g, e in zip(got, expected):
      assert g.dtype == e.dtype and g.shape == e.shape
      np.testing.assert_array_equal(g, e)


def test_an_exported_function_of_bfloat16_arrays_loads(tmp_path):
  """NumPy's ``.npz`` keeps bfloat16 as raw 2-byte records: the loaded arrays
  are read back as bfloat16, packed and alone. Catches them handed to the
  function as the records (loading failed)."""
  rng = np.random.default_rng(2)
  t = {"w": jnp.asarray(rng.standard_normal((3, 40)), jnp.bfloat16),
       "b": jnp.asarray(rng.standard_normal(40), jnp.bfloat16),
       "scale": jnp.float32(0.5)}
  def fn(t, x):
    return (x @ t["w"] + t["b"]) * t["scale"]
  x = jnp.asarray(rng.standard_normal((2, 3)), jnp.bfloat16)
  bound.export(fn, t, [x], tmp_path, separate_from=50)   # w alone, b and scale packed
  got, expected = bound.load(tmp_path)(x), jax.jit(fn)(t, x)   # compiled alike
  assert got.dtype == expected.dtype
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(expected, np.float32))


def test_loading_a_directory_without_an_exported_function_names_the_missing_file(tmp_path):
  bound.export(use_every_leaf, tree(), [jnp.ones((2, 3))], tmp_path)
  (tmp_path / bound.FUNCTION_FILE).unlink()
  with pytest.raises(FileNotFoundError, match=r"function\.jax not found"):
    bound.load(tmp_path)
