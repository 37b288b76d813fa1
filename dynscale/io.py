"""Atomic file writes: a result file is either the old one or the new one."""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np


def write_bytes_atomic(path: str, data: bytes) -> None:
  """Writes ``data`` to ``path`` via a temporary file and ``os.replace``."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


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
