"""Train state as a plain pytree, and the split/merge between it and an NNX model.

The NNX graph is split once (``nnx.split``); jitted steps are pure functions
of this pytree and merge the graph back inside the trace, which keeps Python
overhead per step to one dispatch (the functional pattern of the Flax NNX
performance guide). Parameters and other model variables are held as pure
nested dicts of arrays, so orbax checkpoints them without knowing of Flax.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

Filter = Any  # an nnx filter: a Variable type, nnx.Any(...), ...


@flax.struct.dataclass
class TrainState:
  """Everything a run carries from step to step.

  step: scalar int32 count of optimizer steps taken.
  params: pure dict of the trainable ``nnx.Param`` arrays.
  model_state: pure dict of every other model variable (batch-norm
    statistics, profiles, ...).
  opt_state: the optax state over ``params``.
  """

  step: jax.Array
  params: Any
  model_state: Any
  opt_state: Any


def split_model(model: nnx.Module, trainable: Filter = nnx.Param
                ) -> tuple[nnx.GraphDef, dict, dict]:
  """Returns (graphdef, params, model_state) with the last two as pure dicts.

  ``trainable`` selects the variables the optimizer updates: ``nnx.Param``,
  or e.g. ``nnx.Any(nnx.Param, Profile)`` when ATP learns the profiles.
  """
  graphdef, params, rest = nnx.split(model, trainable, ...)
  return graphdef, params.to_pure_dict(), rest.to_pure_dict()


def merge_model(graphdef: nnx.GraphDef, params: Any, model_state: Any) -> nnx.Module:
  """Rebuilds the model from its graphdef and pure dicts (traceable)."""
  return nnx.merge(graphdef, nnx.State(params), nnx.State(model_state))


def model_state_of(model: nnx.Module, trainable: Filter = nnx.Param) -> dict:
  """The pure dict of every variable of ``model`` not selected by ``trainable``."""
  _, _, rest = nnx.split(model, trainable, ...)
  return rest.to_pure_dict()


def create_train_state(model: nnx.Module, tx: optax.GradientTransformation,
                       trainable: Filter = nnx.Param) -> tuple[nnx.GraphDef, TrainState]:
  """Splits ``model`` and initialises ``tx`` over its ``trainable`` variables."""
  graphdef, params, model_state = split_model(model, trainable)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                     model_state=model_state, opt_state=tx.init(params))
  return graphdef, state
