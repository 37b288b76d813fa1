"""Atomic file writes: a result file is either the old one or the new one."""

from __future__ import annotations

import io
import json
import os
import stat
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np


def _umask() -> int:
  """The process's file-creation mask (read by setting it, then put back)."""
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def write_bytes_atomic(path: str, data: bytes) -> None:
  """Writes ``data`` to ``path`` via a temporary file and ``os.replace``.

  As a plain ``open(path, "w")`` would: a new file gets ``0o666`` less the
  umask (``mkstemp`` makes it readable by its owner alone), an existing one
  keeps its permissions, a symbolic link stays one (its target is written),
  and any name ``open`` takes works. The directory is synced after the
  rename, so the new name survives a crash.
  """
  path = os.path.realpath(path)
  directory = os.path.dirname(path)
  os.makedirs(directory, exist_ok=True)
  mode = (stat.S_IMODE(os.stat(path).st_mode) if os.path.isfile(path)
          else 0o666 & ~_umask())
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
  try:
    os.fchmod(fd, mode)
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  directory_fd = os.open(directory, os.O_RDONLY)
  try:
    os.fsync(directory_fd)
  finally:
    os.close(directory_fd)


def write_npz_atomic(path: str, arrays: Mapping[str, Any]) -> None:
  """Writes ``arrays`` (name: array) as an ``.npz`` file to ``path`` atomically."""
  buffer = io.BytesIO()
  np.savez(buffer, **{name: np.asarray(a) for name, a in arrays.items()})
  write_bytes_atomic(path, buffer.getvalue())


def write_json_atomic(path: str, obj: Any) -> None:
  """Writes ``obj`` as indented JSON to ``path`` atomically."""
  write_bytes_atomic(path, (json.dumps(obj, indent=2) + "\n").encode())


def check_writable_dir(path: str, field: str = "workdir") -> str:
  """Creates ``path`` if needed and checks a file can be written there."""
  if not path:
    raise ValueError(f"{field} must be a non-empty directory path")
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
      pass
  except OSError as e:
    raise ValueError(f"{field} {path!r} cannot be written: {e.strerror or e}") from e
  return os.path.abspath(path)
