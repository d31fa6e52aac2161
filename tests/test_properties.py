"""Hypothesis property tests over random shapes and axes, against the float64 reference."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import normjax as nj
from tests import reference as ref
from tests.helpers import fast_compiles


@pytest.fixture(autouse=True)
def _fast_compiles():
  with fast_compiles():
    yield

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


@st.composite
def arrays_and_axes(draw, min_rank=1, max_rank=4):
  shape = tuple(draw(st.lists(st.integers(1, 5), min_size=min_rank, max_size=max_rank)))
  ndim = len(shape)
  axes = draw(st.lists(st.integers(-ndim, ndim - 1), min_size=1, max_size=ndim,
                       unique_by=lambda a: a % ndim))
  seed = draw(st.integers(0, 2**16))
  loc = draw(st.sampled_from([0.0, 3.0, 1e3]))
  x = (loc + np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)
  return x, tuple(axes)


@SETTINGS
@given(arrays_and_axes())
@pytest.mark.slow
def test_layer_norm_any_axes(case):
  x, axes = case
  fshape = tuple(x.shape[a] for a in sorted(a % x.ndim for a in axes))
  scale = np.linspace(0.5, 1.5, int(np.prod(fshape))).reshape(fshape).astype(np.float32)
  y = nj.layer_norm(jnp.asarray(x), jnp.asarray(scale), axis=axes)
  np.testing.assert_allclose(y, ref.layer_norm(x, scale, axis=axes), rtol=1e-4, atol=1e-4)


@pytest.mark.slow   # test_layer_norm_any_axes keeps the property in the default run
@SETTINGS
@given(arrays_and_axes())
def test_rms_norm_any_axes(case):
  x, axes = case
  y = nj.rms_norm(jnp.asarray(x), axis=axes)
  np.testing.assert_allclose(y, ref.rms_norm(x, axis=axes), rtol=1e-4, atol=1e-4)


@SETTINGS
@given(arrays_and_axes(min_rank=2), st.integers(0, 3), st.booleans())
@pytest.mark.slow
def test_batch_norm_any_channel_axis(case, axis_choice, unbiased):
  x, _ = case
  c = axis_choice % x.ndim
  if x.size // x.shape[c] < 2:
    return   # one value per channel: an error, tested elsewhere
  y, new = nj.batch_norm(jnp.asarray(x), None, None, nj.init_batch_stats(x.shape[c]), train=True,
                         channel_axis=c, momentum=0.7, unbiased_running_var=unbiased)
  y_ref, m_ref, v_ref = ref.batch_norm(x, None, None, np.zeros(x.shape[c]), np.ones(x.shape[c]),
                                       train=True, channel_axis=c, momentum=0.7,
                                       unbiased_running_var=unbiased)
  np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(new.mean, m_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(new.var, v_ref, rtol=1e-4, atol=1e-5)


@SETTINGS
@given(st.integers(1, 3), st.sampled_from([1, 2, 3, 6]), st.integers(1, 4), st.integers(1, 4),
       st.booleans(), st.integers(0, 2**16))
@pytest.mark.slow
def test_group_norm_random_shapes(n, groups, h, w, channels_first, seed):
  c = 6
  shape = (n, c, h, w) if channels_first else (n, h, w, c)
  if h * w * (c // groups) < 2:
    return
  x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
  axis = 1 if channels_first else -1
  y = nj.group_norm(jnp.asarray(x), num_groups=groups, channel_axis=axis)
  np.testing.assert_allclose(y, ref.group_norm(x, num_groups=groups, channel_axis=axis),
                             rtol=1e-4, atol=1e-4)
