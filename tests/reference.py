"""An independent float64 NumPy reference for every normjax variant.

Written directly from the definitions (moveaxis + reshape + two-pass float64 moments), sharing
no code with normjax, so that a test against it can fail.
"""

from __future__ import annotations

import numpy as np


def _f64(a):
  return None if a is None else np.asarray(a, dtype=np.float64)


def moments(x, axes, mask=None):
  """Two-pass float64 mean and biased variance over `axes` (kept), counting only `mask`."""
  x = _f64(x)
  axes = tuple(axes)
  if mask is None:
    mask = np.ones(x.shape, bool)
  mask = np.broadcast_to(np.asarray(mask, bool), x.shape)
  n = mask.sum(axis=axes, keepdims=True).astype(np.float64)
  n_safe = np.maximum(n, 1.0)
  mean = np.where(mask, x, 0.0).sum(axis=axes, keepdims=True) / n_safe
  var = np.where(mask, (x - mean) ** 2, 0.0).sum(axis=axes, keepdims=True) / n_safe
  return mean, var, n


def _affine(y, scale, bias, shape):
  if scale is not None:
    y = y * _f64(scale).reshape(shape)
  if bias is not None:
    y = y + _f64(bias).reshape(shape)
  return y


def batch_norm(x, scale, bias, mean, var, *, train, channel_axis=-1, momentum=0.99, eps=1e-5,
               mask=None, unbiased_running_var=False, count=0):
  """Returns (y, new_mean, new_var) in float64."""
  x = _f64(x)
  c = channel_axis % x.ndim
  shape = [1] * x.ndim
  shape[c] = x.shape[c]
  mean, var = _f64(mean), _f64(var)
  if not train:
    y = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps)
    return _affine(y, scale, bias, shape), mean, var
  axes = tuple(a for a in range(x.ndim) if a != c)
  bm, bv, n = moments(x, axes, mask)
  y = _affine((x - bm) / np.sqrt(bv + eps), scale, bias, shape)
  bm, bv, n = bm.reshape(-1), bv.reshape(-1), n.reshape(-1)
  stored_var = bv * n / np.maximum(n - 1, 1) if unbiased_running_var else bv
  w = 1.0 / (count + 1) if momentum is None else 1.0 - momentum
  new_mean = np.where(n > 0, (1 - w) * mean + w * bm, mean)
  new_var = np.where(n > 0, (1 - w) * var + w * stored_var, var)
  return y, new_mean, new_var


def layer_norm(x, scale=None, bias=None, *, axis=-1, eps=1e-5, mask=None):
  x = _f64(x)
  axes = tuple(sorted(a % x.ndim for a in np.atleast_1d(axis)))
  shape = [x.shape[a] if a in axes else 1 for a in range(x.ndim)]
  mean, var, _ = moments(x, axes, mask)
  return _affine((x - mean) / np.sqrt(var + eps), scale, bias, shape)


def rms_norm(x, scale=None, *, axis=-1, eps=1e-6, mask=None):
  x = _f64(x)
  axes = tuple(sorted(a % x.ndim for a in np.atleast_1d(axis)))
  shape = [x.shape[a] if a in axes else 1 for a in range(x.ndim)]
  m = np.ones(x.shape, bool) if mask is None else np.broadcast_to(mask, x.shape)
  n = np.maximum(m.sum(axis=axes, keepdims=True), 1)
  ms = np.where(m, x * x, 0.0).sum(axis=axes, keepdims=True) / n
  return _affine(x / np.sqrt(ms + eps), scale, None, shape)


def group_norm(x, scale=None, bias=None, *, num_groups, channel_axis=-1, batch_axis=0, eps=1e-5,
               mask=None):
  """Moves the batch axis first and the channels last, then reduces over [spatial, in-group]."""
  x = _f64(x)
  nd = x.ndim
  c = channel_axis % nd
  m = np.ones(x.shape, bool) if mask is None else np.broadcast_to(mask, x.shape)
  if batch_axis is None:
    xt, mt = np.moveaxis(x, c, -1)[None], np.moveaxis(m, c, -1)[None]
  else:
    b = batch_axis % nd
    xt, mt = np.moveaxis(x, (b, c), (0, -1)), np.moveaxis(m, (b, c), (0, -1))
  n, ch = xt.shape[0], xt.shape[-1]
  g = num_groups
  xr = xt.reshape(n, -1, g, ch // g)
  mr = mt.reshape(n, -1, g, ch // g)
  mean, var, _ = moments(xr, (1, 3), mr)
  y = ((xr - mean) / np.sqrt(var + eps)).reshape(xt.shape)
  y = _affine(y, scale, bias, [1] * (xt.ndim - 1) + [ch])
  if batch_axis is None:
    return np.moveaxis(y[0], -1, c)
  return np.moveaxis(y, (0, -1), (b, c))


def instance_norm(x, scale=None, bias=None, *, channel_axis=-1, batch_axis=0, eps=1e-5, mask=None):
  ch = np.shape(x)[channel_axis]
  return group_norm(x, scale, bias, num_groups=ch, channel_axis=channel_axis,
                    batch_axis=batch_axis, eps=eps, mask=mask)


def filter_response_norm(x, scale=None, bias=None, tau=None, *, channel_axis=-1, batch_axis=0,
                         eps=1e-6, mask=None):
  """nu2 = mean(x**2) over every axis but batch and channel; x / sqrt(nu2 + eps), affine, TLU."""
  x = _f64(x)
  c = channel_axis % x.ndim
  b = None if batch_axis is None else batch_axis % x.ndim
  axes = tuple(a for a in range(x.ndim) if a not in (b, c))
  shape = [1] * x.ndim
  shape[c] = x.shape[c]
  m = np.ones(x.shape, bool) if mask is None else np.broadcast_to(mask, x.shape)
  n = np.maximum(m.sum(axis=axes, keepdims=True), 1)
  nu2 = np.where(m, x * x, 0.0).sum(axis=axes, keepdims=True) / n
  y = _affine(x / np.sqrt(nu2 + eps), scale, bias, shape)
  return y if tau is None else np.maximum(y, _f64(tau).reshape(shape))


def weight_standardize(w, *, axis=None, eps=1e-5):
  w = _f64(w)
  axes = tuple(range(w.ndim - 1)) if axis is None else tuple(np.atleast_1d(axis) % w.ndim)
  mean = w.mean(axis=axes, keepdims=True)
  var = ((w - mean) ** 2).mean(axis=axes, keepdims=True)
  return (w - mean) / np.sqrt(var + eps)


def weight_norm(v, g=None, *, axis=None, eps=1e-12):
  v = _f64(v)
  axes = tuple(range(v.ndim - 1)) if axis is None else tuple(np.atleast_1d(axis) % v.ndim)
  kept_shape = [1 if a in axes else v.shape[a] for a in range(v.ndim)]
  y = v / np.sqrt((v * v).sum(axis=axes, keepdims=True) + eps)
  return y if g is None else y * _f64(g).reshape(kept_shape)


def power_iteration(w, u, n_steps, eps=1e-12):
  """Returns (u, sigma) after n_steps of v = l2(W u), u = l2(W^T v) on W = w.reshape(-1, out),
  l2(a) = a / max(||a||, eps) (PyTorch's normalize); a step whose ||W^T v|| < eps keeps u."""
  w = _f64(w).reshape(-1, np.shape(w)[-1])
  u = _f64(u)
  l2 = lambda a: a / (max(np.linalg.norm(a), eps) or 1.0)
  for _ in range(n_steps):
    v = l2(w @ u)
    if np.linalg.norm(w.T @ v) >= eps and np.any(w.T @ v):
      u = l2(w.T @ v)
  return u, v @ w @ u


# ------------------------------------------------------------------- layers of today's models
#
# Written with `xp`, the array namespace of the arguments: NumPy for float64 values, or
# jax.numpy under `jax.enable_x64` for the float64 derivatives (jax's autodiff of the plain
# formula, which shares nothing with normjax's closed-form derivative).


def _xp(*arrays):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  return jnp if any(isinstance(a, jax.Array) for a in arrays) else np


def _cast(xp, a):
  return None if a is None else xp.asarray(a, dtype=xp.float64)


def _axes(axis, ndim):
  return tuple(sorted(a % ndim for a in np.atleast_1d(axis)))


def _standardized(x, axes, eps, mask, centered):
  """(x - mean) / sqrt(var + eps), or x / sqrt(mean(x^2) + eps), counting only `mask`."""
  xp = _xp(x)
  m = xp.ones(x.shape, bool) if mask is None else xp.broadcast_to(xp.asarray(mask, bool), x.shape)
  n = xp.maximum(xp.sum(m, axis=axes, keepdims=True).astype(xp.float64), 1.0)
  mean = xp.sum(xp.where(m, x, 0.0), axis=axes, keepdims=True) / n if centered else 0.0 * n
  d = x - mean
  var = xp.sum(xp.where(m, d * d, 0.0), axis=axes, keepdims=True) / n
  return d / xp.sqrt(var + eps)


def _modulate(y, shift, scale):
  if scale is not None:
    y = y * (1.0 + scale)
  return y if shift is None else y + shift


def adaptive_layer_norm(x, shift=None, scale=None, *, axis=-1, eps=1e-6, mask=None):
  """layer_norm(x) * (1 + scale) + shift; shift and scale of x's rank."""
  xp = _xp(x, shift, scale)
  x, shift, scale = (_cast(xp, a) for a in (x, shift, scale))
  return _modulate(_standardized(x, _axes(axis, x.ndim), eps, mask, True), shift, scale)


def adaptive_rms_norm(x, scale=None, *, axis=-1, eps=1e-6, mask=None):
  xp = _xp(x, scale)
  x, scale = _cast(xp, x), _cast(xp, scale)
  return _modulate(_standardized(x, _axes(axis, x.ndim), eps, mask, False), None, scale)


def adaptive_group_norm(x, shift=None, scale=None, *, num_groups, channel_axis=-1, batch_axis=0,
                        eps=1e-5, mask=None):
  """group_norm(x) * (1 + scale) + shift: the channels split into `num_groups` consecutive
  groups, each normalized over it and every axis but the batch and channel axes."""
  xp = _xp(x, shift, scale)
  x, shift, scale = (_cast(xp, a) for a in (x, shift, scale))
  c = channel_axis % x.ndim
  b = None if batch_axis is None else batch_axis % x.ndim
  split = x.shape[:c] + (num_groups, x.shape[c] // num_groups) + x.shape[c + 1:]
  # After the split, the channel axis c is (group c, member c + 1); others shift by one past c.
  moved = lambda a: a if a < c else a + 1
  axes = tuple(moved(a) for a in range(x.ndim) if a not in (b, c)) + (c + 1,)
  m = None if mask is None else xp.broadcast_to(xp.asarray(mask, bool), x.shape).reshape(split)
  y = _standardized(x.reshape(split), tuple(sorted(axes)), eps, m, True).reshape(x.shape)
  return _modulate(y, shift, scale)


def silu(z):
  xp = _xp(z)
  return z / (1.0 + xp.exp(-z))


def gated_rms_norm(x, z, scale=None, *, axis=-1, group_size=None, norm_before_gate=False,
                   eps=1e-6):
  """Mamba-2's RMSNormGated: rms_norm(x * silu(z)) * scale, or rms_norm(x) * scale * silu(z);
  the mean square per group of `group_size` consecutive features along `axis`."""
  xp = _xp(x, z, scale)
  x, z, scale = (_cast(xp, a) for a in (x, z, scale))
  axes = _axes(axis, x.ndim)
  inner = x if norm_before_gate else x * silu(z)
  if group_size is None:
    y = _standardized(inner, axes, eps, None, False)
  else:
    (a,) = axes
    split = x.shape[:a] + (x.shape[a] // group_size, group_size) + x.shape[a + 1:]
    y = _standardized(inner.reshape(split), (a + 1,), eps, None, False).reshape(x.shape)
  if scale is not None:
    y = y * scale.reshape([x.shape[i] if i in axes else 1 for i in range(x.ndim)])
  return y * silu(z) if norm_before_gate else y


def dynamic_tanh(x, alpha, scale=None, bias=None, *, axis=-1):
  xp = _xp(x, alpha, scale, bias)
  x, alpha, scale, bias = (_cast(xp, a) for a in (x, alpha, scale, bias))
  shape = [x.shape[i] if i in _axes(axis, x.ndim) else 1 for i in range(x.ndim)]
  y = xp.tanh(alpha * x)
  if scale is not None:
    y = y * scale.reshape(shape)
  return y if bias is None else y + bias.reshape(shape)


def l2_normalize(x, *, axis=-1, eps=1e-12):
  """x / max(||x||, eps) (PyTorch's F.normalize); a zero vector stays zero."""
  xp = _xp(x)
  x = _cast(xp, x)
  norm = xp.sqrt(xp.sum(x * x, axis=_axes(axis, x.ndim), keepdims=True))
  floor = xp.maximum(norm, eps)
  return x / xp.where(floor > 0, floor, 1.0)


def norm_health(x, *, axis=-1, eps=1e-5, mask=None):
  """(ill_conditioned, eps_dominated, constant, nonfinite) row fractions, by a loop over the
  rows (mask: only True elements count; a row with a counted NaN/Inf is non-finite only)."""
  x = _f64(x)
  axes = _axes(axis, x.ndim)
  m = np.ones(x.shape, bool) if mask is None else np.broadcast_to(np.asarray(mask, bool), x.shape)
  length = int(np.prod([x.shape[a] for a in axes]))
  shape = (int(np.prod([n for a, n in enumerate(x.shape) if a not in axes])), length)
  last = tuple(range(-len(axes), 0))
  rows_x = np.moveaxis(x, axes, last).reshape(shape)
  rows_m = np.moveaxis(m, axes, last).reshape(shape)
  counts = np.zeros(4)
  for row, keep in zip(rows_x, rows_m):
    values = row[keep]
    if not np.all(np.isfinite(values)):
      counts[3] += 1
      continue
    mean = values.mean() if values.size else 0.0
    var = ((values - mean) ** 2).mean() if values.size else 0.0
    counts += [0 < var and mean * mean > 1e4 * var, var < eps, var == 0, 0]
  return tuple(counts / max(len(rows_x), 1))


_DERIVATIVES = {}   # the float64 derivatives by the caller's key: one run for every implementation


def assert_derivatives_match(fn, want, args, *, seed=0, rtol=1e-4, atol=1e-4, check_value=True,
                             key=None):
  """`fn` (normjax, on float32 `args`) against `want` (a formula above, on the same values in
  float64 under `jax.enable_x64`): the value, the gradient of `sum(sin(y) * w)` (reverse mode),
  the directional derivative along random tangents (forward mode), and that loss's Hessian
  times the tangents by forward-over-reverse and by reverse-over-forward. Tolerances are
  relative to each quantity's largest magnitude (atol) and elementwise (rtol). `key`: names
  (`want`, `args`, `seed`) for reuse of the float64 run by a later call with the same key."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  tangents = [rng.standard_normal(np.shape(a)) for a in args]
  weights = rng.standard_normal(np.shape(jax.eval_shape(fn, *args)))

  def all_derivatives(f, args, tangents):
    args, tangents = tuple(args), tuple(tangents)
    argnums = tuple(range(len(args)))
    loss = lambda *a: jnp.sum(jnp.sin(f(*a)) * jnp.asarray(weights, args[0].dtype))
    grad = jax.grad(loss, argnums=argnums)
    forward = lambda *a: jax.jvp(loss, a, tangents)[1]
    return {"value": f(*args), "grad": grad(*args), "jvp": jax.jvp(f, args, tangents)[1],
            "hvp forward-over-reverse": jax.jvp(grad, args, tangents)[1],
            "hvp reverse-over-forward": jax.grad(forward, argnums=argnums)(*args)}

  from tests.helpers import fast_compiles  # pylint: disable=import-outside-toplevel
  f32 = [jnp.asarray(a, jnp.float32) for a in args]
  with fast_compiles():   # one run of each program: optimizing would cost more than it saves
    got = jax.jit(lambda a, t: all_derivatives(fn, a, t))(
        f32, [jnp.asarray(t, jnp.float32) for t in tangents])
  if key is None or key not in _DERIVATIVES:
    with jax.enable_x64(True), fast_compiles():
      f64 = [jnp.asarray(np.asarray(a, np.float64)) for a in f32]
      expected = jax.jit(lambda a, t: all_derivatives(want, a, t))(
          f64, [jnp.asarray(t) for t in tangents])
      _DERIVATIVES[key] = expected = jax.tree.map(np.asarray, expected)
  expected = _DERIVATIVES[key]
  for name in expected:
    if name == "value" and not check_value:
      continue
    for i, (g, w) in enumerate(zip(jax.tree.leaves(got[name]), jax.tree.leaves(expected[name]))):
      np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=rtol,
                                 atol=atol * max(np.abs(w).max(initial=0.0), 1e-3),
                                 err_msg=f"{name}, argument {i}")
