"""Plots and text tables of result curves (matplotlib, headless), written atomically.

A curve is the results-file record ``{"x": x-axis name, "y": metric name,
"points": [[x, y], ...]}`` (:func:`dynscale.train.runs.curve`); the
functions here take several under their labels, ``{label: curve}``.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

from dynscale.io import write_bytes_atomic


def axes(curves: Mapping[str, Mapping]) -> tuple[str, str]:
  """The ``(x, y)`` names the curves share; raises ValueError if they differ or none given."""
  names = {(c["x"], c["y"]) for c in curves.values()}
  if len(names) != 1:
    raise ValueError(f"curves must share one x and one y axis, got {sorted(names)}")
  return names.pop()


TITLE_CHARACTERS = 64
"""The longest line of a drawn title; longer titles wrap (the PNG's Title text keeps
them whole)."""


def curves_figure(curves: Mapping[str, Mapping], *, title: str = ""):
  """A matplotlib figure of one line per curve, labelled by its key.

  ``title`` is drawn above the axes, wrapped at :data:`TITLE_CHARACTERS`. The
  legend sits right of the axes, where it hides no point however many curves
  there are.
  """
  x_name, y_name = axes(curves)
  fig, ax = plt.subplots(figsize=(6.4, 3.8))
  for label, curve in curves.items():
    points = sorted(curve["points"])
    ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=label)
  ax.set_xlabel(x_name)
  ax.set_ylabel(y_name)
  ax.grid(alpha=0.3)
  if title:
    ax.set_title(textwrap.fill(title, TITLE_CHARACTERS), fontsize=10)
  ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=9)
  fig.tight_layout()
  return fig


def plot_curves(curves: Mapping[str, Mapping], path: str, *, title: str = "") -> None:
  """:func:`curves_figure` saved to ``path`` as PNG, ``title`` whole as its ``Title`` text."""
  fig = curves_figure(curves, title=title)
  save_png(fig, path, dpi=120, title=title)
  plt.close(fig)


def save_png(fig, path: str, *, dpi: int, title: str = "") -> None:
  """Writes a matplotlib figure to ``path`` as PNG, atomically, with ``title`` as its Title text."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=dpi, metadata={"Title": title} if title else None)
  write_bytes_atomic(str(path), buffer.getvalue())


def format_curves_table(curves: Mapping[str, Mapping]) -> str:
  """A text table: one row per x value, one column per curve, and a last row of means of y."""
  x_name, _ = axes(curves)
  by_label = {label: dict(map(tuple, curve["points"])) for label, curve in curves.items()}
  width = max([12, *map(len, by_label)])
  xs = sorted({x for values in by_label.values() for x in values})
  first = max(len(x_name), len("mean"), *(len(f"{x:g}") for x in xs))

  def row(head: str, cells) -> str:
    return f"{head:<{first}}  " + "  ".join(f"{cell:>{width}}" for cell in cells)

  lines = [row(x_name, by_label)]
  lines += [row(f"{x:g}", [f"{values[x]:.4f}" if x in values else "-"
                           for values in by_label.values()]) for x in xs]
  lines.append(row("mean", [f"{sum(values.values()) / len(values):.4f}"
                            for values in by_label.values()]))
  return "\n".join(lines)
