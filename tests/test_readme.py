"""The README's commands are the ones CI runs, and its quickstart runs."""

import pathlib
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _bash_blocks(text):
  return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_readme_test_command_is_what_ci_runs():
  """.ci/run runs the README's test command verbatim in a fresh virtualenv before installing
  anything else into it, then runs the slow tests too."""
  readme = (ROOT / "README.md").read_text()
  ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")]
  commands = [line for block in _bash_blocks(readme) for line in block.splitlines()
              if "pytest" in line]
  assert commands, "README has no test command"
  assert commands[0].strip() in ci, "README's test command differs from .ci/run's"
  step1 = ci.index(commands[0].strip())
  fresh = max(i for i, line in enumerate(ci[:step1]) if line == "rm -rf .venv")
  assert not [line for line in ci[fresh:step1] if "install" in line], \
      ".ci/run installs something into .venv before the README's test command"
  assert any(re.search(r"pytest.* -m \"slow or not slow\"", line) for line in ci[step1 + 1:]), \
      ".ci/run does not run the slow tests after the README's command"


def test_readme_quickstart_runs():
  """Every ```python block of the README runs, in order, in one namespace."""
  readme = (ROOT / "README.md").read_text()
  blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
  assert blocks, "README has no python quickstart"
  namespace = {}
  import jax
  with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
    for block in blocks:
      exec(compile(block, "README.md", "exec"), namespace)  # pylint: disable=exec-used


# ---- README numbers against the committed results files they come from ----------------------

import json  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
_NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def _section(text, title):
  """The body of the README's `## title` section."""
  start = text.index(f"## {title}\n")
  end = text.find("\n## ", start + 1)
  return text[start:end if end >= 0 else len(text)]


def _passages(text, name, others):
  """Each stretch of a paragraph from a mention of `name` to the next mention of one of
  `others` (or the paragraph's end)."""
  passages = []
  for paragraph in re.split(r"\n\s*\n", text):
    for start in [m.start() for m in re.finditer(re.escape(name), paragraph)]:
      ends = [paragraph.find(o, start + 1) for o in others]
      passages.append(paragraph[start:min([e for e in ends if e > 0], default=None)])
  return passages


def test_readme_performance_numbers_come_from_the_results_files():
  """Every number of the Performance section occurs in a committed results file (so a stale
  number, or one from nowhere, fails), and the table's ratios are those of the case named."""
  section = _section((ROOT / "README.md").read_text(), "Performance")
  section = re.sub(r"`[^`]*`", "", section)            # paths, commands, LD_PRELOAD values
  sources = "\n".join((RESULTS / name).read_text()
                      for name in ("results.md", "models.md", "jnp/results.md", "patterns.md",
                                   "models_blocks.md"))
  known = set(_NUMBER.findall(sources))
  unknown = sorted(set(_NUMBER.findall(section)) - known, key=float)
  assert not unknown, f"README Performance numbers in no results file: {unknown}"

  with open(RESULTS / "results.json") as f:
    results = json.load(f)
  records = {r["case"]: r for r in results["records"]}
  rows = [[cell.strip() for cell in line.strip().strip("|").split("|")]
          for line in section.splitlines() if re.match(r"\| [a-z_]+ fwd", line)]
  assert len(rows) >= 10, "README Performance table not found"
  for case, vs_flax, vs_torch, saved in rows:
    assert case in records, f"README case {case!r} is not in results.json"
    ratios = records[case]["ratios"]
    for cell, key in ((vs_flax, "flax"), (vs_torch, "torch")):
      if re.fullmatch(r"\d+\.\d+", cell):
        assert cell == f"{ratios[key]:.2f}", f"{case} / {key}: {cell} vs {ratios[key]:.2f}"
      else:
        assert key not in ratios, f"{case}: README has no {key} ratio but results.json does"
    if saved:
      residual = records[case]["residual_bytes"]
      want = f"{residual['normjax'] / 2**20:.0f} / {residual['flax'] / 2**20:.0f}"
      assert saved == want, f"{case} saved MiB: {saved} vs {want}"

  summary = results["summary"]
  for key, label in (("flax", "flax runs"), ("torch", "PyTorch runs")):
    n = re.search(rf"the (\d+) cases {label}", section)
    assert n and int(n[1]) == summary[key]["n"], f"case count of the {key} geometric mean"
  assert f"**{summary['flax']['geomean']:.2f} of flax.linen's time**" in section
  assert f"{summary['torch']['geomean']:.2f} of PyTorch's" in section
  slower = len(summary["flax"]["slower_cases"])
  assert re.search(rf"\b{slower}\s+(forward-only\s+)?cases?\s+(are|is)\s+slower", section), \
      f"README: the number of cases slower than flax is not {slower}"


def _masked_results():
  with open(ROOT / "docs" / "masked_sequences" / "results.json") as f:
    return json.load(f)


def test_readme_example_numbers_come_from_their_committed_runs():
  """Percentages and durations the README gives for masked_sequences.py and flax_models.py
  are those of their committed runs in docs/."""
  readme = (ROOT / "README.md").read_text()
  masked = {f"{100 * acc:.1f}" for row in _masked_results()["training"]
            for acc in row["test_acc"].values()}
  with open(ROOT / "docs" / "flax_models" / "results.json") as f:
    flax_rows = json.load(f)["rows"]
  flax_acc = {f"{100 * row[k]:.1f}" for row in flax_rows for k in ("linen_test_acc", "nnx_test_acc")}
  for script, allowed, results_md in (
      ("masked_sequences.py", masked, "docs/masked_sequences/results.md"),
      ("flax_models.py", flax_acc, "docs/flax_models/results.md")):
    seconds = set(re.findall(r"(\d+) s\b", (ROOT / results_md).read_text()))
    for paragraph in _passages(readme, script, ("masked_sequences.py", "flax_models.py")):
      for pct in re.findall(r"(\d+\.\d)\s?%", paragraph):
        assert pct in allowed, f"README: {pct}% next to {script} is not in its results"
      for sec in re.findall(r"(\d+) s\b", paragraph):
        assert sec in seconds, f"README: {sec} s for {script}; {results_md} says {seconds}"


def test_readme_masked_sequences_claims_match_results():
  """The sentence 'masked layer norm scores X% at every padding length; unmasked falls from Y%
  to Z%' against the committed run."""
  readme = (ROOT / "README.md").read_text()
  claim = re.search(r"masked layer norm scores ([\d.]+)% at every padding length; unmasked "
                    r"falls from ([\d.]+)% to ([\d.]+)%", " ".join(readme.split()))
  if claim is None:
    return    # the sentence was reworded; the paragraph check above still holds
  rows = {(r["norm"].split()[0], r["masked"]): r["test_acc"] for r in _masked_results()["training"]}
  masked, unmasked = rows[("layer", True)], rows[("layer", False)]
  assert {f"{100 * v:.1f}" for v in masked.values()} == {claim[1]}
  pads = sorted(unmasked, key=int)
  assert (f"{100 * unmasked[pads[0]]:.1f}", f"{100 * unmasked[pads[-1]]:.1f}") == claim.group(2, 3)


def test_benchmark_durations_agree_with_the_committed_runs():
  """The durations the README and `benchmarks/run.py --help` give for the op-level and the
  whole-model runs are the wall times recorded in the results files."""
  readme = _section((ROOT / "README.md").read_text(), "Performance")
  usage = (ROOT / "benchmarks" / "run.py").read_text().split('"""')[1]
  for results_md, flag in (("results.md", "--no-models"), ("models.md", "--models")):
    wall = re.search(r"wall time (\d+) s", (RESULTS / results_md).read_text())[1]
    line = next(l for l in usage.splitlines() if re.search(rf"run\.py {flag}\s+#", l))
    assert f"{wall} s" in line, f"run.py --help for {flag}: {line.strip()!r}, {results_md}: {wall} s"
    assert re.search(rf"`{flag}`[^.;]*?\({wall} s", readme), f"README duration of {flag}"


# ---- README accuracy figures against benchmarks/results/numerics.{md,json} ---------------------

def _accuracy_places(readme):
  """The README's two accuracy passages: the intro bullet on statistics and the measured part
  of "Correctness on every path"'s "Order and length" bullet."""
  bullets = re.split(r"\n(?=\* )", readme)
  intro = [b for b in bullets if b.startswith("* statistics ") and "float64 reference" in b]
  order = [b for b in bullets if b.startswith("* **Order and length.**")]
  assert len(intro) == 1 and len(order) == 1, "README accuracy bullets not found"
  assert "Measured" in order[0], "the Order and length bullet has no measured part"
  return {"intro bullet": intro[0], "Order and length": order[0][order[0].index("Measured"):]}


def _numerics_fmt(metric, value):
  """`benchmarks/numerics.py`'s formatting of a table value."""
  sys.path.insert(0, str(ROOT / "benchmarks"))
  try:
    import numerics  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.remove(str(ROOT / "benchmarks"))
  return numerics.fmt(metric, value)


def test_readme_accuracy_numbers_come_from_the_numerics_run():
  """Every number of the README's accuracy passages occurs in numerics.md's table (the case
  descriptions or the measured values), and every measured one (a decimal point or a negative
  exponent) is a value of numerics.json as the table formats it; both passages cite the run."""
  readme = (ROOT / "README.md").read_text()
  md = (RESULTS / "numerics.md").read_text()
  table = "\n".join(line for line in md.splitlines() if line.startswith("| "))
  in_table = set(_NUMBER.findall(table))
  with open(RESULTS / "numerics.json") as f:
    records = json.load(f)["records"]
  measured = set()
  for rec in records:
    if "var" in rec["metrics"]:
      measured.add(_numerics_fmt("var", rec["reference"]["var"]))
    for values in rec["results"].values():
      measured |= {_numerics_fmt(m, values[m]) for m in rec["metrics"]}
  assert measured <= in_table, "numerics.md's table differs from numerics.json"
  assert "python benchmarks/numerics.py --full" in md, "numerics.md is not a --full run"
  for place, text in _accuracy_places(readme).items():
    text = " ".join(text.split())
    assert "benchmarks/results/numerics.md" in text and "benchmarks/numerics.py --full" in text, \
        f"README {place}: does not cite the run"
    numbers = _NUMBER.findall(text)
    assert numbers, f"README {place}: no numbers"
    unknown = sorted(set(numbers) - in_table)
    assert not unknown, f"README {place}: numbers in no row of numerics.md: {unknown}"
    stray = sorted(n for n in numbers if ("." in n or "e-" in n) and n not in measured)
    assert not stray, f"README {place}: values not measured in numerics.json: {stray}"


def test_readme_accuracy_claims_are_the_numerics_run_values():
  """Each accuracy figure of the README says what it is the value of; here each is compared
  with that value of numerics.json (a number swapped for another value of the table fails).
  A reworded sentence must be updated here too."""
  passages = {k: " ".join(v.split()) for k, v in _accuracy_places(
      (ROOT / "README.md").read_text()).items()}
  with open(RESULTS / "numerics.json") as f:
    records = json.load(f)["records"]
  ours = ("normjax_native", "normjax_jnp")
  fmt = _numerics_fmt

  def one(kind, shape=None, loc=None, outlier=False):
    found = [r for r in records if r["kind"] == kind and (shape is None or r["shape"] == shape)
             and (loc is None or r["loc"] == loc) and (r["outlier"] is not None) == outlier]
    assert len(found) == 1, (kind, shape, loc, outlier)
    return found[0]["results"], found[0]

  outlier, outlier_rec = one("batch", outlier=True)
  row24, _ = one("layer", shape=[1, 1 << 24])
  row28, _ = one("layer", shape=[1, 1 << 28])
  cols, _ = one("batch", shape=[1 << 24, 2])
  layer_1e5, _ = one("layer", loc=1e5)
  intro = re.search(
      r"variances come out within a relative (\S+) of a float64 reference and its outputs within "
      r"(\S+) \((\S+) of the largest output with the outlier\), where PyTorch's layer norm output "
      r"is off by (\S+) at `1e5` and flax's default fast variance by (\S+) ",
      passages["intro bullet"])
  assert intro, "README intro bullet reworded: update this test"
  assert intro.groups() == (
      fmt("var_rel_err", max(r["results"][i]["var_rel_err"] for r in records for i in ours)),
      fmt("out_abs_err", max(r["results"][i]["out_abs_err"] for r in records for i in ours
                             if "out_abs_err" in r["metrics"])),
      fmt("out_rel_err", max(outlier[i]["out_rel_err"] for i in ours)),
      fmt("out_abs_err", layer_1e5["torch"]["out_abs_err"]),
      fmt("out_abs_err", layer_1e5["flax"]["out_abs_err"]))
  order = re.search(
      r"shape (\(.*?\)) whose first element of every channel is 1e4 gives variance (\S+) on the "
      r"native kernels and (\S+) on the `jax.numpy` path \(float64 (\S+), PyTorch (\S+)\), within "
      r"a relative (\S+) and (\S+) in every channel; on `3 \+ N\(0, 1\)`, a 2\^24-value row's "
      r"variance is within (\S+) \(native\) and (\S+) \(`jax.numpy`\), a 2\^28-value row's within "
      r"(\S+) and (\S+), and two 2\^24-value batch-norm columns' within (\S+) on both paths "
      r"\(PyTorch: (\S+)\)\.", passages["Order and length"])
  assert order, "README Order and length bullet reworded: update this test"
  rel = lambda res, impl: fmt("var_rel_err", res[impl]["var_rel_err"])
  assert fmt("var_rel_err", cols["normjax_native"]["var_rel_err"]) == rel(cols, "normjax_jnp")
  assert order.groups() == (
      str(tuple(outlier_rec["shape"])), fmt("var", outlier["normjax_native"]["var"]),
      fmt("var", outlier["normjax_jnp"]["var"]), fmt("var", outlier_rec["reference"]["var"]),
      fmt("var", outlier["torch"]["var"]), rel(outlier, "normjax_native"),
      rel(outlier, "normjax_jnp"), rel(row24, "normjax_native"), rel(row24, "normjax_jnp"),
      rel(row28, "normjax_native"), rel(row28, "normjax_jnp"), rel(cols, "normjax_native"),
      rel(cols, "torch"))


# ---- the other measured passages against the committed runs they cite --------------------------

_DECIMAL = re.compile(r"(?<![\w.])\d+\.\d+(?:e[-+]?\d+)?")


@pytest.mark.parametrize("marker, sources", [
    # the variants table's fold_batch_norm row: the fold benchmark and its repeat run
    ("`fold_linen_params` folds", ("benchmarks/results/fold.md",
                                   "benchmarks/results/fold_repeat.md")),
    # the fused residual-add paragraph
    ("`add_rms_norm(x, residual, scale)`", ("benchmarks/results/add_norm.md",)),
])
def test_readme_measured_passages_come_from_their_runs(marker, sources):
  """Every decimal in the README line or paragraph at `marker` occurs in the results file(s)
  it cites (a changed number on either side fails)."""
  readme = (ROOT / "README.md").read_text()
  blocks = [b for b in re.split(r"\n\s*\n|\n(?=\|)", readme) if marker in b]
  assert len(blocks) == 1, f"README passage {marker!r} not found once"
  for source in sources:
    assert source in blocks[0], f"the README passage at {marker!r} does not cite {source}"
  known = set()
  for source in sources:
    known |= set(_DECIMAL.findall((ROOT / source).read_text()))
  unknown = sorted(set(_DECIMAL.findall(re.sub(r"`[^`]*`", "", blocks[0]))) - known)
  assert not unknown, f"README numbers at {marker!r} in none of {sources}: {unknown}"


def test_readme_data_parallel_numbers_come_from_its_run():
  section = _section((ROOT / "README.md").read_text(), "Data-parallel and multi-host training")
  known = set(_DECIMAL.findall((ROOT / "docs" / "data_parallel" / "results.md").read_text()))
  found = set(_DECIMAL.findall(re.sub(r"`[^`]*`", "", section)))
  assert len(found) >= 5, "the data-parallel section lost its measured numbers"
  assert not found - known, f"numbers in no docs/data_parallel/results.md: {found - known}"
