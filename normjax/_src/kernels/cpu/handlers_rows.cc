// The XLA FFI handlers of the row kernels: layer, RMS and channels-first instance norm over
// contiguous rows (normjax/_src/kernels/rows.py), forward, backward and the fused residual-add
// forward, each followed by its binding.
//
// XLA:CPU reads a layer-norm row three to five times (one reduction per sum, then the
// normalize pass, and as many again in the backward). These kernels read each row from memory
// once or twice: a block of the row stays in L1 while its statistics are computed. They are
// XLA FFI handlers, registered by normjax/_src/kernels/cpu/__init__.py and called through the
// primitives there; every other platform (and a CPU without this library) uses the jax.numpy
// definition of the same primitives. The loops run at the level levels.cc picks (Active()),
// on the pool's threads (threads.h).
//
// Layout: x is [rows, features] (row-major, the features contiguous); statistics are per row,
// scale and bias per feature (or, with `per_row`, per row), all statistics in float32. The mean
// is split as `shift + offset`: shift is the float32 rounding of the mean (accumulated in
// blocks, see level.h), offset = mean - shift, so that `(x - shift) - offset` is accurate for
// rows whose spread is small next to their mean (`1e5 + N(0, 1)` in float32 loses nothing).
// A variance that is not finite (a NaN or Inf in the row, or values whose squares overflow
// float32) gives rstd = NaN, so the row comes out NaN rather than silently zero.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "kernels.h"
#include "threads.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using normjax_cpu::Active;
using normjax_cpu::AddForwardArgs;
using normjax_cpu::AddInOrder;
using normjax_cpu::BackwardArgs;
using normjax_cpu::DtypeIndex;
using normjax_cpu::ForwardArgs;
using normjax_cpu::Guarded;
using normjax_cpu::kMaxAccumulators;
using normjax_cpu::NumChunks;
using normjax_cpu::ParallelChunks;

// y = ((x - shift) - offset) * rstd * scale + bias per row, rstd = RstdOf(var, eps), with
// shift, offset and var (the biased variance; RMS norm: shift = offset = 0 and var = mean of
// x^2) returned too: the statistics of a block of rows, then their outputs (ForwardChunk).
template <ffi::DataType T>
ffi::Error RowsForward(ffi::ThreadPool pool, ffi::Buffer<T, 2> x, ffi::Buffer<ffi::F32, 1> scale,
                       ffi::Buffer<ffi::F32, 1> bias, ffi::ResultBuffer<T, 2> y,
                       ffi::ResultBuffer<ffi::F32, 1> shift,
                       ffi::ResultBuffer<ffi::F32, 1> offset,
                       ffi::ResultBuffer<ffi::F32, 1> var, float eps, bool centered,
                       bool per_row) {
  return Guarded("normjax rows_forward", [&]() -> ffi::Error {
    const int64_t rows = x.dimensions()[0], n = x.dimensions()[1];
    const size_t params = static_cast<size_t>(per_row ? rows : n);
    if (scale.element_count() != params || bias.element_count() != params) {
      return ffi::Error::InvalidArgument("normjax rows_forward: scale/bias size mismatch");
    }
    const ForwardArgs args{x.untyped_data(),        scale.typed_data(),
                           bias.typed_data(),       y->untyped_data(),
                           shift->typed_data(),     offset->typed_data(),
                           var->typed_data(),       n,
                           eps,                     centered,
                           per_row};
    const auto forward = Active().forward[DtypeIndex<T>()];
    ParallelChunks(pool, rows, NumChunks(rows, n),
                   [&](int64_t begin, int64_t end, int64_t) { forward(args, begin, end); });
    return ffi::Error::Success();
  });
}

template <ffi::DataType T>
auto BindForward() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .template Arg<ffi::Buffer<T, 2>>()
      .template Arg<ffi::Buffer<ffi::F32, 1>>()
      .template Arg<ffi::Buffer<ffi::F32, 1>>()
      .template Ret<ffi::Buffer<T, 2>>()
      .template Ret<ffi::Buffer<ffi::F32, 1>>()
      .template Ret<ffi::Buffer<ffi::F32, 1>>()
      .template Ret<ffi::Buffer<ffi::F32, 1>>()
      .template Attr<float>("eps")
      .template Attr<bool>("centered")
      .template Attr<bool>("per_row");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NormjaxRowsForwardF32, RowsForward<ffi::F32>,
                              BindForward<ffi::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(NormjaxRowsForwardBF16, RowsForward<ffi::BF16>,
                              BindForward<ffi::BF16>());

namespace {

// dx = rstd * (g*scale - E[g*scale] - xhat * E[g*scale*xhat])  (no E[g*scale] term for RMS),
// dscale = sum over rows of g * xhat, dbias = sum over rows of g; with `per_row` (one scale
// per row) dscale and dbias are per row instead, the same sums over the row. The sums over
// rows are per chunk (in double, see BackwardChunk), added up in chunk order.
template <ffi::DataType T>
ffi::Error RowsBackward(ffi::ThreadPool pool, ffi::Buffer<T, 2> x, ffi::Buffer<T, 2> ct,
                        ffi::Buffer<ffi::F32, 1> shift, ffi::Buffer<ffi::F32, 1> offset,
                        ffi::Buffer<ffi::F32, 1> rstd, ffi::Buffer<ffi::F32, 1> scale,
                        ffi::ResultBuffer<T, 2> dx, ffi::ResultBuffer<ffi::F32, 1> dscale,
                        ffi::ResultBuffer<ffi::F32, 1> dbias, bool centered, bool per_row) {
  return Guarded("normjax rows_backward", [&]() -> ffi::Error {
    const int64_t rows = x.dimensions()[0], n = x.dimensions()[1];
    if (scale.element_count() != static_cast<size_t>(per_row ? rows : n)) {
      return ffi::Error::InvalidArgument("normjax rows_backward: scale size mismatch");
    }
    float* ds = dscale->typed_data();
    float* db = dbias->typed_data();
    const BackwardArgs args{x.untyped_data(),     ct.untyped_data(),    shift.typed_data(),
                            offset.typed_data(),  rstd.typed_data(),    scale.typed_data(),
                            dx->untyped_data(),   ds,                   db,
                            n,                    centered,             per_row};
    const auto backward = Active().backward[DtypeIndex<T>()];
    int64_t chunks = NumChunks(rows, n);
    if (per_row) {
      ParallelChunks(pool, rows, chunks, [&](int64_t begin, int64_t end, int64_t) {
        backward(args, begin, end, nullptr);
      });
      return ffi::Error::Success();
    }
    // Per-chunk sums of g * xhat and g (2n doubles each; their memory bounds the chunks).
    chunks = std::max<int64_t>(1, std::min(chunks, kMaxAccumulators / std::max<int64_t>(1, n)));
    std::vector<double> acc(static_cast<size_t>(chunks) * 2 * n, 0.0);
    ParallelChunks(pool, rows, chunks, [&](int64_t begin, int64_t end, int64_t chunk) {
      backward(args, begin, end, acc.data() + chunk * 2 * n);
    });
    std::vector<double> totals(2 * n, 0.0);
    AddInOrder(acc.data(), chunks, 2 * n, 2 * n, totals.data());
    for (int64_t j = 0; j < n; ++j) {
      ds[j] = static_cast<float>(totals[j]);
      db[j] = static_cast<float>(totals[n + j]);
    }
    return ffi::Error::Success();
  });
}

template <ffi::DataType T>
auto BindBackward() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .template Arg<ffi::Buffer<T, 2>>()
      .template Arg<ffi::Buffer<T, 2>>()
      .template Arg<ffi::Buffer<ffi::F32, 1>>()
      .template Arg<ffi::Buffer<ffi::F32, 1>>()
      .template Arg<ffi::Buffer<ffi::F32, 1>>()
      .template Arg<ffi::Buffer<ffi::F32, 1>>()
      .template Ret<ffi::Buffer<T, 2>>()
      .template Ret<ffi::Buffer<ffi::F32, 1>>()
      .template Ret<ffi::Buffer<ffi::F32, 1>>()
      .template Attr<bool>("centered")
      .template Attr<bool>("per_row");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NormjaxRowsBackwardF32, RowsBackward<ffi::F32>,
                              BindBackward<ffi::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(NormjaxRowsBackwardBF16, RowsBackward<ffi::BF16>,
                              BindBackward<ffi::BF16>());

namespace {

// h = x + residual (added in float32, rounded to T, stored), then RowsForward on h: y, h and
// the per-row statistics of h from one read of x and residual (XLA would write h out and the
// forward would read it back).
template <ffi::DataType T>
ffi::Error RowsAddForward(ffi::ThreadPool pool, ffi::Buffer<T, 2> x, ffi::Buffer<T, 2> residual,
                          ffi::Buffer<ffi::F32, 1> scale, ffi::Buffer<ffi::F32, 1> bias,
                          ffi::ResultBuffer<T, 2> y, ffi::ResultBuffer<T, 2> h,
                          ffi::ResultBuffer<ffi::F32, 1> shift,
                          ffi::ResultBuffer<ffi::F32, 1> offset,
                          ffi::ResultBuffer<ffi::F32, 1> var, float eps, bool centered,
                          bool per_row) {
  return Guarded("normjax rows_add_forward", [&]() -> ffi::Error {
    const int64_t rows = x.dimensions()[0], n = x.dimensions()[1];
    const size_t params = static_cast<size_t>(per_row ? rows : n);
    if (scale.element_count() != params || bias.element_count() != params) {
      return ffi::Error::InvalidArgument("normjax rows_add_forward: scale/bias size mismatch");
    }
    if (residual.dimensions()[0] != rows || residual.dimensions()[1] != n) {
      return ffi::Error::InvalidArgument("normjax rows_add_forward: residual shape mismatch");
    }
    const AddForwardArgs args{x.untyped_data(), residual.untyped_data(), h->untyped_data(),
                              ForwardArgs{h->untyped_data(), scale.typed_data(),
                                          bias.typed_data(), y->untyped_data(),
                                          shift->typed_data(), offset->typed_data(),
                                          var->typed_data(), n, eps, centered, per_row}};
    const auto add_forward = Active().add_forward[DtypeIndex<T>()];
    ParallelChunks(pool, rows, NumChunks(rows, n),
                   [&](int64_t begin, int64_t end, int64_t) { add_forward(args, begin, end); });
    return ffi::Error::Success();
  });
}

template <ffi::DataType T>
auto BindAddForward() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .template Arg<ffi::Buffer<T, 2>>()
      .template Arg<ffi::Buffer<T, 2>>()
      .template Arg<ffi::Buffer<ffi::F32, 1>>()
      .template Arg<ffi::Buffer<ffi::F32, 1>>()
      .template Ret<ffi::Buffer<T, 2>>()
      .template Ret<ffi::Buffer<T, 2>>()
      .template Ret<ffi::Buffer<ffi::F32, 1>>()
      .template Ret<ffi::Buffer<ffi::F32, 1>>()
      .template Ret<ffi::Buffer<ffi::F32, 1>>()
      .template Attr<float>("eps")
      .template Attr<bool>("centered")
      .template Attr<bool>("per_row");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NormjaxRowsAddForwardF32, RowsAddForward<ffi::F32>,
                              BindAddForward<ffi::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(NormjaxRowsAddForwardBF16, RowsAddForward<ffi::BF16>,
                              BindAddForward<ffi::BF16>());
