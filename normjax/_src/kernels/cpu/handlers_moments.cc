// The XLA FFI handlers of the moments kernels (normjax/_src/kernels/moments.py): per-channel
// statistics of channels-last and channels-first input for batch, instance and group norm,
// and the per-channel sums of their backward, each followed by its binding. The loops run at
// the level levels.cc picks (Active()), on the pool's threads (threads.h); every sum over
// chunks is added in chunk order, so the results do not depend on the thread count.

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
using normjax_cpu::DtypeIndex;
using normjax_cpu::ExampleRanges;
using normjax_cpu::GroupSums;
using normjax_cpu::Guarded;
using normjax_cpu::NumChunks;
using normjax_cpu::ParallelChunks;
using normjax_cpu::RunningMoments;

// Pools `count` entries start, start + stride, ... (each the mean and M2 of `n` elements):
// mean = average of the means, M2 = sum of (M2 + n (mean_i - mean)^2), two passes in double
// (Chan's merge for equal counts); every pooled entry then holds the pooled statistics.
void PoolEqual(double* mean, double* m2, int64_t start, int64_t stride, int64_t count,
               double n) {
  double mu = 0.0;
  for (int64_t t = 0; t < count; ++t) mu += mean[start + t * stride];
  mu /= static_cast<double>(count);
  double total = 0.0;
  for (int64_t t = 0; t < count; ++t) {
    const int64_t j = start + t * stride;
    const double d = mean[j] - mu;
    total += m2[j] + n * d * d;
  }
  for (int64_t t = 0; t < count; ++t) {
    mean[start + t * stride] = mu;
    m2[start + t * stride] = total;
  }
}

// Groups of `group_size` consecutive entries (group norm's channel groups) pooled.
void PoolGroups(double* mean, double* m2, int64_t entries, int64_t group_size, double n) {
  if (group_size <= 1) return;
  for (int64_t g = 0; g < entries; g += group_size) PoolEqual(mean, m2, g, 1, group_size, n);
}

// (shift, offset, var) of every entry from its mean and M2 over `count` elements.
void FinishAll(const double* mean, const double* m2, int64_t entries, double count,
               float* shift, float* offset, float* var) {
  for (int64_t j = 0; j < entries; ++j) {
    RunningMoments m;
    m.count = count;
    m.mean = mean[j];
    m.m2 = m2[j];
    m.Finish(shift + j, offset + j, var + j);
  }
}

// x -> (shift, offset, var), the binding both moments kernels start from.
template <ffi::DataType T>
auto BindMoments() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .template Arg<ffi::Buffer<T, 3>>()
      .template Ret<ffi::Buffer<ffi::F32, 2>>()
      .template Ret<ffi::Buffer<ffi::F32, 2>>()
      .template Ret<ffi::Buffer<ffi::F32, 2>>();
}

// Per-channel statistics of x viewed as [batch, positions, channels] (channels contiguous, as
// batch/instance/group norm see NHWC input), from one read of x: per (batch, channel) entry,
// shift = float32(mean), offset = mean - shift and the biased variance; `group_size` pools
// groups of consecutive channels (group norm), every channel of a group holding its statistics.
template <ffi::DataType T>
ffi::Error ColumnMoments(ffi::ThreadPool pool, ffi::Buffer<T, 3> x,
                         ffi::ResultBuffer<ffi::F32, 2> shift,
                         ffi::ResultBuffer<ffi::F32, 2> offset,
                         ffi::ResultBuffer<ffi::F32, 2> var, int64_t group_size) {
  return Guarded("normjax column_moments", [&]() -> ffi::Error {
    const int64_t batch = x.dimensions()[0], positions = x.dimensions()[1];
    const int64_t c = x.dimensions()[2];
    if (group_size < 1 || c % group_size != 0) {
      return ffi::Error::InvalidArgument("normjax column_moments: bad group_size");
    }
    const int64_t entries = batch * c;
    std::vector<double> mean(entries, 0.0), m2(entries, 0.0);
    if (positions > 0 && c > 0) {
      const ExampleRanges ranges(batch, positions, c);
      const int64_t per_example = ranges.per_example, chunks = ranges.chunks;
      std::vector<double> part(per_example > 1 ? static_cast<size_t>(chunks) * 2 * c : 0);
      const auto stats = Active().column_stats[DtypeIndex<T>()];
      const void* xp = x.untyped_data();
      ParallelChunks(pool, chunks, chunks, [&](int64_t begin, int64_t end, int64_t) {
        for (int64_t k = begin; k < end; ++k) {
          int64_t b, m0, m1;
          ranges.Range(k, &b, &m0, &m1);
          if (per_example == 1) {
            stats(xp, positions, c, b, m0, m1, mean.data() + b * c, m2.data() + b * c);
          } else {
            double* out = part.data() + k * 2 * c;
            stats(xp, positions, c, b, m0, m1, out, out + c);
          }
        }
      });
      if (per_example > 1) {  // the parts of each example merged in order
        for (int64_t b = 0; b < batch; ++b) {
          for (int64_t i = 0; i < c; ++i) {
            RunningMoments m;
            for (int64_t k = b * per_example; k < (b + 1) * per_example; ++k) {
              int64_t example, m0, m1;
              ranges.Range(k, &example, &m0, &m1);
              if (m1 == m0) continue;
              const double* in = part.data() + k * 2 * c;
              m.Merge(static_cast<double>(m1 - m0), in[i], in[c + i]);
            }
            mean[b * c + i] = m.mean;
            m2[b * c + i] = m.m2;
          }
        }
      }
      PoolGroups(mean.data(), m2.data(), entries, group_size, static_cast<double>(positions));
    }
    FinishAll(mean.data(), m2.data(), entries, static_cast<double>(positions * group_size),
              shift->typed_data(), offset->typed_data(), var->typed_data());
    return ffi::Error::Success();
  });
}

template <ffi::DataType T>
auto BindColumnMoments() {
  return BindMoments<T>().template Attr<int64_t>("group_size");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NormjaxColumnMomentsF32, ColumnMoments<ffi::F32>,
                              BindColumnMoments<ffi::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(NormjaxColumnMomentsBF16, ColumnMoments<ffi::BF16>,
                              BindColumnMoments<ffi::BF16>());

namespace {

// Statistics of channels-first input (batch/group norm on NCHW): x viewed as [outer,
// channels, positions], positions contiguous; per row (o, c) shift, offset and variance as
// ColumnMoments gives them. `pool_outer` pools each channel over `outer` too (batch norm:
// outer is the batch); `group_size` pools groups of consecutive channels (group norm).
template <ffi::DataType T>
ffi::Error RowMoments(ffi::ThreadPool pool, ffi::Buffer<T, 3> x,
                      ffi::ResultBuffer<ffi::F32, 2> shift, ffi::ResultBuffer<ffi::F32, 2> offset,
                      ffi::ResultBuffer<ffi::F32, 2> var, bool pool_outer, int64_t group_size) {
  return Guarded("normjax row_moments", [&]() -> ffi::Error {
    const int64_t outer = x.dimensions()[0], c = x.dimensions()[1], n = x.dimensions()[2];
    if (group_size < 1 || c % group_size != 0) {
      return ffi::Error::InvalidArgument("normjax row_moments: bad group_size");
    }
    const int64_t rows = outer * c;
    std::vector<double> mean(rows, 0.0), m2(rows, 0.0);
    const auto stats = Active().row_stats[DtypeIndex<T>()];
    const void* xp = x.untyped_data();
    ParallelChunks(pool, rows, NumChunks(rows, n), [&](int64_t begin, int64_t end, int64_t) {
      stats(xp, n, begin, end, mean.data(), m2.data());
    });
    double count = static_cast<double>(n);
    if (pool_outer && outer > 1) {
      for (int64_t j = 0; j < c; ++j) PoolEqual(mean.data(), m2.data(), j, c, outer, count);
      count *= static_cast<double>(outer);
    }
    PoolGroups(mean.data(), m2.data(), rows, group_size, count);
    FinishAll(mean.data(), m2.data(), rows, count * static_cast<double>(group_size),
              shift->typed_data(), offset->typed_data(), var->typed_data());
    return ffi::Error::Success();
  });
}

template <ffi::DataType T>
auto BindRowMoments() {
  return BindMoments<T>().template Attr<bool>("pool_outer").template Attr<int64_t>("group_size");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NormjaxRowMomentsF32, RowMoments<ffi::F32>,
                              BindRowMoments<ffi::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(NormjaxRowMomentsBF16, RowMoments<ffi::BF16>,
                              BindRowMoments<ffi::BF16>());

namespace {

// The per-channel sums of a batch/instance/group norm backward on channels-last input: x
// and g viewed as [batch, positions, channels], per (batch, channel) entry the sums over
// positions of g and of g * ((x - shift) - offset), from one read of x and g. Each example's
// positions are cut into ranges fixed by the shape, summed on the pool's threads and added
// in order in double (the same result whatever the thread count).
template <ffi::DataType T>
ffi::Error ColumnSums(ffi::ThreadPool pool, ffi::Buffer<T, 3> x, ffi::Buffer<ffi::F32, 3> g,
                      ffi::Buffer<ffi::F32, 2> shift, ffi::Buffer<ffi::F32, 2> offset,
                      ffi::ResultBuffer<ffi::F32, 2> sg, ffi::ResultBuffer<ffi::F32, 2> sgx) {
  return Guarded("normjax column_sums", [&]() -> ffi::Error {
    const int64_t batch = x.dimensions()[0], positions = x.dimensions()[1];
    const int64_t c = x.dimensions()[2];
    // Per example, the sums of g over each channel, then those of g * ((x - shift) - offset).
    float* og = sg->typed_data();
    float* ogx = sgx->typed_data();
    if (positions == 0 || c == 0) {  // nothing to sum
      std::fill(og, og + batch * c, 0.0f);
      std::fill(ogx, ogx + batch * c, 0.0f);
      return ffi::Error::Success();
    }
    const ExampleRanges ranges(batch, positions, 2 * c);
    const auto sums = Active().column_sums[DtypeIndex<T>()];
    const void* xp = x.untyped_data();
    const float* gp = g.typed_data();
    const float* sp = shift.typed_data();
    const float* op = offset.typed_data();
    GroupSums(
        pool, batch, ranges.per_example, 2 * c, ranges.chunks,
        [&](int64_t b, int64_t piece, double* out) {
          int64_t e, m0, m1;
          ranges.Range(b * ranges.per_example + piece, &e, &m0, &m1);
          sums(xp, gp, sp + b * c, op + b * c, positions, c, b, m0, m1, out);
        },
        [&](int64_t b, const double* s) {
          for (int64_t i = 0; i < c; ++i) {
            og[b * c + i] = static_cast<float>(s[i]);
            ogx[b * c + i] = static_cast<float>(s[c + i]);
          }
        });
    return ffi::Error::Success();
  });
}

template <ffi::DataType T, int Rank>
auto BindSums() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .template Arg<ffi::Buffer<T, Rank>>()
      .template Arg<ffi::Buffer<ffi::F32, Rank>>()
      .template Arg<ffi::Buffer<ffi::F32, Rank - 1>>()
      .template Arg<ffi::Buffer<ffi::F32, Rank - 1>>()
      .template Ret<ffi::Buffer<ffi::F32, Rank - 1>>()
      .template Ret<ffi::Buffer<ffi::F32, Rank - 1>>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NormjaxColumnSumsF32, ColumnSums<ffi::F32>,
                              (BindSums<ffi::F32, 3>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(NormjaxColumnSumsBF16, ColumnSums<ffi::BF16>,
                              (BindSums<ffi::BF16, 3>()));

namespace {

// The per-row sums of a batch/group norm backward on channels-first input: x and g viewed
// as [rows, positions], per row the sums of g and of g * ((x - shift) - offset), from one
// read of x and g.
template <ffi::DataType T>
ffi::Error RowSums(ffi::ThreadPool pool, ffi::Buffer<T, 2> x, ffi::Buffer<ffi::F32, 2> g,
                   ffi::Buffer<ffi::F32, 1> shift, ffi::Buffer<ffi::F32, 1> offset,
                   ffi::ResultBuffer<ffi::F32, 1> sg, ffi::ResultBuffer<ffi::F32, 1> sgx) {
  return Guarded("normjax row_sums", [&]() -> ffi::Error {
    const int64_t rows = x.dimensions()[0], n = x.dimensions()[1];
    std::vector<double> tg(rows, 0.0), tgx(rows, 0.0);
    const auto sums = Active().row_sums[DtypeIndex<T>()];
    const void* xp = x.untyped_data();
    ParallelChunks(pool, rows, NumChunks(rows, 2 * n), [&](int64_t begin, int64_t end, int64_t) {
      sums(xp, g.typed_data(), shift.typed_data(), offset.typed_data(), n, begin, end,
           tg.data(), tgx.data());
    });
    for (int64_t r = 0; r < rows; ++r) {
      sg->typed_data()[r] = static_cast<float>(tg[r]);
      sgx->typed_data()[r] = static_cast<float>(tgx[r]);
    }
    return ffi::Error::Success();
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NormjaxRowSumsF32, RowSums<ffi::F32>, (BindSums<ffi::F32, 2>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(NormjaxRowSumsBF16, RowSums<ffi::BF16>, (BindSums<ffi::BF16, 2>()));
