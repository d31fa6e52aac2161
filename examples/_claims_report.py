"""Reporting for `claims_lab.py`: the verdict rule, markdown tables, plots and results.json.

Kept apart from the experiments so that `claims_model.py` (what a user copies) and
`claims_lab.py` (what is run, and why) stay short.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

VERDICTS = ("reproduced", "partly", "not reproduced")
K_SIGMA = 2.0        # an effect counts when it exceeds K_SIGMA seed-standard-deviations ...
MIN_EFFECT = 0.01    # ... and at least this much (1 accuracy point), unless a comparison says


class Comparison(NamedTuple):
  """One measured consequence of a claim: `a - b` should be positive (the claimed direction).

  `a_std`/`b_std` are standard deviations over seeds; the noise is `hypot(a_std, b_std)`.
  """
  label: str
  a: float
  a_std: float
  b: float
  b_std: float
  min_effect: float = MIN_EFFECT

  @property
  def effect(self) -> float:
    return self.a - self.b

  @property
  def threshold(self) -> float:
    return max(K_SIGMA * math.hypot(self.a_std, self.b_std), self.min_effect)

  @property
  def holds(self) -> bool:
    return bool(self.effect > self.threshold)


def verdict(comparisons: Sequence[Comparison]) -> str:
  """`reproduced` when every comparison holds, `partly` when some do, else `not reproduced`.

  A comparison holds when its effect is in the claimed direction and larger than both
  `K_SIGMA` times the seed noise and its `min_effect`.
  """
  if not comparisons:
    raise ValueError("verdict needs at least one comparison; got none")
  held = sum(c.holds for c in comparisons)
  return VERDICTS[0] if held == len(comparisons) else VERDICTS[1] if held else VERDICTS[2]


RULE = (f"A claim is tested by one or more comparisons `a - b` in the claimed direction (listed "
        f"under each experiment). A comparison *holds* when `a - b` exceeds both {K_SIGMA:g} x "
        f"the seed noise `hypot(std_a, std_b)` and a minimum effect (1 accuracy point unless "
        f"stated). Verdict: `reproduced` if all hold, `partly` if some hold, `not reproduced` "
        f"if none does.")


def pct(mean: float, std: float) -> str:
  return f"{100 * mean:.1f} ± {100 * std:.1f}"


def describe(c: Comparison, unit: str = "pct") -> str:
  fmt = (lambda v: f"{100 * v:.1f}") if unit == "pct" else (lambda v: f"{v:.3g}")
  mark = "holds" if c.holds else "does not hold"
  return (f"{c.label}: {fmt(c.a)} vs {fmt(c.b)} (effect {fmt(c.effect)}, needed > "
          f"{fmt(c.threshold)}): {mark}")


class Table(NamedTuple):
  """Rows of mean ± std cells over sweep columns; also what the plot of it shows."""
  title: str
  x_label: str                 # the sweep (column) name
  columns: list[Any]           # sweep values
  rows: dict[str, list[tuple[float, float]]]   # row name -> (mean, std) per column (fractions)
  y_label: str = "test accuracy (%)"
  log_x: bool = False
  plot: str | None = None      # file name of its plot, or None for no plot

  def markdown(self) -> list[str]:
    head = f"| variant | " + " | ".join(f"{self.x_label} = {c}" for c in self.columns) + " |"
    lines = [f"{self.title} ({self.y_label}, mean ± std over seeds)", "", head,
             "|---|" + "---:|" * len(self.columns)]
    for name, cells in self.rows.items():
      lines.append(f"| {name} | " + " | ".join(pct(m, s) for m, s in cells) + " |")
    return lines


def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def plot_table(path: str, t: Table) -> None:
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6.2, 4.0))
  numeric = all(isinstance(c, (int, float)) for c in t.columns)
  xs = list(t.columns) if numeric else list(range(len(t.columns)))
  for i, (name, cells) in enumerate(t.rows.items()):
    m = np.array([100 * c[0] for c in cells])
    s = np.array([100 * c[1] for c in cells])
    ax.errorbar(xs, m, yerr=s, marker="o", ms=4, capsize=3, label=name,
                color=plt.get_cmap("tab10")(i % 10), ls="-" if i < 10 else "--")
  if t.log_x and numeric:
    ax.set_xscale("log")
  ax.set_xticks(xs, [str(c) for c in t.columns])
  ax.set_xlabel(t.x_label)
  ax.set_ylabel(t.y_label)
  ax.set_title(t.title, fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def plot_curves(path: str, title: str, examples: Sequence[int],
                curves: dict[str, np.ndarray], target: float | None = None) -> None:
  """Test accuracy along training, mean over seeds, one line per variant."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6.2, 4.0))
  for i, (name, c) in enumerate(curves.items()):
    ax.plot(np.asarray(examples) / 1000, 100 * np.asarray(c), label=name,
            color=plt.get_cmap("tab10")(i % 10))
  if target is not None:
    ax.axhline(100 * target, color="gray", ls=":", lw=1)
  ax.set_xlabel("training examples seen (thousands)")
  ax.set_ylabel("test accuracy (%, eval mode)")
  ax.set_title(title, fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def write_report(out: str, outcomes: list[dict[str, Any]], config: dict[str, Any]) -> str:
  """Writes `claims.md` and `results.json` (plus each table's plot) into `out`."""
  os.makedirs(out, exist_ok=True)
  lines = ["# Claims about normalization, tested on scikit-learn's digits", "",
           "| claim | experiment | result | verdict |", "|---|---|---|---|"]
  for o in outcomes:
    lines.append(f"| {o['claim']}. {o['claim_text']} | `{o['name']}` | {o['result']} | "
                 f"{o['verdict']} |")
  lines += ["", f"Verdict rule: {RULE}", ""]
  for o in outcomes:
    lines += [f"## {o['claim']}. {o['claim_text']} (`{o['name']}`)", "", o["setup"], ""]
    for t in o["tables"]:
      lines += t.markdown() + [""]
      if t.plot:
        plot_table(os.path.join(out, t.plot), t)
        lines += [f"![{t.title}]({t.plot})", ""]
    lines += o.get("extra_md", []) + [""] if o.get("extra_md") else []
    for p in o.get("extra_plots", []):
      lines += [f"![{p}]({p})", ""]
    lines += ["Comparisons:", ""] + [f"- {d}" for d in o["comparisons_text"]]
    lines += ["", f"**Verdict: {o['verdict']}.** {o['discussion']}", ""]
  lines += ["## Setup", "", *[f"- {k}: {v}" for k, v in config.items() if k != "machine"],
            f"- machine: {config['machine']}", ""]
  text = "\n".join(lines)
  with open(os.path.join(out, "claims.md"), "w") as f:
    f.write(text)
  serial = [{k: (v if k != "tables" else [t._asdict() for t in v]) for k, v in o.items()}
            for o in outcomes]
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump({"config": config, "experiments": serial}, f, indent=1, default=_json_default)
  return text


def _json_default(o: Any) -> Any:
  if isinstance(o, (np.floating, np.integer)):
    return o.item()
  if isinstance(o, np.ndarray):
    return o.tolist()
  raise TypeError(f"not JSON serializable: {type(o).__name__}")


def claims_table(markdown: str) -> list[str]:
  """The lines of the `| claim | experiment | result | verdict |` table in `markdown`."""
  lines = markdown.splitlines()
  start = next(i for i, l in enumerate(lines) if l.startswith("| claim | experiment |"))
  end = start
  while end < len(lines) and lines[end].startswith("|"):
    end += 1
  return lines[start:end]
