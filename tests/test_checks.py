"""Bad input raises a clear error at trace time, naming the argument, the expected and the got."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normjax as nj
from normjax._src import checks

from tests import reference

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


# ---------------------------------------------------------------------------------------------
# Misuse table: every public argument's wrong types and values, each a TypeError/ValueError at
# trace time whose message names the argument (and what it got).

_MV = collections.namedtuple("_MV", "mean var")   # no `count` field: tuple.count is a method
_INF, _NAN = float("inf"), float("nan")
X4 = jnp.asarray(np.random.default_rng(0).standard_normal((4, 5, 6)), jnp.float32)


_PARAMS = {"conv": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)},
           "bn": {"scale": jnp.ones(3), "bias": jnp.zeros(3)}}
_BSTATS = {"bn": {"mean": jnp.zeros(3), "var": jnp.ones(3)}}


def _linen():
  import normjax.linen as njnn  # pylint: disable=import-outside-toplevel
  return njnn


def _nnx():
  import normjax.nnx as njnnx  # pylint: disable=import-outside-toplevel
  return njnnx


def _nnx_rngs():
  from flax import nnx  # pylint: disable=import-outside-toplevel
  return nnx.Rngs(0)


def _bn(**kwargs):
  stats = kwargs.pop("stats", STATS)
  kwargs.setdefault("train", True)
  return lambda: nj.batch_norm(X, None, None, stats, **kwargs)


MISUSE = [
    # eps: real, scalar, finite and >= 0.
    pytest.param(lambda: nj.layer_norm(X, eps=_INF), ValueError,
                 r"eps must be a non-negative, finite number.*>= 0.*got eps=inf", id="eps-inf"),
    pytest.param(lambda: nj.rms_norm(X, eps=_NAN), ValueError, r"eps .*finite.*got eps=nan",
                 id="eps-nan"),
    pytest.param(_bn(eps=_INF), ValueError, r"eps .*finite.*got eps=inf", id="bn-eps-inf"),
    pytest.param(lambda: nj.group_norm(X, num_groups=2, eps=np.float32(np.inf)), ValueError,
                 r"eps .*finite.*inf", id="gn-eps-np-inf"),
    pytest.param(lambda: nj.instance_norm(X, eps=-np.float64(1.0)), ValueError,
                 r"eps must be a non-negative.*-1\.0", id="in-eps-negative"),
    pytest.param(lambda: nj.layer_norm(X, eps=True), TypeError,
                 r"eps must be a real number.*got eps=True \(of type bool\)", id="eps-bool"),
    pytest.param(lambda: nj.layer_norm(X, eps=np.bool_(False)), TypeError,
                 r"eps must be a real number.*got eps=", id="eps-np-bool"),
    pytest.param(lambda: nj.layer_norm(X, eps=1e-5j), TypeError,
                 r"eps must be a real number.*of type complex", id="eps-complex"),
    pytest.param(lambda: nj.instance_norm(X, eps=np.complex64(1)), TypeError,
                 r"eps must be a real number.*complex", id="eps-np-complex"),
    pytest.param(lambda: nj.layer_norm(X, eps="1e-5"), TypeError,
                 r"eps must be a real number.*got eps='1e-5' \(of type str\)", id="eps-str"),
    pytest.param(lambda: nj.rms_norm(X, eps=None), TypeError,
                 r"eps must be a real number.*got eps=None", id="eps-none"),
    pytest.param(lambda: nj.layer_norm(X, eps=jnp.asarray(True)), TypeError,
                 r"eps must be a real number.*dtype bool", id="eps-bool-array"),
    pytest.param(lambda: nj.layer_norm(X, eps=jnp.full(2, 1e-5)), ValueError,
                 r"eps must be a scalar.*\(2,\)", id="eps-vector"),
    # momentum: None or a real scalar in [0, 1].
    pytest.param(_bn(momentum="0.9"), TypeError,
                 r"momentum must be a real number.*got momentum='0.9' \(of type str\)",
                 id="momentum-str"),
    pytest.param(_bn(momentum=True), TypeError, r"momentum must be a real number.*True.*bool",
                 id="momentum-bool"),
    pytest.param(_bn(momentum=0.9j), TypeError, r"momentum must be a real number.*complex",
                 id="momentum-complex"),
    pytest.param(_bn(momentum=_NAN), ValueError, r"momentum must be in \[0, 1\].*nan",
                 id="momentum-nan"),
    pytest.param(_bn(momentum=np.full(6, 0.9)), ValueError, r"momentum must be a scalar.*\(6,\)",
                 id="momentum-vector"),
    # axes: an int or a tuple of ints (channel/batch axes: an int).
    pytest.param(lambda: nj.layer_norm(X, axis=1.5), TypeError,
                 r"axis must be an int or a tuple of ints; got axis=1\.5 \(of type float\)",
                 id="axis-float"),
    pytest.param(lambda: nj.layer_norm(X, axis=None), TypeError,
                 r"axis must be an int or a tuple of ints; got axis=None", id="axis-none"),
    pytest.param(lambda: nj.rms_norm(X, axis="-1"), TypeError,
                 r"axis must be an int or a tuple of ints; got axis='-1'", id="axis-str"),
    pytest.param(lambda: nj.layer_norm(X, axis=(1, 2.0)), TypeError,
                 r"axis must be an int or a tuple of ints; got axis=\(1, 2\.0\).*2\.0.*float",
                 id="axis-tuple-float"),
    pytest.param(lambda: nj.layer_norm(X, axis=True), TypeError,
                 r"axis must be an int or a tuple of ints.*True", id="axis-bool"),
    pytest.param(_bn(channel_axis=1.5), TypeError,
                 r"channel_axis must be an int; got channel_axis=1\.5", id="channel-axis-float"),
    pytest.param(_bn(channel_axis=None), TypeError,
                 r"channel_axis must be an int; got channel_axis=None", id="channel-axis-none"),
    pytest.param(lambda: nj.instance_norm(X, channel_axis=(1, 2)), TypeError,
                 r"channel_axis must be an int; got channel_axis=\(1, 2\)",
                 id="channel-axis-tuple"),
    pytest.param(lambda: nj.group_norm(X, num_groups=2, batch_axis=0.0), TypeError,
                 r"batch_axis must be an int; got batch_axis=0\.0", id="batch-axis-float"),
    # stats: a BatchStats of [C] floating mean/var and a scalar integer count.
    pytest.param(_bn(stats=_MV(STATS.mean, STATS.var)), TypeError,
                 r"stats must be a BatchStats.*got _MV, which has no field count",
                 id="stats-namedtuple-no-count"),
    pytest.param(_bn(stats=None), TypeError, r"stats must be a BatchStats.*NoneType",
                 id="stats-none"),
    pytest.param(_bn(stats=STATS._replace(count=jnp.zeros(8, jnp.int32))), ValueError,
                 r"stats\.count must be a scalar.*\(8,\)", id="stats-count-vector"),
    pytest.param(_bn(stats=STATS._replace(count=jnp.zeros((), jnp.float32))), TypeError,
                 r"stats\.count must be a scalar integer array.*float32", id="stats-count-float"),
    pytest.param(_bn(stats=STATS._replace(count=jnp.zeros((), bool)), train=False), TypeError,
                 r"stats\.count must be a scalar integer array.*bool", id="stats-count-bool"),
    pytest.param(_bn(stats=STATS._replace(count=0)), TypeError,
                 r"stats\.count must be an array.*got 0 \(of type int\)", id="stats-count-int"),
    pytest.param(_bn(stats=STATS._replace(mean=jnp.zeros(6, jnp.int32))), TypeError,
                 r"stats\.mean must have a floating dtype.*int32", id="stats-mean-int"),
    pytest.param(_bn(stats=STATS._replace(var=jnp.ones(6, bool)), train=False), TypeError,
                 r"stats\.var must have a floating dtype.*bool", id="stats-var-bool"),
    # bool flags: a Python (or NumPy) bool, never read by truthiness.
    pytest.param(_bn(unbiased_running_var="no"), TypeError,
                 r"unbiased_running_var must be a Python bool.*got unbiased_running_var='no'",
                 id="unbiased-str"),
    pytest.param(_bn(unbiased_running_var=1), TypeError,
                 r"unbiased_running_var must be a Python bool.*\(of type int\)", id="unbiased-int"),
    pytest.param(_bn(fast_variance="yes"), TypeError,
                 r"fast_variance must be a Python bool.*got fast_variance='yes'",
                 id="bn-fast-variance-str"),
    pytest.param(lambda: nj.layer_norm(X, fast_variance=None), TypeError,
                 r"fast_variance must be a Python bool.*got fast_variance=None",
                 id="ln-fast-variance-none"),
    pytest.param(lambda: nj.group_norm(X, num_groups=2, fast_variance="no"), TypeError,
                 r"fast_variance must be a Python bool", id="gn-fast-variance-str"),
    pytest.param(lambda: nj.instance_norm(X, fast_variance=0), TypeError,
                 r"fast_variance must be a Python bool.*\(of type int\)",
                 id="in-fast-variance-int"),
    pytest.param(_bn(train=1), TypeError, r"train must be a Python bool.*got train=1",
                 id="train-int"),
    pytest.param(_bn(train=None), TypeError, r"train must be a Python bool.*got train=None",
                 id="train-none"),
    pytest.param(_bn(train=jnp.asarray(True)), TypeError, r"train must be a Python bool",
                 id="train-jax-array"),
    # axis_index_groups: only with axis_name, equal-size groups of ints.
    pytest.param(_bn(axis_index_groups=[[0, 1], [2, 3]]), ValueError,
                 r"axis_index_groups needs an axis_name.*axis_name=None",
                 id="groups-without-axis-name"),
    pytest.param(_bn(axis_index_groups=[[0], [1, 2]], axis_name="i"), ValueError,
                 r"axis_index_groups must be non-empty groups of equal size",
                 id="groups-unequal"),
    pytest.param(_bn(axis_index_groups=[[0, 1], [1, 2]], axis_name="i"), ValueError,
                 r"axis_index_groups must name each device index .* at most once",
                 id="groups-repeated"),
    pytest.param(_bn(axis_index_groups="01", axis_name="i"), TypeError,
                 r"axis_index_groups must be a sequence of sequences of ints", id="groups-str"),
    # num_groups / group_size / num_features: integral (any integer type, not bool), >= 1.
    pytest.param(lambda: nj.group_norm(X, num_groups=2.0), TypeError,
                 r"num_groups must be a positive int; got num_groups=2\.0 \(of type float\)",
                 id="num-groups-float"),
    pytest.param(lambda: nj.group_norm(X, group_size=True), TypeError,
                 r"group_size must be a positive int; got group_size=True", id="group-size-bool"),
    pytest.param(lambda: nj.group_norm(X, num_groups="2"), TypeError,
                 r"num_groups must be a positive int; got num_groups='2'", id="num-groups-str"),
    pytest.param(lambda: nj.group_norm(X, group_size=np.int64(0)), ValueError,
                 r"group_size must be a positive int \(>= 1\); got group_size=", id="group-size-0"),
    pytest.param(lambda: nj.init_batch_stats(6.0), TypeError,
                 r"num_features must be a positive int; got num_features=6\.0",
                 id="num-features-float"),
    pytest.param(lambda: nj.init_batch_stats(True), TypeError,
                 r"num_features must be a positive int; got num_features=True",
                 id="num-features-bool"),
    pytest.param(lambda: nj.init_batch_stats(np.int64(0)), ValueError,
                 r"num_features must be a positive int \(>= 1\)", id="num-features-0"),
    pytest.param(lambda: nj.init_batch_stats(3, jnp.int32), TypeError,
                 r"dtype must be a floating dtype.*got dtype=int32", id="init-dtype-int"),
    pytest.param(lambda: nj.init_batch_stats(3, bool), TypeError,
                 r"dtype must be a floating dtype.*got dtype=bool", id="init-dtype-bool"),
    pytest.param(lambda: nj.init_batch_stats(3, "not a dtype"), TypeError,
                 r"dtype must be a floating dtype.*'not a dtype'", id="init-dtype-garbage"),
    # x / scale / bias / mask.
    pytest.param(lambda: nj.layer_norm("x"), TypeError,
                 r"x must be a floating array.*got x of type str", id="x-str"),
    pytest.param(lambda: nj.batch_norm(X.astype(jnp.complex64), None, None, STATS, train=True),
                 TypeError, r"x must have a floating dtype.*complex64", id="x-complex"),
    pytest.param(lambda: nj.layer_norm(X, jnp.ones(6, bool)), TypeError,
                 r"scale must have a floating dtype.*bool", id="scale-bool-mask-as-scale"),
    pytest.param(lambda: nj.group_norm(X, None, jnp.zeros(6, jnp.int32), num_groups=2), TypeError,
                 r"bias must have a floating dtype.*int32", id="bias-int"),
    pytest.param(lambda: nj.layer_norm(X, mask="all"), TypeError,
                 r"mask must be a boolean array.*got mask of type str", id="mask-str"),
    pytest.param(_bn(mask=jnp.ones((4, 5, 6), jnp.int32)), TypeError,
                 r"mask must be a boolean array.*int32", id="mask-int"),
    # A [C] parameter of another axis's size: the message names the channel_axis that fits.
    pytest.param(lambda: nj.batch_norm(jnp.ones((2, 4, 3, 6)), jnp.ones(4), None, STATS,
                                       train=True), ValueError,
                 r"scale must have shape \(6,\).*got shape \(4,\).*pass channel_axis=1 "
                 r"\(PyTorch's NC\.\.\. layout\)", id="scale-nchw-hint"),
    pytest.param(lambda: nj.group_norm(X, None, jnp.ones(5), num_groups=2), ValueError,
                 r"bias must have shape \(6,\).*got shape \(5,\).*pass channel_axis=1",
                 id="gn-bias-channel-hint"),
    # Batch renormalization's warmup_steps: within the range of stats.count.
    pytest.param(lambda: nj.batch_renorm(X4, None, None, STATS, train=True, warmup_steps=2**40),
                 ValueError, r"warmup_steps must be at most 2147483647.*int32.*"
                 r"got warmup_steps=1099511627776", id="renorm-warmup-overflow"),
    # fold_linen_params: mappings, (conv_name, bn_name) pairs, a kernel, mean and var.
    pytest.param(lambda: nj.fold_linen_params(_PARAMS, _BSTATS, pairs=("conv", "bn")),
                 TypeError, r"pairs must be a sequence of \(conv_name, bn_name\) pairs.*"
                 r"got pairs=\('conv', 'bn'\)", id="fold-pairs-flat"),
    pytest.param(lambda: nj.fold_linen_params(_PARAMS, _BSTATS, pairs="conv,bn"), TypeError,
                 r"pairs must be a sequence of \(conv_name, bn_name\) pairs.*got pairs='conv,bn'",
                 id="fold-pairs-str"),
    pytest.param(lambda: nj.fold_linen_params({**_PARAMS, "conv": {"bias": jnp.zeros(3)}},
                                              _BSTATS, [("conv", "bn")]), ValueError,
                 r"params\['conv'\].*must have the entries \['kernel'\]; got keys \['bias'\]",
                 id="fold-no-kernel"),
    pytest.param(lambda: nj.fold_linen_params(_PARAMS, {"bn": {"mean": jnp.zeros(3)}},
                                              [("conv", "bn")]), ValueError,
                 r"batch_stats\['bn'\].*must have the entries \['mean', 'var'\]; got keys "
                 r"\['mean'\]", id="fold-no-var"),
    pytest.param(lambda: nj.fold_linen_params(None, _BSTATS, [("conv", "bn")]), TypeError,
                 r"params must be a mapping.*got params of type NoneType", id="fold-params-none"),
    # PyTorch state dicts: a str prefix, a BatchStats, real entries, something to read.
    pytest.param(lambda: nj.from_torch_state_dict({"weight": np.ones(3)}, prefix=None),
                 TypeError, r"prefix must be a str.*got prefix=None", id="from-torch-prefix-none"),
    pytest.param(lambda: nj.to_torch_state_dict(stats=tuple(STATS)), TypeError,
                 r"stats must be a BatchStats.*got tuple, which has no field mean, var, count",
                 id="to-torch-stats-tuple"),
    pytest.param(lambda: nj.to_torch_state_dict(scale="ones"), ValueError,
                 r"scale \(-> 'weight'\) must be a real \(floating or integer\) array; got "
                 r"dtype <U4", id="to-torch-scale-str"),
    pytest.param(lambda: nj.to_torch_state_dict(scale=jnp.ones(3, jnp.complex64)), ValueError,
                 r"scale \(-> 'weight'\) must be a real .*got dtype complex64",
                 id="to-torch-scale-complex"),
    pytest.param(lambda: nj.from_torch_state_dict({"num_batches_tracked": np.array(3)}),
                 ValueError, r"state_dict has none of the keys \['weight', 'bias', "
                 r"'running_mean', 'running_var'\]; got keys \['num_batches_tracked'\]",
                 id="from-torch-count-only"),
    # The Flax modules: num_features a positive int, use_running_average a bool.
    pytest.param(lambda: _nnx().BatchNorm("4", rngs=_nnx_rngs()), TypeError,
                 r"num_features must be a positive int; got num_features='4'",
                 id="nnx-batch-norm-num-features-str"),
    pytest.param(lambda: _nnx().LayerNorm(-1, rngs=_nnx_rngs()), ValueError,
                 r"num_features must be a positive int \(>= 1\); got num_features=-1",
                 id="nnx-layer-norm-num-features-negative"),
    pytest.param(lambda: _linen().BatchNorm().init(jax.random.key(0), X4,
                                                   use_running_average="no"), TypeError,
                 r"use_running_average must be a Python bool.*got use_running_average='no'",
                 id="linen-batch-norm-use-running-average-str"),
]


@pytest.mark.parametrize("call,exc,pattern", MISUSE)
def test_misuse(call, exc, pattern):
  with pytest.raises(exc, match=pattern):
    call()


def test_misuse_raises_at_trace_time():
  """The checks run while tracing: `lower` raises, nothing is compiled or run."""
  with pytest.raises(ValueError, match="eps .*finite"):
    jax.jit(lambda x: nj.layer_norm(x, eps=_INF)).lower(X)
  with pytest.raises(TypeError, match="axis must be an int or a tuple of ints"):
    jax.jit(lambda x: nj.layer_norm(x, axis=None)).lower(X)
  with pytest.raises(TypeError, match="stats must be a BatchStats"):
    jax.jit(lambda x, s: nj.batch_norm(x, None, None, s, train=True)).lower(
        X, _MV(STATS.mean, STATS.var))


def test_stats_check_accepts_tracers_and_other_dtypes():
  """Under jit the stats are tracers (shape and dtype known): still accepted; so are bfloat16
  running averages and a count of another integer dtype (int16)."""
  stats = nj.BatchStats(jnp.zeros(6, jnp.bfloat16), jnp.ones(6, jnp.bfloat16),
                        jnp.zeros((), jnp.int16))
  _, new = jax.jit(lambda x, s: nj.batch_norm(x, None, None, s, train=True))(X4, stats)
  assert new.mean.dtype == jnp.bfloat16 and new.count.dtype == jnp.int16 and int(new.count) == 1


# ---------------------------------------------------------------------------------------------
# Accepted spellings: a concrete real eps of any type is used as a Python float; integral
# counts of any integer type. Each result is compared with the float64 NumPy reference.

EPS_VALUES = [
    pytest.param(0, id="int-0"),
    pytest.param(1, id="int-1"),
    pytest.param(np.float32(1e-5), id="np-float32"),
    pytest.param(np.int64(1), id="np-int64"),
    pytest.param(jnp.float32(1e-3), id="jnp-float32"),
    pytest.param(np.asarray(0.5), id="np-0d-array"),
]

EPS_CALLS = {
    "layer_norm": (lambda x, eps: nj.layer_norm(x, eps=eps),
                   lambda x, eps: reference.layer_norm(x, eps=eps)),
    "layer_norm_axes": (lambda x, eps: nj.layer_norm(x, axis=(1, 2), eps=eps),
                        lambda x, eps: reference.layer_norm(x, axis=(1, 2), eps=eps)),
    "rms_norm": (lambda x, eps: nj.rms_norm(x, eps=eps),
                 lambda x, eps: reference.rms_norm(x, eps=eps)),
    "batch_norm": (lambda x, eps: nj.batch_norm(x, None, None, STATS, train=True, eps=eps)[0],
                   lambda x, eps: reference.batch_norm(x, None, None, np.zeros(6), np.ones(6),
                                                       train=True, eps=eps)[0]),
    "group_norm": (lambda x, eps: nj.group_norm(x, num_groups=2, eps=eps),
                   lambda x, eps: reference.group_norm(x, num_groups=2, eps=eps)),
    "instance_norm_nchw": (lambda x, eps: nj.instance_norm(x, channel_axis=1, eps=eps),
                           lambda x, eps: reference.instance_norm(x, channel_axis=1, eps=eps)),
}


@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit-closed-over"])
@pytest.mark.parametrize("name", list(EPS_CALLS))
@pytest.mark.parametrize("eps", EPS_VALUES)
def test_eps_of_any_real_type(eps, name, use_jit):
  """flax accepts `epsilon=0`, `1` or a NumPy scalar; so does every normjax variant, eagerly
  and as a constant closed over by `jax.jit` (issue 10, finding 3)."""
  fn, ref = EPS_CALLS[name]
  call = lambda x: fn(x, eps)
  y = (jax.jit(call) if use_jit else call)(X4)
  np.testing.assert_allclose(np.asarray(y, np.float64), ref(np.asarray(X4), float(eps)),
                             rtol=2e-5, atol=2e-5)


def test_check_eps_canonical_value():
  assert type(checks.check_eps(np.int64(2))) is float and checks.check_eps(np.int64(2)) == 2.0
  assert type(checks.check_eps(jnp.bfloat16(0.5))) is float
  assert checks.check_eps(0) == 0.0


def test_traced_eps_passes_through_unchecked():
  """A traced eps cannot be checked for its value: it is returned unchanged (shape () and a
  real dtype are still required)."""
  seen = []

  def f(eps):
    seen.append(checks.check_eps(eps) is eps)
    return eps

  jax.jit(f)(1e-3)
  assert seen == [True]
  with pytest.raises(ValueError, match="eps must be a scalar"):
    jax.jit(checks.check_eps)(jnp.ones(2))
  with pytest.raises(TypeError, match="eps must be a real number"):
    jax.jit(checks.check_eps)(jnp.asarray(True))


@pytest.mark.parametrize("epsilon", [0, np.float32(1e-5), 1])
def test_linen_layer_norm_integer_epsilon(epsilon):
  """`flax.linen.LayerNorm(epsilon=0)` works; so does normjax's."""
  import normjax.linen as njnn  # pylint: disable=import-outside-toplevel
  y, _ = njnn.LayerNorm(epsilon=epsilon).init_with_output(jax.random.key(0), X4)
  np.testing.assert_allclose(np.asarray(y, np.float64),
                             reference.layer_norm(np.asarray(X4), eps=float(epsilon)),
                             rtol=2e-5, atol=2e-5)


def test_nnx_layer_norm_integer_epsilon():
  from flax import nnx  # pylint: disable=import-outside-toplevel
  import normjax.nnx as njnnx  # pylint: disable=import-outside-toplevel
  y = njnnx.LayerNorm(6, epsilon=0, rngs=nnx.Rngs(0))(X4)
  np.testing.assert_allclose(np.asarray(y, np.float64),
                             reference.layer_norm(np.asarray(X4), eps=0.0), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("momentum", [np.float32(0.9), jnp.float32(0.9), 1, np.int64(0)])
def test_momentum_of_any_real_type(momentum):
  _, new = nj.batch_norm(X4, None, None, STATS, train=True, momentum=momentum)
  _, ref_mean, ref_var = reference.batch_norm(np.asarray(X4), None, None, np.zeros(6), np.ones(6),
                                              train=True, momentum=float(momentum))
  np.testing.assert_allclose(new.mean, ref_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new.var, ref_var, rtol=1e-5, atol=1e-6)


def test_numpy_integer_counts_and_axes():
  """`np.int64` group counts, feature counts and axes are ints (issue 10, finding 9)."""
  ref = reference.group_norm(np.asarray(X4), num_groups=2)
  for kwargs in (dict(num_groups=np.int64(2)), dict(group_size=np.int32(3))):
    np.testing.assert_allclose(nj.group_norm(X4, **kwargs), ref, rtol=2e-5, atol=2e-5)
  stats = nj.init_batch_stats(np.int64(6))
  assert stats.mean.shape == (6,) and stats.mean.dtype == jnp.float32
  np.testing.assert_allclose(nj.layer_norm(X4, axis=(np.int64(1), np.int32(-1))),
                             reference.layer_norm(np.asarray(X4), axis=(1, 2)),
                             rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(nj.layer_norm(X4, axis=[1, 2]),
                             reference.layer_norm(np.asarray(X4), axis=(1, 2)),
                             rtol=2e-5, atol=2e-5)


def test_numpy_bool_flags():
  _, new = nj.batch_norm(X4, None, None, STATS, train=np.bool_(True),
                         unbiased_running_var=np.bool_(True), fast_variance=np.bool_(False))
  _, ref_mean, ref_var = reference.batch_norm(np.asarray(X4), None, None, np.zeros(6),
                                              np.ones(6), train=True, unbiased_running_var=True)
  np.testing.assert_allclose(new.var, ref_var, rtol=1e-5, atol=1e-6)
