"""Accuracy-vs-DP plots (matplotlib, headless), written atomically."""

from __future__ import annotations

import io
from collections.abc import Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

from dynscale.io import write_bytes_atomic


def plot_accuracy_by_dp(curves: Mapping[str, Mapping[str, float]], path: str, *,
                        title: str = "") -> None:
  """One line per curve; each curve maps a DP percentage ("10") to accuracy in [0, 1]."""
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for label, by_dp in curves.items():
    dps = sorted(by_dp, key=float)
    ax.plot([float(d) for d in dps], [100 * by_dp[d] for d in dps], marker="o", label=label)
  ax.set_xlabel("DP (% of channels)")
  ax.set_ylabel("test accuracy (%)")
  ax.set_ylim(0, 100)
  ax.grid(alpha=0.3)
  if title:
    ax.set_title(title)
  ax.legend()
  fig.tight_layout()
  save_png(fig, path, dpi=120)
  plt.close(fig)


def save_png(fig, path: str, *, dpi: int) -> None:
  """Writes a matplotlib figure to ``path`` as PNG, atomically."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=dpi)
  write_bytes_atomic(str(path), buffer.getvalue())


def format_accuracy_table(curves: Mapping[str, Mapping[str, float]]) -> str:
  """A text table: one row per DP, one column per curve, accuracy in percent."""
  names = list(curves)
  dps = sorted({d for c in curves.values() for d in c}, key=float)
  lines = ["DP%   " + "  ".join(f"{n:>12}" for n in names)]
  for d in dps:
    cells = "  ".join(f"{100 * curves[n][d]:12.2f}" if d in curves[n] else f"{'-':>12}"
                      for n in names)
    lines.append(f"{d:>4}  {cells}")
  return "\n".join(lines)
