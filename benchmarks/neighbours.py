"""Diagnostic: the RMS-norm kernel's time depending on the program that ran just before it.

    python benchmarks/neighbours.py floor    # normjax rms, flax rms and jit(x * c), random order
    python benchmarks/neighbours.py none     # normjax rms and flax rms only

Prints each candidate's median time after each predecessor (see OPTIMIZATION_LOG section 10).
Run it with tcmalloc preloaded, as benchmarks/run.py does.
"""
import sys, time, random, numpy as np, jax, jax.numpy as jnp, normjax as nj, flax.linen as fnn
x = jnp.asarray(np.random.randn(8, 512, 1024).astype(np.float32))
s = jnp.ones(1024)
fs = {"nj_rms": jax.jit(lambda x, s: nj.rms_norm(x, s, eps=1e-6)),
      "flax_rms": jax.jit(lambda x, s: fnn.RMSNorm(epsilon=1e-6).apply({"params": {"scale": s}}, x))}
if sys.argv[1] == "floor":
    fs["floor"] = jax.jit(lambda x, s: x * 1.0001)
for f in fs.values(): f(x, s).block_until_ready()
ts = {k: [] for k in fs}; after = {k: [] for k in fs}
prev = None
for r in range(400):
    for k in random.sample(list(fs), len(fs)):
        t = time.perf_counter(); fs[k](x, s).block_until_ready(); dt = time.perf_counter() - t
        ts[k].append(dt); after[k].append((prev, dt)); prev = k
print(sys.argv[1], {k: round(1e3 * np.median(v), 3) for k, v in ts.items()})
for k in fs:
    for p in fs:
        v = [dt for q, dt in after[k] if q == p]
        if v: print(f"  {k} after {p}: {1e3*np.median(v):.3f} ms (n={len(v)})")
