// The XLA FFI handlers of the row kernels: layer, RMS and channels-first instance norm over
// contiguous rows (normjax/_src/kernels/rows.py), forward, backward, the fused residual-add
// forward and backward (both also with a bfloat16 x and a float32 residual, the backward also
// without the residual's cotangent); the gated RMS norm's
// forward and backward (kernels/gated.py) and dynamic tanh's backward (kernels/tanh.py); each
// followed by its binding.
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
// scale and bias per feature (or, with `per_row`, per row; or, with `example_rows` = T > 0, per
// example and feature: [rows / T, features], the rows of one example consecutive, as adaLN's
// [B, 1, D] modulation of [B, T, D]), all statistics in float32. The mean
// is split as `shift + offset`: shift is the float32 rounding of the mean (accumulated in
// blocks, see level.h), offset = mean - shift, so that `(x - shift) - offset` is accurate for
// rows whose spread is small next to their mean (`1e5 + N(0, 1)` in float32 loses nothing).
// A variance that is not finite (a NaN or Inf in the row, or values whose squares overflow
// float32) gives rstd = NaN, so the row comes out NaN rather than silently zero.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include "kernels.h"
#include "threads.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using normjax_cpu::Active;
using normjax_cpu::AddForwardArgs;
using normjax_cpu::BackwardArgs;
using normjax_cpu::DtypeIndex;
using normjax_cpu::ForwardArgs;
using normjax_cpu::FunctionRef;
using normjax_cpu::Guarded;
using normjax_cpu::GroupSums;
using normjax_cpu::NumChunks;
using normjax_cpu::ParallelChunks;
using normjax_cpu::SumPieces;

// How the parameters map to the rows: one vector per feature for all rows (one "example"), per
// row (`per_row`, one example), or one per feature for each run of `example_rows` consecutive
// rows (`example_rows > 0`: rows / example_rows examples, the parameters [examples, n]).
struct Examples {
  int64_t rows, n;
  bool per_row;
  int64_t rows_each;

  Examples(int64_t rows_, int64_t n_, bool per_row_, int64_t example_rows)
      : rows(rows_), n(n_), per_row(per_row_),
        rows_each(example_rows > 0 && !per_row_ ? example_rows : rows_) {}
  bool Valid() const { return rows_each > 0 ? rows % rows_each == 0 : rows == 0; }
  int64_t Count() const { return rows_each > 0 ? rows / rows_each : 1; }
  size_t Params() const { return static_cast<size_t>(per_row ? rows : Count() * n); }
  // The arguments of example `e`: the parameter pointers moved to its vectors.
  ForwardArgs At(ForwardArgs a, int64_t e) const {
    if (!per_row) {
      a.scale += e * n;
      a.bias += e * n;
    }
    return a;
  }
  BackwardArgs At(BackwardArgs a, int64_t e) const {
    if (!per_row) a.scale += e * n;
    return a;
  }
  // Each example's rows cut into Pieces() ranges (NumChunks of its rows, fixed by the shape).
  int64_t Pieces() const { return NumChunks(rows_each, n); }
  // Many examples: at least as many as the chunks of all rows (each example within one chunk).
  bool Many() const { return Count() > 1 && Count() >= NumChunks(rows, n); }
  // Piece `p` of example `e`'s rows cut into `pieces`: rows [*begin, *end) (empty past the end).
  void Piece(int64_t e, int64_t p, int64_t pieces, int64_t* begin, int64_t* end) const {
    const int64_t span = (rows_each + pieces - 1) / pieces;
    const int64_t first = std::min(rows_each, p * span);
    *begin = e * rows_each + first;
    *end = e * rows_each + std::min(rows_each, first + span);
  }
  // Calls `rows_of(e, begin, end)` on every example's rows, in one call on the pool: across
  // examples when there are at least as many as chunks (each example within one chunk), else
  // each example's Pieces() (a pool call per example cost adaLN's forward 20 %: 8x512x1024,
  // 0.96 against RMS norm's 0.79 ms).
  template <typename F>
  void ForEach(ffi::ThreadPool& pool, F rows_of) const {
    if (Many()) {
      ParallelChunks(pool, Count(), NumChunks(rows, n), [&](int64_t begin, int64_t end, int64_t) {
        for (int64_t e = begin; e < end; ++e) rows_of(e, e * rows_each, (e + 1) * rows_each);
      });
      return;
    }
    const int64_t pieces = Pieces(), all = Count() * pieces;
    if (all == 0) return;  // no rows, no examples
    ParallelChunks(pool, all, all, [&](int64_t begin, int64_t end, int64_t) {
      for (int64_t c = begin; c < end; ++c) {
        int64_t b, en;
        Piece(c / pieces, c % pieces, pieces, &b, &en);
        if (b < en) rows_of(c / pieces, b, en);
      }
    });
  }
};

// Sums of `width` doubles over each example's rows (a backward's sums per feature, or per
// example and feature), the same bits whatever the thread count (GroupSums): each example's
// rows cut into SumPieces(ex.Pieces(), width) pieces, a chunk on the pool each; or, with
// Many() examples, each example's rows in one piece, the examples in the chunks of all rows.
// `body(e, begin, end, acc)` adds the sums of rows [begin, end) of example e into its piece's
// zeroed buffer; `done(e, sums)` takes example e's sums.
void SumsOverRows(ffi::ThreadPool& pool, const Examples& ex, int64_t width,
                  FunctionRef<void(int64_t e, int64_t begin, int64_t end, double* acc)> body,
                  FunctionRef<void(int64_t e, const double* sums)> done) {
  const int64_t pieces = ex.Many() ? 1 : SumPieces(ex.Pieces(), width);
  const int64_t chunks = ex.Many() ? NumChunks(ex.rows, ex.n) : ex.Count() * pieces;
  GroupSums(
      pool, ex.Count(), pieces, width, chunks,
      [&](int64_t e, int64_t p, double* acc) {
        int64_t begin, end;
        ex.Piece(e, p, pieces, &begin, &end);
        if (begin < end) body(e, begin, end, acc);
      },
      done);
}

// y = ((x - shift) - offset) * rstd * scale + bias per row, rstd = RstdOf(var, eps), with
// shift, offset and var (the biased variance; RMS norm: shift = offset = 0 and var = mean of
// x^2) returned too: the statistics of a block of rows, then their outputs (ForwardChunk).
template <ffi::DataType T>
ffi::Error RowsForward(ffi::ThreadPool pool, ffi::Buffer<T, 2> x, ffi::Buffer<ffi::F32, 1> scale,
                       ffi::Buffer<ffi::F32, 1> bias, ffi::ResultBuffer<T, 2> y,
                       ffi::ResultBuffer<ffi::F32, 1> shift,
                       ffi::ResultBuffer<ffi::F32, 1> offset,
                       ffi::ResultBuffer<ffi::F32, 1> var, float eps, bool centered,
                       bool per_row, int64_t example_rows) {
  return Guarded("normjax rows_forward", [&]() -> ffi::Error {
    const int64_t rows = x.dimensions()[0], n = x.dimensions()[1];
    const Examples ex{rows, n, per_row, example_rows};
    if (!ex.Valid() || scale.element_count() != ex.Params() ||
        bias.element_count() != ex.Params()) {
      return ffi::Error::InvalidArgument("normjax rows_forward: scale/bias size mismatch");
    }
    const ForwardArgs args{x.untyped_data(),        scale.typed_data(),
                           bias.typed_data(),       y->untyped_data(),
                           shift->typed_data(),     offset->typed_data(),
                           var->typed_data(),       n,
                           eps,                     centered,
                           per_row};
    const auto forward = Active().forward[DtypeIndex<T>()];
    ex.ForEach(pool, [&](int64_t e, int64_t begin, int64_t end) {
      forward(ex.At(args, e), begin, end);
    });
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
      .template Attr<bool>("per_row")
      .template Attr<int64_t>("example_rows");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NormjaxRowsForwardF32, RowsForward<ffi::F32>,
                              BindForward<ffi::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(NormjaxRowsForwardBF16, RowsForward<ffi::BF16>,
                              BindForward<ffi::BF16>());

namespace {

// dx = rstd * (g*scale - E[g*scale] - xhat * E[g*scale*xhat])  (no E[g*scale] term for RMS),
// dscale = sum over rows of g * xhat, dbias = sum over rows of g; with `per_row` (one scale
// per row) dscale and dbias are per row instead, the same sums over the row; with
// `example_rows`, per example (the sums over each example's rows). The sums over rows are per
// chunk (in double, see BackwardChunk), added up in chunk order.
// With TC != T (the mixed residual-add backward), ct is of TC and `narrow` receives dx rounded
// to TC.
template <ffi::DataType T, ffi::DataType TC = T>
ffi::Error RowsBackwardWith(ffi::ThreadPool& pool, ffi::Buffer<T, 2>& x, ffi::Buffer<TC, 2>& ct,
                            const void* add, void* narrow, ffi::Buffer<ffi::F32, 1>& shift,
                            ffi::Buffer<ffi::F32, 1>& offset, ffi::Buffer<ffi::F32, 1>& rstd,
                            ffi::Buffer<ffi::F32, 1>& scale, ffi::ResultBuffer<T, 2>& dx,
                            ffi::ResultBuffer<ffi::F32, 1>& dscale,
                            ffi::ResultBuffer<ffi::F32, 1>& dbias, bool centered, bool per_row,
                            int64_t example_rows) {
  return Guarded("normjax rows_backward", [&]() -> ffi::Error {
    const int64_t rows = x.dimensions()[0], n = x.dimensions()[1];
    const Examples ex{rows, n, per_row, example_rows};
    if (!ex.Valid() || scale.element_count() != ex.Params()) {
      return ffi::Error::InvalidArgument("normjax rows_backward: scale size mismatch");
    }
    float* ds = dscale->typed_data();
    float* db = dbias->typed_data();
    const BackwardArgs args{x.untyped_data(),     ct.untyped_data(),    shift.typed_data(),
                            offset.typed_data(),  rstd.typed_data(),    scale.typed_data(),
                            dx->untyped_data(),   ds,                   db,
                            n,                    centered,             per_row,
                            add,                  narrow};
    const auto backward = TC == T ? Active().backward[DtypeIndex<T>()]
                                  : Active().add_backward_mixed;
    if (per_row) {
      ParallelChunks(pool, rows, NumChunks(rows, n), [&](int64_t begin, int64_t end, int64_t) {
        backward(args, begin, end, nullptr);
      });
      return ffi::Error::Success();
    }
    // Per example (one for per-feature parameters), the sums of g * xhat and g (2n doubles).
    SumsOverRows(
        pool, ex, 2 * n,
        [&](int64_t e, int64_t begin, int64_t end, double* acc) {
          backward(ex.At(args, e), begin, end, acc);
        },
        [&](int64_t e, const double* sums) {
          for (int64_t j = 0; j < n; ++j) {
            ds[e * n + j] = static_cast<float>(sums[j]);
            db[e * n + j] = static_cast<float>(sums[n + j]);
          }
        });
    return ffi::Error::Success();
  });
}

template <ffi::DataType T>
ffi::Error RowsBackward(ffi::ThreadPool pool, ffi::Buffer<T, 2> x, ffi::Buffer<T, 2> ct,
                        ffi::Buffer<ffi::F32, 1> shift, ffi::Buffer<ffi::F32, 1> offset,
                        ffi::Buffer<ffi::F32, 1> rstd, ffi::Buffer<ffi::F32, 1> scale,
                        ffi::ResultBuffer<T, 2> dx, ffi::ResultBuffer<ffi::F32, 1> dscale,
                        ffi::ResultBuffer<ffi::F32, 1> dbias, bool centered, bool per_row,
                        int64_t example_rows) {
  return RowsBackwardWith(pool, x, ct, nullptr, nullptr, shift, offset, rstd, scale, dx, dscale,
                          dbias, centered, per_row, example_rows);
}

// The residual-add norm's backward: RowsBackward at h with h's own cotangent ct_h added to dx
// in the same pass (XLA would add it in a pass of its own).
template <ffi::DataType T>
ffi::Error RowsAddBackward(ffi::ThreadPool pool, ffi::Buffer<T, 2> x, ffi::Buffer<T, 2> ct,
                           ffi::Buffer<T, 2> ct_h, ffi::Buffer<ffi::F32, 1> shift,
                           ffi::Buffer<ffi::F32, 1> offset, ffi::Buffer<ffi::F32, 1> rstd,
                           ffi::Buffer<ffi::F32, 1> scale, ffi::ResultBuffer<T, 2> dx,
                           ffi::ResultBuffer<ffi::F32, 1> dscale,
                           ffi::ResultBuffer<ffi::F32, 1> dbias, bool centered, bool per_row,
                           int64_t example_rows) {
  if (ct_h.dimensions()[0] != x.dimensions()[0] || ct_h.dimensions()[1] != x.dimensions()[1]) {
    return ffi::Error::InvalidArgument("normjax rows_add_backward: ct_h shape mismatch");
  }
  return RowsBackwardWith(pool, x, ct, ct_h.untyped_data(), nullptr, shift, offset, rstd, scale,
                          dx, dscale, dbias, centered, per_row, example_rows);
}

// The mixed residual-add backward (a float32 residual stream with a bfloat16 x): h and ct_h
// float32, the cotangent ct of y bfloat16; returns x's cotangent dx (bfloat16) and the
// residual's dh (float32, the same sum unrounded) from one pass: RowsAddBackward's dh, with
// the cotangent read as bfloat16 and dx rounded from dh in the same pass (XLA would convert
// ct before and dh after, a pass each).
ffi::Error RowsAddBackwardMixed(ffi::ThreadPool pool, ffi::Buffer<ffi::F32, 2> x,
                                ffi::Buffer<ffi::BF16, 2> ct, ffi::Buffer<ffi::F32, 2> ct_h,
                                ffi::Buffer<ffi::F32, 1> shift, ffi::Buffer<ffi::F32, 1> offset,
                                ffi::Buffer<ffi::F32, 1> rstd, ffi::Buffer<ffi::F32, 1> scale,
                                ffi::ResultBuffer<ffi::BF16, 2> dx,
                                ffi::ResultBuffer<ffi::F32, 2> dh,
                                ffi::ResultBuffer<ffi::F32, 1> dscale,
                                ffi::ResultBuffer<ffi::F32, 1> dbias, bool centered, bool per_row,
                                int64_t example_rows) {
  const auto& d = x.dimensions();
  if (ct.dimensions()[0] != d[0] || ct.dimensions()[1] != d[1] ||
      ct_h.dimensions()[0] != d[0] || ct_h.dimensions()[1] != d[1]) {
    return ffi::Error::InvalidArgument("normjax rows_add_backward_mixed: ct/ct_h shape mismatch");
  }
  return RowsBackwardWith(pool, x, ct, ct_h.untyped_data(), dx->untyped_data(), shift, offset,
                          rstd, scale, dh, dscale, dbias, centered, per_row, example_rows);
}

// The mixed backward without h's own cotangent (a float32 residual stream whose sum `h` is not
// used after the norm): RowsAddBackwardMixed's dx and dh with no ct_h to add (XLA would
// otherwise pass a float32 zero array to add, a pass to write and one to read).
ffi::Error RowsBackwardMixed(ffi::ThreadPool pool, ffi::Buffer<ffi::F32, 2> x,
                             ffi::Buffer<ffi::BF16, 2> ct, ffi::Buffer<ffi::F32, 1> shift,
                             ffi::Buffer<ffi::F32, 1> offset, ffi::Buffer<ffi::F32, 1> rstd,
                             ffi::Buffer<ffi::F32, 1> scale, ffi::ResultBuffer<ffi::BF16, 2> dx,
                             ffi::ResultBuffer<ffi::F32, 2> dh,
                             ffi::ResultBuffer<ffi::F32, 1> dscale,
                             ffi::ResultBuffer<ffi::F32, 1> dbias, bool centered, bool per_row,
                             int64_t example_rows) {
  if (ct.dimensions()[0] != x.dimensions()[0] || ct.dimensions()[1] != x.dimensions()[1]) {
    return ffi::Error::InvalidArgument("normjax rows_backward_mixed: ct shape mismatch");
  }
  return RowsBackwardWith(pool, x, ct, nullptr, dx->untyped_data(), shift, offset, rstd, scale,
                          dh, dscale, dbias, centered, per_row, example_rows);
}

// The bindings of the rows backward handlers share their middle and end: after the input and
// its cotangent(s), shift, offset, rstd and scale (Statistics); after dx (and the mixed
// backward's dh), dscale, dbias and the attributes (BackwardEnd).
template <typename B>
auto Statistics(B&& binding) {
  return std::move(binding).template Arg<ffi::Buffer<ffi::F32, 1>>()
      .template Arg<ffi::Buffer<ffi::F32, 1>>()
      .template Arg<ffi::Buffer<ffi::F32, 1>>()
      .template Arg<ffi::Buffer<ffi::F32, 1>>();
}

template <typename B>
auto BackwardEnd(B&& binding) {
  return std::move(binding).template Ret<ffi::Buffer<ffi::F32, 1>>()
      .template Ret<ffi::Buffer<ffi::F32, 1>>()
      .template Attr<bool>("centered")
      .template Attr<bool>("per_row")
      .template Attr<int64_t>("example_rows");
}

template <ffi::DataType T>
auto BindBackward() {
  return BackwardEnd(Statistics(ffi::Ffi::Bind()
                                    .Ctx<ffi::ThreadPool>()
                                    .template Arg<ffi::Buffer<T, 2>>()
                                    .template Arg<ffi::Buffer<T, 2>>())
                         .template Ret<ffi::Buffer<T, 2>>());
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NormjaxRowsBackwardF32, RowsBackward<ffi::F32>,
                              BindBackward<ffi::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(NormjaxRowsBackwardBF16, RowsBackward<ffi::BF16>,
                              BindBackward<ffi::BF16>());

namespace {

template <ffi::DataType T>
auto BindAddBackward() {
  return BackwardEnd(Statistics(ffi::Ffi::Bind()
                                    .Ctx<ffi::ThreadPool>()
                                    .template Arg<ffi::Buffer<T, 2>>()
                                    .template Arg<ffi::Buffer<T, 2>>()
                                    .template Arg<ffi::Buffer<T, 2>>())
                         .template Ret<ffi::Buffer<T, 2>>());
}

auto BindBackwardMixed() {
  return BackwardEnd(Statistics(ffi::Ffi::Bind()
                                    .Ctx<ffi::ThreadPool>()
                                    .Arg<ffi::Buffer<ffi::F32, 2>>()
                                    .Arg<ffi::Buffer<ffi::BF16, 2>>())
                         .Ret<ffi::Buffer<ffi::BF16, 2>>()
                         .Ret<ffi::Buffer<ffi::F32, 2>>());
}

auto BindAddBackwardMixed() {
  return BackwardEnd(Statistics(ffi::Ffi::Bind()
                                    .Ctx<ffi::ThreadPool>()
                                    .Arg<ffi::Buffer<ffi::F32, 2>>()
                                    .Arg<ffi::Buffer<ffi::BF16, 2>>()
                                    .Arg<ffi::Buffer<ffi::F32, 2>>())
                         .Ret<ffi::Buffer<ffi::BF16, 2>>()
                         .Ret<ffi::Buffer<ffi::F32, 2>>());
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NormjaxRowsAddBackwardF32, RowsAddBackward<ffi::F32>,
                              BindAddBackward<ffi::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(NormjaxRowsAddBackwardBF16, RowsAddBackward<ffi::BF16>,
                              BindAddBackward<ffi::BF16>());
// float32 h, bfloat16 cotangent (the suffix is h's dtype, the primitive's first operand).
XLA_FFI_DEFINE_HANDLER_SYMBOL(NormjaxRowsAddBackwardMixedF32, RowsAddBackwardMixed,
                              BindAddBackwardMixed());
XLA_FFI_DEFINE_HANDLER_SYMBOL(NormjaxRowsBackwardMixedF32, RowsBackwardMixed,
                              BindBackwardMixed());

namespace {

// h = x + residual (added in float32, rounded to T, stored), then RowsForward on h: y, h and
// the per-row statistics of h from one read of x and residual (XLA would write h out and the
// forward would read it back). With TX = BF16 and T = F32 (a float32 residual stream), x
// is widened, h is float32 and y bfloat16 (AddForwardChunk).
template <ffi::DataType TX, ffi::DataType T = TX>
ffi::Error RowsAddForward(ffi::ThreadPool pool, ffi::Buffer<TX, 2> x, ffi::Buffer<T, 2> residual,
                          ffi::Buffer<ffi::F32, 1> scale, ffi::Buffer<ffi::F32, 1> bias,
                          ffi::ResultBuffer<TX, 2> y, ffi::ResultBuffer<T, 2> h,
                          ffi::ResultBuffer<ffi::F32, 1> shift,
                          ffi::ResultBuffer<ffi::F32, 1> offset,
                          ffi::ResultBuffer<ffi::F32, 1> var, float eps, bool centered,
                          bool per_row, int64_t example_rows) {
  return Guarded("normjax rows_add_forward", [&]() -> ffi::Error {
    const int64_t rows = x.dimensions()[0], n = x.dimensions()[1];
    const Examples ex{rows, n, per_row, example_rows};
    if (!ex.Valid() || scale.element_count() != ex.Params() ||
        bias.element_count() != ex.Params()) {
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
    const auto add_forward = TX == T ? Active().add_forward[DtypeIndex<T>()]
                                     : Active().add_forward_mixed;
    ex.ForEach(pool, [&](int64_t e, int64_t begin, int64_t end) {
      AddForwardArgs a = args;
      a.forward = ex.At(args.forward, e);
      add_forward(a, begin, end);
    });
    return ffi::Error::Success();
  });
}

template <ffi::DataType TX, ffi::DataType T = TX>
auto BindAddForward() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .template Arg<ffi::Buffer<TX, 2>>()
      .template Arg<ffi::Buffer<T, 2>>()
      .template Arg<ffi::Buffer<ffi::F32, 1>>()
      .template Arg<ffi::Buffer<ffi::F32, 1>>()
      .template Ret<ffi::Buffer<TX, 2>>()
      .template Ret<ffi::Buffer<T, 2>>()
      .template Ret<ffi::Buffer<ffi::F32, 1>>()
      .template Ret<ffi::Buffer<ffi::F32, 1>>()
      .template Ret<ffi::Buffer<ffi::F32, 1>>()
      .template Attr<float>("eps")
      .template Attr<bool>("centered")
      .template Attr<bool>("per_row")
      .template Attr<int64_t>("example_rows");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NormjaxRowsAddForwardF32, RowsAddForward<ffi::F32>,
                              BindAddForward<ffi::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(NormjaxRowsAddForwardBF16, RowsAddForward<ffi::BF16>,
                              BindAddForward<ffi::BF16>());
// bfloat16 x, float32 residual (the suffix is x's dtype, as the lowering names targets).
XLA_FFI_DEFINE_HANDLER_SYMBOL(NormjaxRowsAddForwardMixedBF16,
                              (RowsAddForward<ffi::BF16, ffi::F32>),
                              (BindAddForward<ffi::BF16, ffi::F32>()));

namespace {

using normjax_cpu::GatedArgs;

// The gated RMS norm (see level_gated.h): y = rms_norm(x * silu(z)) * scale, or with `before`
// rms_norm(x) * scale * silu(z); the gate in float32, one read of x and z per pass.
// With `groups` = G > 1, scale is [G, n] and row r takes its row r % G (a feature axis of
// G * n cut into groups of n, as consecutive rows).
template <ffi::DataType T>
ffi::Error RowsGatedForward(ffi::ThreadPool pool, ffi::Buffer<T, 2> x, ffi::Buffer<T, 2> z,
                            ffi::Buffer<ffi::F32, 1> scale, ffi::ResultBuffer<T, 2> y,
                            float eps, bool before, int64_t groups) {
  return Guarded("normjax rows_gated_forward", [&]() -> ffi::Error {
    const int64_t rows = x.dimensions()[0], n = x.dimensions()[1];
    if (z.dimensions()[0] != rows || z.dimensions()[1] != n || groups < 1 ||
        rows % groups != 0 || scale.element_count() != static_cast<size_t>(groups * n)) {
      return ffi::Error::InvalidArgument("normjax rows_gated_forward: z/scale size mismatch");
    }
    const GatedArgs args{x.untyped_data(), z.untyped_data(), nullptr, scale.typed_data(),
                         y->untyped_data(), nullptr, n, eps, before, groups};
    const auto forward = Active().gated_forward[DtypeIndex<T>()];
    ParallelChunks(pool, rows, NumChunks(rows, n), [&](int64_t begin, int64_t end, int64_t) {
      forward(args, begin, end);
    });
    return ffi::Error::Success();
  });
}

template <ffi::DataType T>
auto BindGatedForward() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .template Arg<ffi::Buffer<T, 2>>()
      .template Arg<ffi::Buffer<T, 2>>()
      .template Arg<ffi::Buffer<ffi::F32, 1>>()
      .template Ret<ffi::Buffer<T, 2>>()
      .template Attr<float>("eps")
      .template Attr<bool>("before")
      .template Attr<int64_t>("groups");
}

// dx, dz and dscale of the gated RMS norm for the cotangent ct (see GatedBackwardChunk);
// dscale's sums over rows per chunk (in double), added up in chunk order.
template <ffi::DataType T>
ffi::Error RowsGatedBackward(ffi::ThreadPool pool, ffi::Buffer<T, 2> x, ffi::Buffer<T, 2> z,
                             ffi::Buffer<ffi::F32, 1> scale, ffi::Buffer<T, 2> ct,
                             ffi::ResultBuffer<T, 2> dx, ffi::ResultBuffer<T, 2> dz,
                             ffi::ResultBuffer<ffi::F32, 1> dscale, float eps, bool before,
                             int64_t groups) {
  return Guarded("normjax rows_gated_backward", [&]() -> ffi::Error {
    const int64_t rows = x.dimensions()[0], n = x.dimensions()[1];
    if (z.dimensions()[0] != rows || z.dimensions()[1] != n || ct.dimensions()[0] != rows ||
        ct.dimensions()[1] != n || groups < 1 || rows % groups != 0 ||
        scale.element_count() != static_cast<size_t>(groups * n)) {
      return ffi::Error::InvalidArgument("normjax rows_gated_backward: z/ct/scale size mismatch");
    }
    const GatedArgs args{x.untyped_data(), z.untyped_data(), ct.untyped_data(),
                         scale.typed_data(), dx->untyped_data(), dz->untyped_data(),
                         n, eps, before, groups};
    const auto backward = Active().gated_backward[DtypeIndex<T>()];
    const int64_t width = groups * n;
    float* ds = dscale->typed_data();
    SumsOverRows(
        pool, Examples{rows, n, false, 0}, width,
        [&](int64_t, int64_t begin, int64_t end, double* acc) { backward(args, begin, end, acc); },
        [&](int64_t, const double* sums) {
          for (int64_t j = 0; j < width; ++j) ds[j] = static_cast<float>(sums[j]);
        });
    return ffi::Error::Success();
  });
}

template <ffi::DataType T>
auto BindGatedBackward() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .template Arg<ffi::Buffer<T, 2>>()
      .template Arg<ffi::Buffer<T, 2>>()
      .template Arg<ffi::Buffer<ffi::F32, 1>>()
      .template Arg<ffi::Buffer<T, 2>>()
      .template Ret<ffi::Buffer<T, 2>>()
      .template Ret<ffi::Buffer<T, 2>>()
      .template Ret<ffi::Buffer<ffi::F32, 1>>()
      .template Attr<float>("eps")
      .template Attr<bool>("before")
      .template Attr<int64_t>("groups");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NormjaxRowsGatedForwardF32, RowsGatedForward<ffi::F32>,
                              BindGatedForward<ffi::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(NormjaxRowsGatedForwardBF16, RowsGatedForward<ffi::BF16>,
                              BindGatedForward<ffi::BF16>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(NormjaxRowsGatedBackwardF32, RowsGatedBackward<ffi::F32>,
                              BindGatedBackward<ffi::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(NormjaxRowsGatedBackwardBF16, RowsGatedBackward<ffi::BF16>,
                              BindGatedBackward<ffi::BF16>());

namespace {

using normjax_cpu::TanhArgs;

// Dynamic tanh's backward (see TanhBackwardChunk): dx, dalpha ([1]), dscale and dbias ([n])
// for the cotangent g of y = tanh(alpha * x) * scale + bias, with t the forward's
// tanh(alpha * x) where `saved` (else recomputed; t is not read); the sums over rows per chunk
// (in double), added up in chunk order.
template <ffi::DataType T>
ffi::Error TanhBackward(ffi::ThreadPool pool, ffi::Buffer<T, 2> x, ffi::Buffer<ffi::F32, 2> t,
                        ffi::Buffer<ffi::F32, 1> alpha, ffi::Buffer<ffi::F32, 1> scale,
                        ffi::Buffer<T, 2> g,
                        ffi::ResultBuffer<T, 2> dx, ffi::ResultBuffer<ffi::F32, 1> dalpha,
                        ffi::ResultBuffer<ffi::F32, 1> dscale,
                        ffi::ResultBuffer<ffi::F32, 1> dbias, bool saved) {
  return Guarded("normjax tanh_backward", [&]() -> ffi::Error {
    const int64_t rows = x.dimensions()[0], n = x.dimensions()[1];
    if (g.dimensions()[0] != rows || g.dimensions()[1] != n || t.dimensions()[0] != rows ||
        t.dimensions()[1] != n || scale.element_count() != static_cast<size_t>(n) ||
        alpha.element_count() != 1) {
      return ffi::Error::InvalidArgument("normjax tanh_backward: t/g/scale/alpha size mismatch");
    }
    const TanhArgs args{x.untyped_data(), saved ? t.typed_data() : nullptr, g.untyped_data(),
                        scale.typed_data(), dx->untyped_data(), n, alpha.typed_data()[0]};
    const auto backward = Active().tanh_backward[DtypeIndex<T>()];
    const int64_t width = 2 * n + 1;
    SumsOverRows(
        pool, Examples{rows, n, false, 0}, width,
        [&](int64_t, int64_t begin, int64_t end, double* acc) { backward(args, begin, end, acc); },
        [&](int64_t, const double* sums) {
          for (int64_t j = 0; j < n; ++j) {
            dscale->typed_data()[j] = static_cast<float>(sums[j]);
            dbias->typed_data()[j] = static_cast<float>(sums[n + j]);
          }
          dalpha->typed_data()[0] = static_cast<float>(sums[2 * n]);
        });
    return ffi::Error::Success();
  });
}

template <ffi::DataType T>
auto BindTanhBackward() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .template Arg<ffi::Buffer<T, 2>>()
      .template Arg<ffi::Buffer<ffi::F32, 2>>()
      .template Arg<ffi::Buffer<ffi::F32, 1>>()
      .template Arg<ffi::Buffer<ffi::F32, 1>>()
      .template Arg<ffi::Buffer<T, 2>>()
      .template Ret<ffi::Buffer<T, 2>>()
      .template Ret<ffi::Buffer<ffi::F32, 1>>()
      .template Ret<ffi::Buffer<ffi::F32, 1>>()
      .template Ret<ffi::Buffer<ffi::F32, 1>>()
      .template Attr<bool>("saved");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NormjaxTanhBackwardF32, TanhBackward<ffi::F32>,
                              BindTanhBackward<ffi::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(NormjaxTanhBackwardBF16, TanhBackward<ffi::BF16>,
                              BindTanhBackward<ffi::BF16>());
