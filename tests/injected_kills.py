"""Kills injected where a SIGKILL is hard to time, and what a run logged."""

import contextlib
import json

import pytest

from dynscale.train.checkpoint import Checkpoints


class Killed(BaseException):
  """A kill, injected where a SIGKILL is hard to time."""


@contextlib.contextmanager
def killed_at_checkpoint(monkeypatch, when):
  """Runs the block with ``Checkpoints.save`` raising :class:`Killed` instead of
  saving where ``when(directory, step)``; the block must be killed so."""
  save = Checkpoints.save

  def save_or_kill(self, step, state, metadata):
    if when(self.directory, step):
      raise Killed
    save(self, step, state, metadata)
  with monkeypatch.context() as patch:
    patch.setattr(Checkpoints, "save", save_or_kill)
    with pytest.raises(Killed):
      yield


def logged_lines(workdir) -> list[dict]:
  """Each line of ``<workdir>/metrics.jsonl``, its measured throughput aside."""
  return [{k: v for k, v in json.loads(line).items() if not k.endswith("images_per_s")}
          for line in (workdir / "metrics.jsonl").read_text().splitlines()]
