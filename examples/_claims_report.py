"""Reporting for `claims_lab.py`: tables, plots, `claims.md`, `results.json`, and the decision
table ("which normalization, when") generated from `results.json`.

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

import _claims_stats as cs

# One fixed colour per variant in every figure (matplotlib's tab10/tab20 values).
COLOURS = {
    "none": "#7f7f7f", "batch": "#1f77b4", "batch_renorm": "#aec7e8", "ghost": "#17becf",
    "ghost_batch": "#17becf", "layer": "#ff7f0e", "instance": "#d62728", "group": "#2ca02c",
    "group_ws": "#98df8a", "rms": "#9467bd", "frn": "#8c564b", "noisy": "#e377c2",
    "noisy_batch": "#e377c2", "dyt": "#bcbd22", "pre_layer": "#ff7f0e", "pre_rms": "#9467bd",
    "pre_none": "#7f7f7f", "pre_dyt": "#bcbd22", "pre_layer_nowarmup": "#ffbb78",
    "post_layer": "#d62728", "post_layer_nowarmup": "#ff9896",
}


def colour(name: str) -> str:
  """The variant's colour: the longest key of `COLOURS` that `name` starts with."""
  base = name.split("@")[0]
  keys = [k for k in COLOURS if base.startswith(k)]
  return COLOURS[max(keys, key=len)] if keys else "#333333"


class Table(NamedTuple):
  """Rows of per-seed values per column; the markdown shows mean ± sample sd, the plot the
  means with every seed as a dot."""
  title: str
  x_label: str                 # the sweep (column) name
  columns: list[Any]           # sweep values, or category names
  rows: dict[str, list[Any]]   # row name -> per column, the seeds' values (fractions if scale 100)
  y_label: str = "test accuracy (%)"
  log_x: bool = False
  plot: str | None = None      # file name of its plot, or None for no plot
  bars: bool = False           # grouped bars (categorical columns) instead of lines
  chance: list[float] | None = None   # chance level per column (in displayed units)
  scale: float = 100.0         # displayed = value * scale

  def markdown(self, n: int) -> list[str]:
    head = "| variant | " + " | ".join(f"{self.x_label} = {c}" if not self.bars else str(c)
                                       for c in self.columns) + " |"
    lines = [f"{self.title} ({self.y_label}, mean ± sample sd over {n} seeds)", "", head,
             "|---|" + "---:|" * len(self.columns)]
    for name, cells in self.rows.items():
      lines.append(f"| {name} | " + " | ".join(
          "{:.2f} ± {:.2f}".format(*cs.mean_sd(np.asarray(c) * self.scale)) if self.scale == 1
          else "{:.1f} ± {:.1f}".format(*cs.mean_sd(np.asarray(c) * self.scale))
          for c in cells) + " |")
    return lines


def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _ci(values: np.ndarray) -> float:
  """Half-width of the 95 % t-interval of the mean of `values` (0 for one value)."""
  v = np.asarray(values, np.float64)
  if v.size < 2:
    return 0.0
  return cs.t_quantile(0.975, v.size - 1) * float(v.std(ddof=1)) / math.sqrt(v.size)


def _log_ticks(ax, xs):
  from matplotlib.ticker import NullFormatter, NullLocator
  ax.set_xscale("log")
  ax.xaxis.set_minor_locator(NullLocator())
  ax.xaxis.set_minor_formatter(NullFormatter())
  ax.set_xticks(xs, [f"{x:g}" for x in xs])


def plot_table(path: str, t: Table, n: int) -> None:
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6.6, 4.2))
  rows = list(t.rows.items())
  if t.bars:
    width = 0.8 / max(1, len(rows))
    for i, (name, cells) in enumerate(rows):
      for j, c in enumerate(cells):
        v = np.asarray(c, np.float64) * t.scale
        x = j + (i - (len(rows) - 1) / 2) * width
        ax.bar(x, v.mean(), width * 0.9, color=colour(name), label=name if j == 0 else None,
               yerr=_ci(v), capsize=2, ecolor="black", alpha=0.85)
        ax.scatter(np.full(v.size, x), v, s=6, color="black", zorder=3)
    ax.set_xticks(range(len(t.columns)), [str(c) for c in t.columns])
    if t.chance:
      for j, c in enumerate(t.chance):
        ax.hlines(c, j - 0.45, j + 0.45, colors="black", linestyles=":", lw=1,
                  label="chance" if j == 0 else None)
  else:
    xs = [float(c) for c in t.columns]
    for name, cells in rows:
      v = [np.asarray(c, np.float64) * t.scale for c in cells]
      m = np.array([a.mean() for a in v])
      ax.plot(xs, m, marker="o", ms=4, color=colour(name), label=name)
      for x, a in zip(xs, v):
        ax.scatter(np.full(a.size, x), a, s=6, color=colour(name), alpha=0.5)
    if t.log_x:
      _log_ticks(ax, xs)
    else:
      ax.set_xticks(xs, [f"{x:g}" for x in xs])
    if t.chance:
      ax.axhline(t.chance[0], color="black", ls=":", lw=1, label="chance")
  if t.scale == 100.0:                      # accuracy: never outside 0-100 %
    lo, hi = ax.get_ylim()
    ax.set_ylim(max(lo, 0.0), min(hi, 100.5))
  ax.set_xlabel(t.x_label)
  ax.set_ylabel(t.y_label)
  ax.set_title(f"{t.title}\n(n = {n} seeds; " + ("bars: mean, whiskers: 95 % CI, dots: seeds)"
               if t.bars else "lines: mean, dots: seeds)"), fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def plot_lines(path: str, title: str, x: Sequence[float], runs: dict[str, np.ndarray],
               x_label: str, y_label: str, target: float | None = None, scale: float = 1.0,
               log_y: bool = False) -> None:
  """One line per variant (mean over seeds) with a band: the 95 % CI of the mean."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6.6, 4.2))
  for name, r in runs.items():
    r = np.asarray(r, np.float64) * scale            # [seeds, points]
    m = np.exp(np.log(r).mean(0)) if log_y else r.mean(0)
    lo_hi = (np.log(r) if log_y else r)
    half = np.array([_ci(lo_hi[:, j]) for j in range(r.shape[1])])
    centre = np.log(m) if log_y else m
    lo, hi = centre - half, centre + half
    if log_y:
      lo, hi = np.exp(lo), np.exp(hi)
    if scale == 100.0:                      # accuracy: the band stays within 0-100 %
      lo, hi = np.clip(lo, 0.0, 100.0), np.clip(hi, 0.0, 100.0)
    ax.plot(x, m, color=colour(name), label=name)
    ax.fill_between(x, lo, hi, color=colour(name), alpha=0.15)
  if target is not None:
    ax.axhline(target, color="gray", ls=":", lw=1)
  if log_y:
    ax.set_yscale("log")
  ax.set_xlabel(x_label)
  ax.set_ylabel(y_label)
  ax.set_title(f"{title}\n(n = {len(next(iter(runs.values())))} seeds; line: mean, band: "
               "95 % CI of the mean)", fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def _signed(v: float, unit: str) -> str:
  return f"{v:+.1f}" if unit in ("points", "%") else f"{v:+.2f}"


def effect_text(j: dict[str, Any]) -> str:
  c, ci = j["claim"], j["ci"]
  u = c["unit"]
  return (f"{_signed(ci['mean'], u)} {u} [{_signed(ci['low'], u)}, {_signed(ci['high'], u)}]")


def claims_rows(judged: list[dict[str, Any]]) -> list[str]:
  lines = ["| claim | experiment | result | verdict |", "|---|---|---|---|"]
  for j in judged:
    c = j["claim"]
    lines.append(f"| {c['number']}. {c['text']} | `{c['experiment']}` | {j['result']}; "
                 f"effect {effect_text(j)} (95 % CI, n={j['ci']['n']}); paper: {c['source']} "
                 f"| {j['verdict']} |")
  return lines


RULE = ("Each claim was registered before the run with one comparison `a - b` per seed (positive "
        "in the claimed direction), a minimum effect that matters and, where the design needs "
        "it, a precondition that the baseline shows the problem. The effect is the mean paired "
        "difference over seeds with its 95 % Student-t interval. Verdict: `not testable here` "
        "if the precondition fails; `reproduced` if the interval lies above 0 and the mean is "
        "at least the minimum effect; `contradicted` if it lies below 0; `no effect` if it "
        "lies within plus or minus the minimum effect; `inconclusive` otherwise. For a claim "
        "of equivalence ('matches'): `reproduced` if the interval lies within plus or minus "
        "the minimum effect, `contradicted` if it lies entirely outside, `inconclusive` "
        "otherwise. With this many claims some intervals exclude 0 by chance: the Holm-"
        "adjusted p-values (family-wise error across the directional claims) are listed with "
        "each claim.")


def _jsonable(o: Any) -> Any:
  if isinstance(o, Table):
    return _jsonable(o._asdict())
  if isinstance(o, dict):
    return {str(k): _jsonable(v) for k, v in o.items()}
  if isinstance(o, (list, tuple)):
    return [_jsonable(v) for v in o]
  if isinstance(o, np.ndarray):
    return o.tolist()
  if isinstance(o, (np.floating, np.integer, np.bool_)):
    return o.item()
  return o


def write_report(out: str, judged: list[dict[str, Any]], sections: list[dict[str, Any]],
                 meta: dict[str, Any]) -> str:
  """Writes `claims.md`, `results.json` and every plot into `out`; returns the markdown."""
  os.makedirs(out, exist_ok=True)
  n = len(meta["seeds"])
  title = "# Claims about normalization, tested"
  lines = [title, ""]
  if meta.get("quick"):
    lines += ["> **A reduced run (`--quick`)**: fewer seeds, shorter training and smaller "
              "grids. Its verdicts are not the study's; the full run is "
              "`python examples/claims_lab.py`.", ""]
  lines += claims_rows(judged)
  lines += ["", f"Verdict rule: {RULE}", ""]
  results = {"meta": meta, "claims": judged,
             "sections": {s["name"]: _summary(s) for s in sections}}
  decision = decision_table(results)
  if decision:
    lines += ["## Which normalization, when", "", *decision, ""]
  by_exp = {}
  for j in judged:
    by_exp.setdefault(j["claim"]["experiment"] if j["claim"]["number"] != "12" else "renorm",
                      []).append(j)
  for sec in sections:
    name = sec["name"]
    lines += [f"## `{name}`" + (f" ({sec['wall_s']:.0f} s)" if "wall_s" in sec else ""), "",
              sec.get("setup", ""), ""]
    for t in sec.get("tables", []):
      lines += t.markdown(n) + [""]
      if t.plot:
        plot_table(os.path.join(out, t.plot), t, n)
        lines += [f"![{t.title}]({t.plot})", ""]
    for key, ylab, scale in (("curves", "test accuracy (%, eval mode)", 100.0),
                             ("lines", None, 1.0)):
      if key in sec:
        c = sec[key]
        plot_lines(os.path.join(out, c["plot"]), c["title"], c["x"], c["runs"],
                   c.get("x_label", "training examples seen"), c.get("y_label", ylab),
                   100 * c["target"] if c.get("target") else None, scale, c.get("log_y", False))
        lines += [f"![{c['title']}]({c['plot']})", ""]
    if sec.get("extra_md"):
      lines += sec["extra_md"] + [""]
    for j in by_exp.get(name, []):
      c = j["claim"]
      holm = f"; Holm-adjusted p = {j['p_holm']:.3g}" if "p_holm" in j else ""
      pre = (f" Precondition ({c['precondition']}): "
             f"{'held' if j['precondition_held'] else 'failed'}, {j['precondition_result']}."
             if c["precondition"] else "")
      lines += [f"**Claim {c['number']}: {c['text']}.** Registered comparison: "
                f"{c['comparison']}; minimum effect {c['min_effect']:g} {c['unit']}"
                f"{' (equivalence)' if c['equivalence'] else ''}. Effect {effect_text(j)} "
                f"(p = {j['ci']['p_value']:.3g}{holm}).{pre} Paper: {c['source']}. "
                f"**Verdict: {j['verdict']}.**", ""]
  changes = meta.get("design changes after the first full run", [])
  if changes:
    lines += ["## Design changes after the first full run", "",
              "These choices were made after seeing that run's results; everything else was "
              "fixed before it.", "", *[f"- {c}" for c in changes], ""]
  lines += ["## Setup", "", *[f"- {k}: {v}" for k, v in meta.items()
                              if k != "design changes after the first full run"], ""]
  text = "\n".join(lines)
  with open(os.path.join(out, "claims.md"), "w") as f:
    f.write(text)
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(_jsonable(results), f, indent=1)
  return text


def _summary(sec: dict[str, Any]) -> dict[str, Any]:
  keep = {k: v for k, v in sec.items() if k not in ("outcomes", "curves", "lines")}
  keep["tables"] = [t._asdict() for t in sec.get("tables", [])]
  return _jsonable(keep)


# ---------------------------------------------------------------------------------------------
# The decision table, from results.json alone.

def _claim(results: dict[str, Any], number: str) -> dict[str, Any] | None:
  return next((j for j in results["claims"] if j["claim"]["number"] == number), None)


def _evidence(j: dict[str, Any] | None) -> str:
  if j is None:
    return "not run"
  return f"claim {j['claim']['number']}: {effect_text(j)}, {j['verdict']}"


def _table(results: dict[str, Any], section: str, title_start: str) -> dict[str, Any] | None:
  sec = results["sections"].get(section)
  if not sec:
    return None
  return next((t for t in sec.get("tables", []) if t["title"].startswith(title_start)), None)


def _ranked(rows: dict[str, list], column: int = 0) -> list[tuple[str, float]]:
  means = {k: float(np.mean(v[column])) for k, v in rows.items()}
  return sorted(means.items(), key=lambda kv: -kv[1])


def _pair(rows: dict[str, list], a: str, b: str, column: int = 0) -> str:
  ci = cs.paired_interval(100 * np.asarray(rows[a][column]), 100 * np.asarray(rows[b][column]))
  return f"{a} - {b}: {ci.mean:+.1f} points [{ci.low:+.1f}, {ci.high:+.1f}]"


def decision_table(results: dict[str, Any]) -> list[str]:
  """Markdown lines of "Which normalization, when", computed from `results` (results.json)."""
  out = ["| situation | recommended | runner-up | the lab's evidence (95 % CI) | source | "
         "tested here |", "|---|---|---|---|---|---|"]
  rows = []
  t = _table(results, "tuning", "Test accuracy at the tuned lr")
  if t:
    ranked = _ranked(t["rows"])
    (a, _), (b, _) = ranked[0], ranked[1]
    rows.append(("i.i.d. batches of 8+ examples per device", a, b,
                 f"at B=32, tuned lrs: {_pair(t['rows'], a, b)}; "
                 + _evidence(_claim(results, "13")),
                 "Ioffe & Szegedy 2015; Wu & He 2018", "yes"))
  t = _table(results, "small_batch", "Test accuracy vs examples per")
  if t:
    k2 = t["columns"].index(2)
    indep = {k: v for k, v in t["rows"].items() if "batch-independent" in k}
    ranked = _ranked({k: [v[k2]] for k, v in indep.items()})
    a, b = ranked[0][0].split(" ")[0], ranked[1][0].split(" ")[0]
    rows.append(("1-4 examples per device (batch statistics over 1-4)", a, b,
                 _evidence(_claim(results, "5b")) + "; "
                 + _evidence(_claim(results, "8")), "Wu & He 2018; Ioffe 2017", "yes"))
  rows.append(("non-i.i.d. batches (e.g. federated, one class per device)", "group", "layer",
               "not tested here", "Hsieh et al. 2020 (BN fails on skewed labels; GN does not)",
               "no"))
  t = _table(results, "recurrent", "Pixel-by-pixel RNN")
  if t:
    ranked = _ranked(t["rows"])
    a, b = ranked[0][0], ranked[1][0]
    rows.append(("recurrent networks", a, b, _pair(t["rows"], a, b) + "; "
                 + _evidence(_claim(results, "7")), "Ba et al. 2016; Cooijmans et al. 2017",
                 "yes (64-step tanh RNN)"))
  j20, j21 = _claim(results, "20"), _claim(results, "21")
  t = _table(results, "transformer", "Transformer")
  if t and j20:
    names = {"pre_layer": "layer", "pre_rms": "rms", "pre_dyt": "dynamic tanh"}
    ranked = _ranked({k: v for k, v in t["rows"].items() if k in names})
    if j20["verdict"] == "reproduced":
      a, b = "rms (pre-LN)", "layer (pre-LN)"
    else:
      a, b = names[ranked[0][0]] + " (pre-LN)", names[ranked[1][0]] + " (pre-LN)"
    rows.append(("transformers", a, b, _evidence(j20) + "; " + _evidence(j21) + "; "
                 + _evidence(_claim(results, "18")),
                 "Xiong et al. 2020; Zhang & Sennrich 2019; Zhu et al. 2025",
                 "yes (small transformer, generated task)"))
  rows.append(("style transfer or generation (remove per-image statistics)", "instance",
               "group (1 channel per group = instance)", _evidence(_claim(results, "10")),
               "Ulyanov et al. 2016; Huang & Belongie 2017",
               "partly (the removal, not generation)"))
  j12 = _claim(results, "12")
  rows.append(("predictions independent of the batch, same computation in training and "
               "inference", "group_ws / group", "layer", _evidence(j12) +
               " (batch norm's running statistics vs re-estimated ones)",
               "Ioffe 2017; Wu & He 2018", "yes"))
  cost = results["sections"].get("cost", {}).get("cost")
  if cost:
    ev = min(((k, v["eval_ms_b32"]) for k, v in cost.items()
              if k != "none" and not v["folds_at_inference"]), key=lambda kv: kv[1])
    fold = results["sections"]["cost"].get("fold_error", float("nan"))
    rows.append(("lowest inference cost", "batch (folded into the conv)",
                 f"{ev[0]} (fastest unfolded, {ev[1]:.2f} ms per eval step at B=32)",
                 f"folding exact to {fold:.1e} (relative); " + _evidence(_claim(results, "15")),
                 "Jacob et al. 2018 (folding)", "yes"))
  out += [f"| {' | '.join(r)} |" for r in rows]
  return out


def claims_table(markdown: str) -> list[str]:
  """The lines of the `| claim | experiment | result | verdict |` table in `markdown`."""
  lines = markdown.splitlines()
  start = next(i for i, l in enumerate(lines) if l.startswith("| claim | experiment |"))
  end = start
  while end < len(lines) and lines[end].startswith("|"):
    end += 1
  return lines[start:end]


def decision_table_from_file(path: str) -> list[str]:
  with open(path) as f:
    return decision_table(json.load(f))
