"""The orders of the training images a run reads, recorded as it trains."""

import numpy as np

from dynscale.train import loop, steps


def recorded_orders(monkeypatch) -> list[bytes]:
  """A list that receives, from now on, the indices (as bytes) of every chunk
  of training images a :class:`dynscale.train.loop.Trainer` reads: with one
  chunk an epoch (``train.steps_per_chunk`` at least the epoch's steps), one
  entry per epoch, its order of the images."""
  orders = []
  chunks = loop.Trainer.epoch_chunks

  def recorded(self, epoch):
    for idx, key in chunks(self, epoch):
      orders.append(np.asarray(idx).tobytes())
      yield idx, key
  monkeypatch.setattr(loop.Trainer, "epoch_chunks", recorded)
  return orders


def recorded_batches(monkeypatch) -> list[bytes]:
  """A list that receives, from now on, the indices (as bytes) of every batch a
  :class:`dynscale.train.loop.Trainer` built after this call trains on, one
  entry per optimizer step."""
  batches = []
  make_train_chunk = steps.make_train_chunk

  def recording(*args, **kwargs):
    train_chunk = make_train_chunk(*args, **kwargs)

    def recorded(state, data, idx, key, task):
      batches.extend(row.tobytes() for row in np.asarray(idx))
      return train_chunk(state, data, idx, key, task)
    return recorded
  monkeypatch.setattr(steps, "make_train_chunk", recording)
  return batches
