"""The native kernel builds as a user builds it and runs on every x86-64 CPU.

setup.py compiles the kernel for the x86-64 baseline and its loops also for AVX2+FMA and
AVX-512, picked at run time (normjax/_src/kernels/cpu/levels.cc). These tests build a wheel as pip
builds it (`pip wheel`, with build isolation: the build requirements of pyproject.toml in a fresh
environment, not this one's setuptools) from a copy of the sources in a temporary directory,
unpack it, then run one script with every variant (layer
and RMS norm, instance norm NHWC and NCHW, group norm, batch norm NHWC and NCHW, the gated RMS
norm's and dynamic tanh's kernels; forward and gradient; float32 and bfloat16): in-process at every level this CPU has
(`NORMJAX_CPU_LEVEL`), where the kernels' outputs must be bit-identical, and under
`qemu-x86_64 -cpu max` (a CPU with AVX2 but no AVX-512 in qemu 7.2), where the dispatched level
must not be AVX-512 and the results must match. The baseline code must not use AVX registers.
"""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
X86 = os.uname().machine == "x86_64"
pytestmark = pytest.mark.slow   # a wheel build (about a minute), then qemu

_SCRIPT = r'''
import sys
import numpy as np
import jax, jax.numpy as jnp
import normjax as nj
from normjax._src.kernels import cpu as _native, gated as _gated, moments as _columns, rows as _rows
from normjax._src.kernels import tanh as _tanh
assert _native.NATIVE
rng = np.random.default_rng(0)
out = {"level": np.asarray(_native.CPU_LEVEL)}
nhwc = rng.normal(size=(2, 5, 6, 8)).astype(np.float32) + 3.0
nhwc[0, 0, 0] = 1e3                                  # an outlier first
nchw = np.ascontiguousarray(np.moveaxis(nhwc, -1, 1))
rows = rng.normal(size=(37, 67)).astype(np.float32)  # vector loops and scalar tails
wide = rng.normal(size=(2, 300, 72)).astype(np.float32)  # channel slices, a tail, 3 blocks
wide[1, 150:] += 50.0                                # a later block far from the mean so far
long = rng.normal(size=(9, 2100)).astype(np.float32)  # row groups of 4 and 1, 3 blocks per row
long[2] += 1e3
long[5, 1024:] += 50.0                               # re-summed about its own mean
long[7, 3], long[8, 100] = np.nan, np.inf            # NaN rows (NaN kept in bfloat16)
g8, g67 = jnp.linspace(0.5, 1.5, 8), jnp.linspace(0.5, 1.5, 67)
bn = lambda x, axis: nj.batch_norm(x, g8, g8, nj.init_batch_stats(8), train=True,
                                   channel_axis=axis)[0]
variants = {
    "layer": (lambda x: nj.layer_norm(x, g67, g67), rows),
    "rms": (lambda x: nj.rms_norm(x, g67), rows),
    "instance_nhwc": (lambda x: nj.instance_norm(x, g8, g8), nhwc),
    "instance_nchw": (lambda x: nj.instance_norm(x, g8, g8, channel_axis=1), nchw),
    "group_nhwc": (lambda x: nj.group_norm(x, g8, g8, num_groups=2), nhwc),
    "group_nchw": (lambda x: nj.group_norm(x, g8, g8, num_groups=2, channel_axis=1), nchw),
    "batch_nhwc": (lambda x: bn(x, -1), nhwc),
    "batch_nchw": (lambda x: bn(x, 1), nchw),
}
def _tanh_of(x, alpha):
  """tanh(alpha * x) of a NumPy array, in float32."""
  return jnp.asarray(np.tanh(alpha * np.asarray(x, np.float64)).astype(np.float32))
def everything(inputs, x):
  """Every variant's output and gradient, and the kernels' own outputs, in one program (one
  compile: compiling is what takes the time under qemu)."""
  results = {}
  for key, (fn, _) in variants.items():
    loss = lambda x: jnp.sum(jnp.sin(fn(x).astype(jnp.float32)))
    results[f"{key}/y"] = fn(inputs[key])
    results[f"{key}/grad"] = jax.grad(loss)(inputs[key])
  for per_row in (False, True):     # the kernels alone: bit-identical at every level
    p = jnp.linspace(0.5, 1.5, 37 if per_row else 67)
    for centered in (True, False):
      kw = dict(centered=centered, per_row=per_row)
      y, s, o, v = _rows.rows_forward_p.bind(x, p, p, eps=1e-5, **kw)
      # Any rstd will do; XLA's own rsqrt or division would round differently under qemu.
      rstd = jnp.asarray(np.linspace(0.5, 2.0, 37, dtype=np.float32))
      grads = _rows.rows_backward_p.bind(x, x, s, o, rstd, p, **kw)
      for i, a in enumerate((y, s, o, v) + tuple(grads)):
        results[f"kernel/rows/{per_row}/{centered}/{i}"] = a
      # The residual-add backward: the cotangent of h added to dx in the kernel.
      for i, a in enumerate(_rows.rows_add_backward_p.bind(x, x, x[::-1], s, o, rstd, p, **kw)):
        results[f"kernel/rows_add_backward/{per_row}/{centered}/{i}"] = a
      # The fused residual add (h = x + residual, then the forward on h).
      for i, a in enumerate(_rows.rows_add_forward_p.bind(x, x[::-1] * 3.0, p, p, eps=1e-5,
                                                          **kw)):
        results[f"kernel/rows_add/{per_row}/{centered}/{i}"] = a
      # bfloat16 x, float32 residual: h in float32, y in bfloat16.
      for i, a in enumerate(_rows.rows_add_forward_mixed_p.bind(
          x.astype(jnp.bfloat16), x[::-1].astype(jnp.float32) * 3.0, p, p, eps=1e-5, **kw)):
        results[f"kernel/rows_add_mixed/{per_row}/{centered}/{i}"] = a
      # Its backward: float32 h, bfloat16 cotangent; dx in bfloat16, dh in float32.
      for i, a in enumerate(_rows.rows_add_backward_mixed_p.bind(
          x.astype(jnp.float32), x.astype(jnp.bfloat16), x[::-1].astype(jnp.float32), s, o,
          rstd, p, **kw)):
        results[f"kernel/rows_add_backward_mixed/{per_row}/{centered}/{i}"] = a
      # Without h's cotangent (h unused after the norm).
      for i, a in enumerate(_rows.rows_backward_mixed_p.bind(
          x.astype(jnp.float32), x.astype(jnp.bfloat16), s, o, rstd, p, **kw)):
        results[f"kernel/rows_backward_mixed/{per_row}/{centered}/{i}"] = a
  # The gated RMS norm, its gate (exp) over every float32 exponent and beyond, both orders.
  pf = jnp.asarray(np.linspace(0.5, 1.5, 67, dtype=np.float32))
  zz = jnp.asarray(np.linspace(-110.0, 95.0, 37 * 67, dtype=np.float32).reshape(37, 67))
  for before in (False, True):
    kw = dict(eps=1e-5, before=before)
    for i, a in enumerate(_gated.rows_gated_forward_p.bind(x, zz.astype(x.dtype), pf, **kw)
                          + _gated.rows_gated_backward_p.bind(x, zz.astype(x.dtype), pf,
                                                              x[::-1], **kw)):
      results[f"kernel/gated/{before}/{i}"] = a
    # Groups: row r scaled by scale row r % 4, dscale summed per group.
    kw = dict(eps=1e-5, before=before, groups=4)
    xg, zg = x[:36], zz[:36].astype(x.dtype)
    pg = jnp.asarray(np.linspace(0.5, 1.5, 4 * 67, dtype=np.float32))
    for i, a in enumerate(_gated.rows_gated_forward_p.bind(xg, zg, pg, **kw)
                          + _gated.rows_gated_backward_p.bind(xg, zg, pg, xg[::-1], **kw)):
      results[f"kernel/gated_groups/{before}/{i}"] = a
  # Dynamic tanh's backward: its own tanh over both branches and saturation (not saved), and
  # a saved t (any will do; XLA's tanh would round differently under qemu: NumPy's).
  for saved in (False, True):
    for i, a in enumerate(_tanh.tanh_backward_p.bind(x * 3.0, _tanh_of(rows * 3.0, 0.7),
                                                     jnp.asarray([0.7], jnp.float32), pf,
                                                     x[::-1], saved=saved)):
      results[f"kernel/tanh/{saved}/{i}"] = a
  for size in (1, 4):
    for i, a in enumerate(_columns.column_moments_p.bind(
        inputs["batch_nhwc"].reshape(2, 30, 8), group_size=size)):
      results[f"kernel/columns/{size}/{i}"] = a
    for i, a in enumerate(_columns.column_moments_p.bind(wide.astype(x.dtype), group_size=size)):
      results[f"kernel/columns_wide/{size}/{i}"] = a
  # The backward's sums about each (example, channel)'s mean (slices, a tail, several blocks).
  shift = wide.mean(1).astype(np.float32)
  for i, a in enumerate(_columns.column_sums_p.bind(wide.astype(x.dtype), wide[:, ::-1] * 0.5,
                                                    shift, shift * 1e-3)):
    results[f"kernel/column_sums/{i}"] = a
  rows_mean = rows.mean(1).astype(np.float32)
  for i, a in enumerate(_columns.row_sums_p.bind(x, rows[::-1] * 0.5, rows_mean,
                                                 rows_mean * 1e-3)):
    results[f"kernel/row_sums/{i}"] = a
    for pool in (False, True):
      for i, a in enumerate(_columns.row_moments_p.bind(
          inputs["batch_nchw"].reshape(2, 8, 30), pool_outer=pool, group_size=size)):
        results[f"kernel/row_moments/{pool}/{size}/{i}"] = a
  # Long rows, several blocks each, in groups of rows summed together (and one alone).
  lx = jnp.asarray(long).astype(x.dtype)
  pl = jnp.asarray(np.linspace(0.5, 1.5, 2100, dtype=np.float32))  # XLA's linspace may round
  y, s, o, v = _rows.rows_forward_p.bind(lx, pl, pl, eps=1e-5, centered=True, per_row=False)
  rstd = jnp.asarray(np.linspace(0.5, 2.0, 9, dtype=np.float32))
  grads = _rows.rows_backward_p.bind(lx, lx[::-1], s, o, rstd, pl, centered=True, per_row=False)
  for i, a in enumerate((y, s, o, v) + tuple(grads)):
    results[f"kernel/long_rows/{i}"] = a
  for i, a in enumerate(_columns.row_moments_p.bind(lx.reshape(3, 3, 2100), pool_outer=True,
                                                    group_size=1)):
    results[f"kernel/long_row_moments/{i}"] = a
  for i, a in enumerate(_columns.row_sums_p.bind(lx, long[::-1] * 0.5, s, o)):
    results[f"kernel/long_row_sums/{i}"] = a
  for before in (False, True):
    kw = dict(eps=1e-5, before=before)
    for i, a in enumerate(_gated.rows_gated_forward_p.bind(lx, lx[::-1] * 3.0, pl, **kw)
                          + _gated.rows_gated_backward_p.bind(lx, lx[::-1] * 3.0, pl,
                                                              lx[:, ::-1], **kw)):
      results[f"kernel/long_gated/{before}/{i}"] = a
  for saved in (False, True):
    for i, a in enumerate(_tanh.tanh_backward_p.bind(lx, _tanh_of(long, 0.3),
                                                     jnp.asarray([0.3], jnp.float32), pl,
                                                     lx[::-1], saved=saved)):
      results[f"kernel/long_tanh/{saved}/{i}"] = a
  return results


for dtype in (jnp.float32, jnp.bfloat16):
  name = jnp.dtype(dtype).name
  inputs = {key: jnp.asarray(x).astype(dtype) for key, (_, x) in variants.items()}
  for key, v in jax.jit(everything)(inputs, jnp.asarray(rows).astype(dtype)).items():
    key = f"kernel/{name}/{key[7:]}" if key.startswith("kernel/") else f"{name}/{key}"
    out[key] = np.asarray(v.astype(jnp.float32))
np.savez(sys.argv[1], **out)
'''


# What a build reads (pyproject.toml's readme and license-files, MANIFEST.in): the rest of a
# checkout is copied too, less what a build or a virtualenv leaves behind.
_NOT_SOURCES = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "*.so",
                                      "__pycache__", ".pytest_cache", ".hypothesis", "site")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """normjax as pip builds it: `pip wheel --no-deps` (build isolation) of a copy of the
  sources, unpacked into a temporary directory. A failed build shows pip's and the compiler's
  output."""
  if shutil.which("g++") is None and shutil.which("c++") is None:
    pytest.skip("no C++ compiler")
  if importlib.util.find_spec("pip") is None:
    pytest.skip("pip is not installed in this environment")
  tmp = tmp_path_factory.mktemp("build")
  shutil.copytree(ROOT, tmp / "src", ignore=_NOT_SOURCES)   # builds write into the tree
  env = {k: v for k, v in os.environ.items() if k != "NORMJAX_NATIVE_MARCH"}  # the portable build
  env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
  result = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps",
                           "--wheel-dir", str(tmp / "wheel"), str(tmp / "src")],
                          env=env, capture_output=True, text=True, check=False)
  # pip's and the compiler's output, less the file lists (copying/adding ...), last 8000 chars.
  lines = (result.stdout + result.stderr).splitlines()
  output = "\n".join([f"$ {' '.join(result.args)}"] + [
      line for line in lines
      if not re.match(r"\s*(copying|adding|creating|removing) ", line)])[-8000:]
  assert result.returncode == 0, f"pip wheel failed (exit {result.returncode}):\n{output}"
  wheels = list((tmp / "wheel").glob("normjax-*.whl"))
  assert len(wheels) == 1, f"pip wheel built {wheels}:\n{output}"
  with zipfile.ZipFile(wheels[0]) as wheel:
    wheel.extractall(tmp / "pkg")
  built = list((tmp / "pkg" / "normjax" / "_src" / "kernels" / "cpu").glob("_normalize*.so"))
  assert len(built) == 1, f"the wheel has no native kernel (the build skips it when it fails " \
                          f"to compile):\n{output}"
  (tmp / "check.py").write_text(_SCRIPT)
  return tmp, str(built[0])


@pytest.fixture(scope="module")
def native(built):
  """The script's results in-process, at the best level this CPU has."""
  return _run(built[0], "native")


def _run(tmp, name, prefix=(), **env):
  env = dict(os.environ, PYTHONPATH=str(tmp / "pkg"), JAX_PLATFORMS="cpu", **env)
  env.pop("XLA_FLAGS", None)
  env.pop("NORMJAX_NATIVE", None)
  result = subprocess.run(list(prefix) + [sys.executable, str(tmp / "check.py"),
                                          str(tmp / f"{name}.npz")],
                          cwd=str(tmp), env=env, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  return dict(np.load(tmp / f"{name}.npz"))


def _compare(got, want, exact_kernels):
  assert set(got) == set(want)
  for key in want:
    if key == "level":
      continue
    if key.startswith("kernel/") and exact_kernels:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    else:   # XLA's own code around the kernels may round differently on another CPU
      rtol, atol = (2e-2, 2e-2) if "bfloat16" in key else (1e-4, 1e-5)
      np.testing.assert_allclose(got[key], want[key], rtol=rtol, atol=atol, err_msg=key)


@pytest.mark.skipif(not X86, reason="the dispatched levels are x86-64 only")
def test_every_level_gives_the_same_results(built, native):
  tmp, _ = built
  best = native
  levels = {"avx512": ["avx2", "baseline"], "avx2": ["baseline"], "baseline": []}
  for level in levels[str(best["level"])]:
    capped = _run(tmp, level, NORMJAX_CPU_LEVEL=level)
    assert str(capped["level"]) == level
    _compare(capped, best, exact_kernels=True)


@pytest.mark.skipif(not X86, reason="qemu-x86_64 emulates an x86-64 CPU")
def test_runs_under_qemu_without_avx512(built, native):
  qemu = shutil.which("qemu-x86_64")
  if qemu is None:
    pytest.skip("qemu-x86_64 not installed (Debian: apt-get install qemu-user)")
  tmp, _ = built
  emulated = _run(tmp, "qemu", prefix=(qemu, "-cpu", "max"))
  assert str(emulated["level"]) in ("avx2", "baseline")
  _compare(emulated, native, exact_kernels=True)


@pytest.mark.skipif(not X86, reason="x86-64 registers")
def test_baseline_code_uses_no_avx_registers(built):
  objdump = shutil.which("objdump")
  if objdump is None:
    pytest.skip("objdump not installed")
  _, library = built
  text = subprocess.run([objdump, "-d", "-C", "--no-show-raw-insn", library], check=True,
                        capture_output=True, text=True).stdout
  offenders = set()
  for function in re.split(r"\n(?=[0-9a-f]+ <)", text):
    name = function.split("\n", 1)[0]
    if "::avx2::" in name or "::avx512::" in name:
      continue
    if re.search(r"%[yz]mm", function):
      offenders.add(name)
  assert not offenders, sorted(offenders)[:5]
  assert re.search(r"::avx512::.*\n(.*\n)*?.*%zmm", text), "no AVX-512 clone found"
