"""Bad input raises a clear error at trace time, naming the argument, the expected and the got."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normjax as nj

X = jnp.ones((4, 5, 6))
STATS = nj.init_batch_stats(6)


def _raises(exc, *fragments):
  """pytest.raises that also checks every fragment appears in the message."""
  class _Check:
    def __enter__(self):
      self.ctx = pytest.raises(exc)
      self.info = self.ctx.__enter__()
      return self.info

    def __exit__(self, *args):
      suppressed = self.ctx.__exit__(*args)
      message = str(self.info.value)
      for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in error message: {message!r}"
      return suppressed
  return _Check()


@pytest.mark.parametrize("call,fragments", [
    (lambda: nj.layer_norm(X, axis=3), ["axis=3", "[-3, 3)", "got 3"]),
    (lambda: nj.layer_norm(X, axis=(1, -2)), ["axis=(1, -2)", "same axis"]),
    (lambda: nj.rms_norm(X, axis=-4), ["axis=-4", "out of range"]),
    (lambda: nj.batch_norm(X, None, None, STATS, train=True, channel_axis=5),
     ["channel_axis=5", "out of range"]),
    (lambda: nj.group_norm(X, num_groups=2, batch_axis=7), ["batch_axis=7"]),
    (lambda: nj.group_norm(X, num_groups=2, batch_axis=-1), ["batch_axis", "channel_axis"]),
])
def test_bad_axes(call, fragments):
  with _raises(ValueError, *fragments):
    call()


@pytest.mark.parametrize("call,fragments", [
    (lambda: nj.layer_norm(X, jnp.ones(5)), ["scale", "(6,)", "(5,)"]),
    (lambda: nj.layer_norm(X, None, jnp.ones((1, 6))), ["bias", "(6,)", "(1, 6)"]),
    (lambda: nj.layer_norm(X, jnp.ones(6), axis=(1, 2)), ["scale", "(5, 6)", "(6,)"]),
    (lambda: nj.rms_norm(X, jnp.ones(())), ["scale", "(6,)", "()"]),
    (lambda: nj.batch_norm(X, jnp.ones(5), None, STATS, train=True), ["scale", "(6,)", "(5,)"]),
    (lambda: nj.instance_norm(X, None, jnp.ones(4)), ["bias", "(6,)", "(4,)"]),
    (lambda: nj.group_norm(X, jnp.ones(3), num_groups=3), ["scale", "(6,)", "(3,)"]),
])
def test_param_shapes(call, fragments):
  with _raises(ValueError, *fragments):
    call()


def test_no_silent_broadcast_of_scale():
  """A scale that numpy would broadcast (a size-1 vector) is still rejected."""
  with _raises(ValueError, "scale", "(6,)", "(1,)"):
    nj.layer_norm(X, jnp.ones(1))


@pytest.mark.parametrize("stats,fragments", [
    (nj.init_batch_stats(5), ["stats.mean", "(6,)", "(5,)"]),
    (nj.BatchStats(jnp.zeros(6), jnp.ones((6, 1)), jnp.zeros((), jnp.int32)),
     ["stats.var", "(6,)", "(6, 1)"]),
])
def test_stats_shape(stats, fragments):
  with _raises(ValueError, *fragments):
    nj.batch_norm(X, None, None, stats, train=True)
  with _raises(ValueError, *fragments):
    nj.batch_norm(X, None, None, stats, train=False)


def test_stats_type():
  with _raises(TypeError, "stats", "BatchStats", "dict"):
    nj.batch_norm(X, None, None, {"mean": jnp.zeros(6)}, train=True)


@pytest.mark.parametrize("kwargs,fragments", [
    (dict(num_groups=4), ["num_groups=4", "divide", "6"]),
    (dict(group_size=4), ["group_size=4", "divide", "6"]),
    (dict(num_groups=2, group_size=3), ["exactly one", "num_groups=2", "group_size=3"]),
    (dict(), ["exactly one", "num_groups=None", "group_size=None"]),
    (dict(num_groups=0), ["num_groups", "positive", "0"]),
])
def test_group_arguments(kwargs, fragments):
  with _raises(ValueError, *fragments):
    nj.group_norm(X, **kwargs)


@pytest.mark.parametrize("momentum", [-0.1, 1.5])
def test_momentum_range(momentum):
  with _raises(ValueError, "momentum", "[0, 1]", str(momentum)):
    nj.batch_norm(X, None, None, STATS, train=True, momentum=momentum)


@pytest.mark.parametrize("call", [
    lambda: nj.layer_norm(X, eps=-1e-5),
    lambda: nj.rms_norm(X, eps=-1.0),
    lambda: nj.batch_norm(X, None, None, STATS, train=True, eps=-1e-3),
    lambda: nj.group_norm(X, num_groups=2, eps=-2.0),
    lambda: nj.instance_norm(X, eps=-3.0),
])
def test_negative_eps(call):
  with _raises(ValueError, "eps", "non-negative"):
    call()


@pytest.mark.parametrize("mask_shape", [(4, 5), (5, 1, 6), (4, 5, 6, 1)])
def test_mask_not_broadcastable(mask_shape):
  mask = jnp.ones(mask_shape, bool)
  with _raises(ValueError, "mask", str(mask_shape), "(4, 5, 6)"):
    nj.layer_norm(X, mask=mask)
  with _raises(ValueError, "mask", str(mask_shape)):
    nj.batch_norm(X, None, None, STATS, train=True, mask=mask)


def test_mask_must_be_boolean():
  with _raises(TypeError, "mask", "boolean", "float32"):
    nj.layer_norm(X, mask=jnp.ones((4, 5, 1)))


def test_batch_norm_single_value_per_channel():
  """PyTorch's 'Expected more than 1 value per channel when training'."""
  with _raises(ValueError, "more than 1 value per channel", "(1, 6)"):
    nj.batch_norm(jnp.ones((1, 6)), None, None, STATS, train=True)
  with _raises(ValueError, "more than 1 value per channel"):
    nj.batch_norm(jnp.ones((1, 6, 1)), None, None, STATS, train=True, channel_axis=1)
  # Evaluation with one example is fine.
  y, _ = nj.batch_norm(jnp.ones((1, 6)), None, None, STATS, train=False)
  assert y.shape == (1, 6)


def test_instance_norm_needs_spatial_extent():
  with _raises(ValueError, "more than one element", "(4, 6)"):
    nj.instance_norm(jnp.ones((4, 6)))


@pytest.mark.parametrize("call", [
    lambda x: nj.layer_norm(x),
    lambda x: nj.rms_norm(x),
    lambda x: nj.batch_norm(x, None, None, STATS, train=True),
    lambda x: nj.instance_norm(x),
    lambda x: nj.group_norm(x, num_groups=2),
])
def test_non_floating_input(call):
  with _raises(TypeError, "x", "floating", "int32"):
    call(jnp.ones((4, 5, 6), jnp.int32))


def test_batch_norm_requires_train():
  with _raises(TypeError, "train"):
    nj.batch_norm(X, None, None, STATS)   # pylint: disable=missing-kwoa
  with _raises(TypeError, "train", "bool"):
    nj.batch_norm(X, None, None, STATS, train="yes")


def test_errors_raise_at_trace_time_under_jit():
  """Shapes are static: the error comes from tracing, before anything runs."""
  with _raises(ValueError, "scale"):
    jax.jit(nj.layer_norm).lower(X, jnp.ones(5))
  with _raises(ValueError, "num_groups=4"):
    jax.jit(lambda x: nj.group_norm(x, num_groups=4)).lower(X)


def test_eval_mode_never_changes_state():
  stats = nj.BatchStats(jnp.arange(6.0), jnp.arange(1.0, 7.0), jnp.asarray(9, jnp.int32))
  _, out = jax.jit(lambda x, s: nj.batch_norm(x, None, None, s, train=False))(X * 3.0, stats)
  for a, b in zip(out, stats):
    np.testing.assert_array_equal(a, b)
