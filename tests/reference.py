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
