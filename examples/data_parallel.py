"""Data-parallel training with batch norm: the same numbers as one device, two ways.

Trains the claims lab's CNN (`claims_model.py`: a linear 3x3 stride-2 stem conv, then three
blocks conv - batch norm - relu of 16 channels at 4x4, pool, dense) on scikit-learn's 8x8 digits
with SGD + momentum, in three ways from the same weights on the same batches:

1. on one device, the whole batch at once (the reference);
2. with `jax.shard_map` over a 1-D mesh of 8 devices: each device gets 1/8 of every batch, and
   `nj.batch_norm(..., axis_name="batch")` psums the per-channel sums and counts over the mesh
   axis, so every device normalizes with the statistics of the *global* batch (synchronized or
   "cross-replica" batch norm); the loss is `pmean`'d, so the gradient is the global one;
3. with plain `jax.jit` on batch-sharded arrays (`NamedSharding(mesh, P("batch"))`, an
   `Explicit` mesh axis): the single-device code unchanged, partitioned by XLA, which inserts
   the cross-device reductions itself (no `axis_name`).

It then compares each run with the single-device one in two ways and prints the largest
differences of the parameters and running statistics: per step (every step started from the
single-device run's state: the computation itself, asserted to agree to `--tol`, 1e-5) and end
to end (each run trained on its own from the same start: float32 rounding, which differs
because the devices sum in another order, grows along training, as a control run on the same
batches with their examples reordered shows). The end-to-end drift is chaotic: a single step
can amplify it by orders of magnitude, at a step that depends on the seed and learning rate
(seed 2 ends 4.0e-2 from the single-device run in the parameters, against per-device batch
norm's 9.9e-2; seed 0 at peak lr 0.2 ends 2.0e-2 away, against 1.3e-1; seed 0 at the default
lr 0.1, the committed run, about 25 times below), so the per-step comparison is the test of
the computation. For contrast it also trains with per-device
batch norm (the same shard_map step without `axis_name`, running statistics averaged over the
devices afterwards, as in many data-parallel loops): its numbers do *not* match, because the
variance of a global batch is not the mean of per-device variances.

The 8 devices are simulated on the CPU (`XLA_FLAGS=--xla_force_host_platform_device_count=8`,
set below before jax is imported unless XLA_FLAGS already sets a device count). On a machine
with 8 accelerators the same script runs on them unchanged; for several hosts see the README
section "Data-parallel and multi-host training".

  python examples/data_parallel.py --quick     # 30 steps of 64 images, about 1 min on 2 cores
  python examples/data_parallel.py --out docs/data_parallel   # 300 steps of 256 (about 1.5 min)
"""

from __future__ import annotations

import os

NUM_DEVICES = 8
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={NUM_DEVICES}").strip()

import argparse  # noqa: E402
import functools  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import claims_model as cm  # noqa: E402  (the CNN: init_params, init_state, cnn_forward)
import normjax as nj  # noqa: E402

AXIS = "batch"      # the mesh axis the batch is split along
DEPTH, WIDTH = 3, 16   # the CNN's normalized blocks and their channels
Params = dict[str, Any]
Step = Callable[..., tuple[Params, nj.BatchStats, Any, jax.Array]]


def model_config(momentum: float) -> cm.Config:
  """The claims lab's CNN at `DEPTH` x `WIDTH`, batch norm with running-average `momentum`
  (only the model fields matter here: `cnn_forward` reads no batch size or step count)."""
  return cm.Config(batch_size=0, steps_per_chunk=0, num_chunks=0, depth=DEPTH, width=WIDTH,
                   bn_momentum=momentum)


def forward(params: Params, state: nj.BatchStats, x: jax.Array, cfg: cm.Config, train: bool,
            axis_name: str | None = None) -> tuple[jax.Array, nj.BatchStats]:
  """`cm.cnn_forward` with batch norm in every block, over `axis_name` if given (inside
  `shard_map`: the statistics of the global batch) -> `(logits, new running statistics)`."""
  def norm(p, stats, h, cfg, train, ctx):
    return nj.batch_norm(h, p["scale"], p["bias"], stats, train=train,
                         momentum=cfg.bn_momentum, axis_name=axis_name)

  ctx = cm.Ctx(step=jnp.zeros((), jnp.int32), num_steps=1, key=None)   # no dropout
  return cm.cnn_forward(params, state, x, 0, (cm.Variant(norm, uses_stats=True),), cfg,
                        train, ctx)


def make_step(optimizer, momentum: float, axis_name: str | None = None,
              pool_statistics: bool = True) -> Step:
  """`step(params, state, opt_state, x [B, 8, 8, 1], y [B]) -> (params, state, opt_state, loss)`.

  `axis_name=None`: the single-device step (also the one `jit` partitions over sharded arrays).
  Inside `shard_map` pass the mesh axis: `x`, `y` are then this device's shard of the batch.
  With `pool_statistics` batch norm takes `axis_name` and normalizes with the global batch's
  statistics; without it each device uses its own shard's statistics and the new running
  statistics are averaged over the devices afterwards (for the comparison only).
  """
  bn_axis = axis_name if pool_statistics else None
  cfg = model_config(momentum)

  def loss_fn(params, state, x, y):
    logits, new_state = forward(params, state, x, cfg, True, bn_axis)
    loss, _ = _common.cross_entropy(logits, y)
    if axis_name is not None:     # equal shards: the global mean loss is the mean of the means
      loss = jax.lax.pmean(loss, axis_name)
    return loss, new_state

  def step(params, state, opt_state, x, y):
    (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state, x, y)
    if axis_name is not None and not pool_statistics:   # per-device running statistics
      state = state._replace(mean=jax.lax.pmean(state.mean, axis_name),   # ([depth, C]),
                             var=jax.lax.pmean(state.var, axis_name))     # averaged
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
    return params, state, opt_state, loss

  return step


def single_device_step(optimizer, momentum: float) -> Step:
  """The reference: the whole batch on one device (also what `jit` partitions)."""
  return jax.jit(make_step(optimizer, momentum))


def shard_map_step(optimizer, momentum: float, mesh: jax.sharding.Mesh,
                   pool_statistics: bool = True) -> Step:
  """The step under `jax.shard_map`: parameters, state and optimizer state replicated
  (`P()`), the batch split along the mesh axis (`P(AXIS)`)."""
  step = make_step(optimizer, momentum, axis_name=AXIS, pool_statistics=pool_statistics)
  return jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P(), P(AXIS), P(AXIS)),
                               out_specs=(P(), P(), P(), P())))


def make_mesh(num_devices: int, explicit: bool = False) -> jax.sharding.Mesh:
  """A 1-D mesh over the first `num_devices` devices, its axis named `AXIS`."""
  if jax.device_count() < num_devices:
    raise ValueError(f"num_devices={num_devices} exceeds the {jax.device_count()} devices jax "
                     f"sees; set XLA_FLAGS=--xla_force_host_platform_device_count={num_devices} "
                     f"before jax is imported.")
  kind = jax.sharding.AxisType.Explicit if explicit else jax.sharding.AxisType.Auto
  return jax.make_mesh((num_devices,), (AXIS,), axis_types=(kind,),
                       devices=jax.devices()[:num_devices])


def train(step: Step, params: Params, state: nj.BatchStats, opt_state: Any, batches,
          put: Callable[[Any], Any] = jnp.asarray, desc: str = "", progress: bool = True,
          trajectory: list | None = None) -> tuple[Params, nj.BatchStats, np.ndarray]:
  """Runs `step` over `batches` (pairs of NumPy `x`, `y`); `put` places each batch array.

  Returns the final parameters, running statistics and the per-step losses; appends the
  `(params, state, opt_state)` before every step, and the final one, to `trajectory` if given.
  """
  from tqdm.auto import tqdm

  losses = []
  for x, y in tqdm(batches, desc=desc, unit="step", disable=not progress, dynamic_ncols=True,
                   leave=False):
    if trajectory is not None:
      trajectory.append((params, state, opt_state))
    params, state, opt_state, loss = step(params, state, opt_state, put(x), put(y))
    # One step at a time: with many steps queued asynchronously, the simulated CPU devices'
    # all-reduce rendezvous could stall (one device thread late by > 40 s, and XLA aborts).
    losses.append(jax.block_until_ready(loss))
  if trajectory is not None:
    trajectory.append((params, state, opt_state))
  return params, state, np.asarray(jax.device_get(losses))


def max_difference(a: Any, b: Any) -> float:
  """The largest absolute elementwise difference between two pytrees of arrays."""
  diffs = jax.tree.map(lambda u, v: float(np.max(np.abs(np.asarray(u, np.float64) -
                                                        np.asarray(v, np.float64)))), a, b)
  return max(jax.tree.leaves(diffs))


def per_step_difference(step: Step, trajectory: list, batches, put: Callable[[Any], Any],
                        put_replicated: Callable[[Any], Any],
                        progress: bool = True, desc: str = "") -> tuple[float, float]:
  """Largest differences of `step` from the reference over each step, from the same state.

  Step `i` starts from the reference run's `trajectory[i]` (placed by `put_replicated`) and is
  compared with `trajectory[i + 1]`: `(params, running statistics)` max differences.
  """
  from tqdm.auto import tqdm

  worst = [0.0, 0.0]
  for i, (x, y) in enumerate(tqdm(batches, desc=desc, unit="step", disable=not progress,
                                  dynamic_ncols=True, leave=False)):
    params, state, _, _ = step(*put_replicated(trajectory[i]), put(x), put(y))
    want = trajectory[i + 1]
    worst[0] = max(worst[0], max_difference(params, want[0]))
    worst[1] = max(worst[1], max_difference(state, want[1]))
  return worst[0], worst[1]


def run(batch_size: int = 64, steps: int = 30, num_devices: int = NUM_DEVICES, lr: float = 0.1,
        momentum: float = 0.9, seed: int = 0, progress: bool = True,
        contrast: bool = True) -> dict[str, Any]:
  """Trains single-device, shard_map and sharded-jit (and optionally per-device BN) runs.

  Returns a dict with, per run: `params_max_diff`, `stats_max_diff`, `loss_max_diff` (end to
  end: after `steps` steps each from the same start), `step_params_max_diff`,
  `step_stats_max_diff` (every step from the single-device run's state, the largest
  difference over the steps), `losses` and `wall_s`; plus `test_acc` of the single-device
  model.
  """
  if batch_size % num_devices:
    raise ValueError(f"batch_size={batch_size} must be a multiple of num_devices={num_devices} "
                     f"(every device gets batch_size / num_devices examples).")
  data = _common.load_digits()
  rng = np.random.default_rng(seed)
  cfg = model_config(momentum)
  params0 = cm.init_params(rng, cfg)
  del params0["blocks"]["tau"]     # filter response norm's threshold: batch norm has none
  order = _common.example_order(rng, len(data.y_train), steps * batch_size)
  batches = [(data.x_train[i], data.y_train[i]) for i in order.reshape(steps, batch_size)]
  optimizer = _common.make_optimizer(lr, steps)

  def fresh():
    params = jax.tree.map(jnp.asarray, params0)
    return params, cm.init_state(cfg), optimizer.init(params)

  results: dict[str, Any] = {}
  reference: list = []

  def record(name, step, mesh=None, batches=batches):
    if mesh is None:
      put = put_replicated = lambda a: a
    else:
      put = functools.partial(jax.device_put, device=NamedSharding(mesh, P(AXIS)))
      put_replicated = functools.partial(jax.device_put, device=NamedSharding(mesh, P()))
    t0 = time.perf_counter()
    params, state, losses = train(step, *fresh(), batches, put, desc=name, progress=progress,
                                  trajectory=reference if name == "single device" else None)
    r = results[name] = {"params": params, "stats": state, "losses": losses,
                         "wall_s": time.perf_counter() - t0}
    if name != "single device":
      r["step_params_max_diff"], r["step_stats_max_diff"] = per_step_difference(
          step, reference, batches, put, put_replicated, progress, f"{name} (per step)")
    else:
      r["step_params_max_diff"] = r["step_stats_max_diff"] = 0.0

  record("single device", single_device_step(optimizer, momentum))
  # A control: the same batches with their examples in another order are the same
  # computation (batch statistics and the mean loss do not depend on the order), summed in
  # another order: the size of pure float32 rounding, per step and grown over training.
  shuffled = [(x[p], y[p]) for (x, y), p in
              zip(batches, (rng.permutation(batch_size) for _ in batches))]
  record("single device, reordered", single_device_step(optimizer, momentum),
         batches=shuffled)
  mesh = make_mesh(num_devices)
  record("shard_map + axis_name", shard_map_step(optimizer, momentum, mesh), mesh)
  # jit over sharded arrays: an Explicit mesh axis, so that the sharding is part of the array
  # type and normjax keeps XLA's own (partitionable) ops (see normjax/_src/dispatch.py).
  emesh = make_mesh(num_devices, explicit=True)
  with jax.set_mesh(emesh):
    record("jit, sharded batch", single_device_step(optimizer, momentum), emesh)
  if contrast:
    record("shard_map, per-device BN",
           shard_map_step(optimizer, momentum, mesh, pool_statistics=False), mesh)

  ref = results["single device"]
  for r in results.values():
    r["params_max_diff"] = max_difference(r["params"], ref["params"])
    r["stats_max_diff"] = max_difference(r["stats"], ref["stats"])
    r["loss_max_diff"] = float(np.max(np.abs(r["losses"] - ref["losses"])))
  logits, _ = forward(ref["params"], ref["stats"], jnp.asarray(data.x_test), cfg, train=False)
  results["test_acc"] = float(_common.cross_entropy(logits, jnp.asarray(data.y_test))[1])
  return results


FULL = dict(batch_size=256, steps=300)
QUICK = dict(batch_size=64, steps=30)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0] + " Trains the digits CNN on one device, with "
      "shard_map + axis_name and with jit over a batch-sharded array, and checks that "
      "parameters and running statistics agree.",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--quick", action="store_true",
                 help=f"a short run: {QUICK} (otherwise {FULL})")
  p.add_argument("--batch-size", type=int,
                 help="global batch size, split evenly over the devices; None: 256, or 64 with "
                 "--quick")
  p.add_argument("--steps", type=int,
                 help="training steps of each run; None: 300, or 30 with --quick")
  p.add_argument("--num-devices", type=int, default=NUM_DEVICES,
                 help="devices of the mesh (simulated CPU devices unless accelerators exist)")
  p.add_argument("--lr", type=float, default=0.1,
                 help="peak SGD learning rate (warmup + cosine schedule, momentum 0.9)")
  p.add_argument("--bn-momentum", type=float, default=0.9,
                 help="batch-norm running-average momentum (new = m * old + (1 - m) * batch)")
  p.add_argument("--seed", type=int, default=0, help="initial weights and example order")
  p.add_argument("--tol", type=float, default=1e-5,
                 help="largest allowed difference of parameters and running statistics from "
                 "the single-device step, each step started from the single-device state")
  p.add_argument("--no-contrast", action="store_true",
                 help="skip the per-device batch norm run (shard_map without axis_name)")
  p.add_argument("--out", help="if given, a directory to write results.md and results.json to")
  p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
  args = p.parse_args(argv)
  for k, v in (QUICK if args.quick else FULL).items():
    if getattr(args, k) is None:
      setattr(args, k, v)
  return args


def report(results: dict[str, Any], args: argparse.Namespace) -> list[str]:
  """The table and the conclusions, as lines (printed, and written with `--out`)."""
  lines = [f"{jax.device_count()} {jax.default_backend()} devices; global batch "
           f"{args.batch_size} ({args.batch_size // args.num_devices} per device), {args.steps} "
           f"steps, peak lr {args.lr}, batch-norm momentum {args.bn_momentum}, seed {args.seed}.",
           "",
           f"Largest difference from the single-device run: every step started from the "
           f"single-device state (per step), and after {args.steps} steps each from the same "
           f"start (end to end).",
           "",
           "| run | per step: params | per step: stats | end to end: params | end to end: "
           "stats | end to end: loss | final loss | wall |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for name, r in results.items():
    if isinstance(r, dict):
      lines.append(f"| {name} | {r['step_params_max_diff']:.1e} | {r['step_stats_max_diff']:.1e} "
                   f"| {r['params_max_diff']:.1e} | {r['stats_max_diff']:.1e} | "
                   f"{r['loss_max_diff']:.1e} | {r['losses'][-1]:.4f} | {r['wall_s']:.1f} s |")
  lines += ["", f"Single-device model: test accuracy {100 * results['test_acc']:.1f}%.", "",
            f"Every step of shard_map + axis_name and of jit over the sharded batch gives the "
            f"single-device parameters and running statistics to {args.tol:g}."]
  if "shard_map, per-device BN" in results:
    c = results["shard_map, per-device BN"]
    lines.append(f"Per-device batch norm (no axis_name) does not: its steps differ by "
                 f"{c['step_params_max_diff']:.1e} (parameters) and "
                 f"{c['step_stats_max_diff']:.1e} (statistics).")
  o = results["single device, reordered"]
  lines.append(f"End to end, float32 rounding (the devices sum in another order) grows along "
               f"training as any change of summation order does: the single-device run on the "
               f"same batches with their examples reordered ends {o['params_max_diff']:.1e} "
               f"away in the parameters.")
  return lines


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  t0 = time.perf_counter()
  print(f"{jax.device_count()} {jax.default_backend()} devices; global batch {args.batch_size} "
        f"({args.batch_size // args.num_devices} per device), {args.steps} steps")
  results = run(args.batch_size, args.steps, args.num_devices, args.lr, args.bn_momentum,
                args.seed, progress=not args.no_progress, contrast=not args.no_contrast)
  lines = report(results, args)
  print("\n" + "\n".join(lines[2:]))
  for name in ("shard_map + axis_name", "jit, sharded batch"):
    r = results[name]
    worst = max(r["step_params_max_diff"], r["step_stats_max_diff"])
    assert worst <= args.tol, f"{name}: a step differs from the single-device one by {worst:.2e}"
    if "shard_map, per-device BN" in results:   # end to end: far below a real difference
      c = results["shard_map, per-device BN"]
      assert r["params_max_diff"] < 0.1 * c["params_max_diff"], (name, r["params_max_diff"])
  if args.out:
    command = "python examples/data_parallel.py " + " ".join(
        sys.argv[1:] if argv is None else list(argv))
    md = ["# Data-parallel batch norm: shard_map + axis_name and jit over a sharded batch", "",
          *lines, "", f"Command: `{command.strip()}`; machine: {os.cpu_count()} CPUs, jax "
          f"{jax.__version__}.", ""]
    scalars = {name: {k: v for k, v in r.items() if k.endswith(("_diff", "_s"))}
               | {"final_loss": float(r["losses"][-1])}
               for name, r in results.items() if isinstance(r, dict)}
    _common.write_results(args.out, md, {"config": vars(args), "runs": scalars,
                                         "test_acc": results["test_acc"],
                                         "machine": _common.machine_info()},
                          time.perf_counter() - t0)
  return results


if __name__ == "__main__":
  main()
