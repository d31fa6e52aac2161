// Native CPU kernels for normalization over contiguous rows (layer, RMS and channels-first
// instance norm; normjax/_src/kernels/rows.py), and per-channel moments of channels-last and
// channels-first input (batch, instance and group norm; normjax/_src/kernels/moments.py).
//
// XLA:CPU reads a layer-norm row three to five times (one reduction per sum, then the
// normalize pass, and as many again in the backward). These kernels read each row from memory
// once or twice: a block of the row stays in L1 while its statistics are computed. They are
// XLA FFI handlers, registered by normjax/_src/kernels/cpu/__init__.py and called through the
// primitives there; every other platform (and a CPU without this library) uses the jax.numpy
// definition of the same primitives.
//
// Layout: x is [rows, features] (row-major, the features contiguous); statistics are per row,
// scale and bias per feature (or, with `per_row`, per row), all statistics in float32. The mean
// is split as `shift + offset`: shift is the float32 rounding of the mean (accumulated in
// blocks, see kernels.h), offset = mean - shift, so that `(x - shift) - offset` is accurate for
// rows whose spread is small next to their mean (`1e5 + N(0, 1)` in float32 loses nothing).
// A variance that is not finite (a NaN or Inf in the row, or values whose squares overflow
// float32) gives rstd = NaN, so the row comes out NaN rather than silently zero.
//
// Portability: the loops (kernels.h) are compiled for the x86-64 baseline, for AVX2+FMA and
// for AVX-512, and the widest level the CPU supports is picked once, at the first call
// (`NORMJAX_CPU_LEVEL=baseline|avx2|avx512` caps it; `NormjaxCpuLevel()` says which). Every
// level gives bit-identical results. Everything outside the loops is baseline code.
//
// Threads: rows are split over XLA's intra-op thread pool in chunks fixed by the shape, so the
// results do not depend on the thread count. The calling thread works too, and a scheduled
// task that starts after the work is done returns at once, so a busy pool delays nothing and
// cannot deadlock. A C++ exception (std::bad_alloc, say) anywhere, pool tasks included, is
// returned to XLA as an ffi::Error, never thrown through the C boundary.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// ----------------------------------------------------------------- shared by every level

constexpr int64_t kLanes = 16;     // float32 accumulators per sum (see kernels.h)
constexpr int64_t kBlock = 1024;   // elements per block of a row's statistics
constexpr int64_t kFlushRows = 128;  // rows per float32 partial of the per-feature sums
constexpr int64_t kMinElementsPerTask = 1 << 15;  // smaller inputs run on the calling thread
constexpr int64_t kMaxChunks = 64;
constexpr int64_t kMaxAccumulators = 1 << 21;  // doubles of per-chunk per-feature sums

// Positions per block of the channels-last moments: at most 128 (the float32 sums of a
// channel run over a block's positions), at least 8, and about 64 KiB of float32 (cache
// resident for the block's second read).
inline int64_t ColumnBlockPositions(int64_t channels) {
  return std::clamp<int64_t>((int64_t{1} << 14) / std::max<int64_t>(1, channels), 8, 128);
}

// (count, mean, M2) merged with Chan's formula, in double.
struct RunningMoments {
  double count = 0.0, mean = 0.0, m2 = 0.0;

  void Merge(double n, double block_mean, double block_m2) {
    const double total = count + n;
    const double delta = block_mean - mean;
    mean += delta * (n / total);
    m2 += block_m2 + delta * delta * (count * n / total);
    count = total;
  }

  // shift = float32(mean), offset = mean - shift, var = M2 / count (>= 0, NaN kept), and
  // var = +Inf when M2, the sum of squared deviations, is beyond float32's range: the
  // `jax.numpy` path's float32 sum overflows there, and both paths give NaN rows.
  void Finish(float* shift, float* offset, float* var) const {
    if (count == 0.0) {
      *shift = *offset = *var = 0.f;
      return;
    }
    *shift = static_cast<float>(mean);
    *offset = static_cast<float>(mean - static_cast<double>(*shift));
    const double v = m2 / count;
    *var = m2 > static_cast<double>(std::numeric_limits<float>::max())
               ? std::numeric_limits<float>::infinity()
               : static_cast<float>(v < 0.0 ? 0.0 : v);
  }
};

// totals[j] += parts[k * stride + j] for k = 0, 1, ..., count - 1 in that order (j < width),
// in double: the partial sums of chunks of rows, of ranges of positions or of blocks, added
// in a fixed order, so that the totals are the same bits whatever the thread count.
template <typename P>
inline void AddInOrder(const P* parts, int64_t count, int64_t stride, int64_t width,
                       double* totals) {
  for (int64_t k = 0; k < count; ++k) {
    const P* part = parts + k * stride;
    for (int64_t j = 0; j < width; ++j) totals[j] += static_cast<double>(part[j]);
  }
}

// 1 / sqrt(var + eps) for a finite variance, else NaN (see the file comment).
inline float RstdOf(float var, float eps) {
  return std::isfinite(var) ? 1.0f / std::sqrt(var + eps)
                            : std::numeric_limits<float>::quiet_NaN();
}

struct ForwardArgs {
  const void* x;
  const float* scale;
  const float* bias;
  void* y;
  float* shift;
  float* offset;
  float* var;
  int64_t n;
  float eps;
  bool centered;
  bool per_row;
};

struct BackwardArgs {
  const void* x;
  const void* ct;
  const float* shift;
  const float* offset;
  const float* rstd;
  const float* scale;
  void* dx;
  float* dscale_rows;  // per_row only
  float* dbias_rows;
  int64_t n;
  bool centered;
  bool per_row;
};

// The fused residual-add forward (RowsAddForward): h = x + residual is written to `h`, then
// the forward reads it back through `forward.x` (the same buffer).
struct AddForwardArgs {
  const void* x;
  const void* residual;
  void* h;
  ForwardArgs forward;
};

// The loops of one instruction-set level; index 0 is float32, 1 bfloat16.
struct Kernels {
  void (*forward[2])(const ForwardArgs&, int64_t begin, int64_t end);
  void (*backward[2])(const BackwardArgs&, int64_t begin, int64_t end, double* acc);
  void (*row_stats[2])(const void* x, int64_t n, int64_t begin, int64_t end, double* mean,
                       double* m2);
  void (*column_stats[2])(const void* x, int64_t positions, int64_t c, int64_t b, int64_t m0,
                          int64_t m1, double* mean, double* m2);
  void (*column_sums[2])(const void* x, const float* g, const float* shift, const float* offset,
                         int64_t positions, int64_t c, int64_t b, int64_t m0, int64_t m1,
                         double* sums);
  void (*row_sums[2])(const void* x, const float* g, const float* shift, const float* offset,
                      int64_t n, int64_t begin, int64_t end, double* sg, double* sgx);
  void (*add_forward[2])(const AddForwardArgs&, int64_t begin, int64_t end);
};

// The instruction-set levels, narrowest first: an index into kLevelNames and kDispatch.
enum Level : int { kBaseline, kAvx2, kAvx512, kNumLevels };
constexpr const char* kLevelNames[kNumLevels] = {"baseline", "avx2", "avx512"};

// ----------------------------------------------------------------- the levels

namespace baseline {
#define NJ_WIDTH 4
#define NJ_AVX2 0
#include "kernels.h"  // NOLINT(build/include)
#undef NJ_AVX2
#undef NJ_WIDTH
}  // namespace baseline

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#define NJ_WIDTH 8
#define NJ_AVX2 1
#include "kernels.h"  // NOLINT(build/include)
#undef NJ_AVX2
#undef NJ_WIDTH
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma")
namespace avx512 {
#define NJ_WIDTH 16
#define NJ_AVX2 1
#include "kernels.h"  // NOLINT(build/include)
#undef NJ_AVX2
#undef NJ_WIDTH
}  // namespace avx512
#pragma GCC pop_options
#endif

// The dispatch table: the loops of each level this build has, indexed by Level (a build for
// another architecture has the baseline only).
constexpr Kernels kDispatch[] = {
    baseline::MakeKernels(),
#if defined(__x86_64__)
    avx2::MakeKernels(),
    avx512::MakeKernels(),
#endif
};

// The widest level this CPU (and OS) supports.
Level SupportedLevel() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool has_avx512 = has_avx2 && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl");
  if (has_avx512) return kAvx512;
  if (has_avx2) return kAvx2;
#endif
  return kBaseline;
}

// The cap NORMJAX_CPU_LEVEL sets: the level it names; unset or any other value, no cap.
Level CapLevel() {
  const char* cap = std::getenv("NORMJAX_CPU_LEVEL");
  for (int level = kBaseline; cap != nullptr && level < kNumLevels; ++level) {
    if (std::strcmp(cap, kLevelNames[level]) == 0) return static_cast<Level>(level);
  }
  return static_cast<Level>(kNumLevels - 1);
}

// The level the kernels run at, chosen once (at the first call).
Level ActiveLevel() {
  static const Level level = std::min(SupportedLevel(), CapLevel());
  return level;
}

const Kernels& Active() { return kDispatch[ActiveLevel()]; }

template <ffi::DataType T>
constexpr int DtypeIndex() {
  return T == ffi::BF16 ? 1 : 0;
}

// ----------------------------------------------------------------- threads and errors

// Rows are cut into a fixed number of chunks that depends only on the shape (so sums over
// rows, added chunk by chunk in order, are the same whatever the thread count and timing).
int64_t NumChunks(int64_t rows, int64_t row_elements) {
  const int64_t by_size = rows * row_elements / kMinElementsPerTask;
  return std::max<int64_t>(1, std::min<int64_t>({by_size, rows, kMaxChunks}));
}

// The chunks of the channels-last kernels: each of `batch` examples' positions cut into
// `per_example` ranges fixed by the shape (about NumChunks of them over the whole input), so
// that per-range results added in order are the same whatever the thread count.
struct ExampleRanges {
  int64_t positions, per_example, span, chunks;

  ExampleRanges(int64_t batch, int64_t positions_, int64_t position_elements)
      : positions(positions_),
        per_example(std::max<int64_t>(
            1, NumChunks(batch * positions_, position_elements) / std::max<int64_t>(1, batch))),
        span((positions_ + per_example - 1) / per_example),
        chunks(batch * per_example) {}

  // Chunk k: example *b, positions [*m0, *m1) (empty past the end).
  void Range(int64_t k, int64_t* b, int64_t* m0, int64_t* m1) const {
    *b = k / per_example;
    *m0 = std::min(positions, (k % per_example) * span);
    *m1 = std::min(positions, *m0 + span);
  }
};

// Runs body(begin_row, end_row, chunk) for every chunk of [0, rows), on the calling thread
// and up to `pool.num_threads()` pool tasks. A task that starts after the calling thread
// has claimed the last chunk returns at once; the caller waits only for tasks that claimed
// work, so a busy pool delays nothing and cannot deadlock. The first exception a chunk throws
// (on any thread) is rethrown on the calling thread once every task has finished.
struct Shared {
  std::atomic<int64_t> next_chunk{0};
  std::mutex mu;
  std::condition_variable done;
  int64_t active = 0;
  bool closed = false;
  std::exception_ptr error;
};

template <typename Body>
void ParallelChunks(ffi::ThreadPool& pool, int64_t rows, int64_t chunks, Body body) {
  const int64_t chunk_rows = (rows + chunks - 1) / chunks;
  auto run_chunk = [&body, rows, chunk_rows](int64_t c) {
    const int64_t begin = c * chunk_rows;
    if (begin < rows) body(begin, std::min(rows, begin + chunk_rows), c);
  };
  // Every pool thread is offered a task (not one fewer, as if the caller were one of them):
  // right after an XLA fusion the pool's workers are still busy on their cores, and with
  // num_threads - 1 tasks the kernel often ran on the caller alone (RMS norm 8x512x1024:
  // 0.95 ms after itself, 1.5 ms after any XLA fusion; benchmarks/neighbours.py).
  const int64_t tasks = std::min<int64_t>(pool.num_threads(), chunks - 1);
  if (tasks <= 0) {
    for (int64_t c = 0; c < chunks; ++c) run_chunk(c);
    return;
  }
  auto shared = std::make_shared<Shared>();
  auto drain = [shared, chunks, run_chunk]() noexcept {
    for (int64_t c; (c = shared->next_chunk.fetch_add(1)) < chunks;) {
      try {
        run_chunk(c);
      } catch (...) {
        std::lock_guard<std::mutex> lock(shared->mu);
        if (!shared->error) shared->error = std::current_exception();
      }
    }
  };
  std::exception_ptr schedule_error;
  try {
    for (int64_t t = 0; t < tasks; ++t) {
      // `body` lives on the caller's stack: a task only touches it after registering, and
      // the caller does not return before every registered task has finished.
      pool.Schedule([shared, drain]() noexcept {
        {
          std::lock_guard<std::mutex> lock(shared->mu);
          if (shared->closed) return;
          ++shared->active;
        }
        drain();
        std::lock_guard<std::mutex> lock(shared->mu);
        if (--shared->active == 0) shared->done.notify_all();
      });
    }
  } catch (...) {  // fewer tasks: the calling thread does the rest
    schedule_error = std::current_exception();
  }
  drain();
  {
    std::unique_lock<std::mutex> lock(shared->mu);
    shared->closed = true;
    shared->done.wait(lock, [&] { return shared->active == 0; });
  }
  if (shared->error) std::rethrow_exception(shared->error);
  (void)schedule_error;  // every chunk ran; a failed Schedule only cost parallelism
}

// Runs `f` (returning ffi::Error), turning any C++ exception into an ffi::Error.
template <typename F>
ffi::Error Guarded(const char* kernel, F f) {
  try {
    return f();
  } catch (const std::bad_alloc&) {
    return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                      std::string(kernel) + ": out of memory");
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string(kernel) + ": " + e.what());
  } catch (...) {
    return ffi::Error::Internal(std::string(kernel) + ": unknown C++ exception");
  }
}

// ----------------------------------------------------------------- handlers

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
    std::vector<double> totals(static_cast<size_t>(batch) * 2 * c, 0.0);
    if (positions > 0 && c > 0) {
      const ExampleRanges ranges(batch, positions, 2 * c);
      const int64_t chunks = ranges.chunks;
      std::vector<double> part(static_cast<size_t>(chunks) * 2 * c, 0.0);
      const auto sums = Active().column_sums[DtypeIndex<T>()];
      const void* xp = x.untyped_data();
      const float* gp = g.typed_data();
      const float* sp = shift.typed_data();
      const float* op = offset.typed_data();
      ParallelChunks(pool, chunks, chunks, [&](int64_t begin, int64_t end, int64_t) {
        for (int64_t k = begin; k < end; ++k) {
          int64_t b, m0, m1;
          ranges.Range(k, &b, &m0, &m1);
          double* out = part.data() + k * 2 * c;
          sums(xp, gp, sp + b * c, op + b * c, positions, c, b, m0, m1, out);
        }
      });
      const int64_t per_example = ranges.per_example;
      for (int64_t b = 0; b < batch; ++b) {
        AddInOrder(part.data() + b * per_example * 2 * c, per_example, 2 * c, 2 * c,
                   totals.data() + b * 2 * c);
      }
    }
    float* og = sg->typed_data();
    float* ogx = sgx->typed_data();
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t i = 0; i < c; ++i) {
        og[b * c + i] = static_cast<float>(totals[b * 2 * c + i]);
        ogx[b * c + i] = static_cast<float>(totals[b * 2 * c + c + i]);
      }
    }
    return ffi::Error::Success();
  });
}

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

template <ffi::DataType T>
auto BindColumnMoments() {
  return BindMoments<T>().template Attr<int64_t>("group_size");
}

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

// ----------------------------------------------------------------- fused residual add

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

// The instruction-set level the kernels run at ("baseline", "avx2" or "avx512"), picked at
// the first call; the loader (normjax/_src/kernels/cpu/__init__.py) exposes it as CPU_LEVEL.
extern "C" __attribute__((visibility("default"))) const char* NormjaxCpuLevel() {
  return kLevelNames[ActiveLevel()];
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(NormjaxRowsForwardF32, RowsForward<ffi::F32>,
                              BindForward<ffi::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(NormjaxRowsForwardBF16, RowsForward<ffi::BF16>,
                              BindForward<ffi::BF16>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(NormjaxRowsBackwardF32, RowsBackward<ffi::F32>,
                              BindBackward<ffi::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(NormjaxRowsBackwardBF16, RowsBackward<ffi::BF16>,
                              BindBackward<ffi::BF16>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(NormjaxColumnMomentsF32, ColumnMoments<ffi::F32>,
                              BindColumnMoments<ffi::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(NormjaxColumnMomentsBF16, ColumnMoments<ffi::BF16>,
                              BindColumnMoments<ffi::BF16>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(NormjaxRowMomentsF32, RowMoments<ffi::F32>,
                              BindRowMoments<ffi::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(NormjaxRowMomentsBF16, RowMoments<ffi::BF16>,
                              BindRowMoments<ffi::BF16>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(NormjaxRowsAddForwardF32, RowsAddForward<ffi::F32>,
                              BindAddForward<ffi::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(NormjaxRowsAddForwardBF16, RowsAddForward<ffi::BF16>,
                              BindAddForward<ffi::BF16>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(NormjaxColumnSumsF32, ColumnSums<ffi::F32>,
                              (BindSums<ffi::F32, 3>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(NormjaxColumnSumsBF16, ColumnSums<ffi::BF16>,
                              (BindSums<ffi::BF16, 3>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(NormjaxRowSumsF32, RowSums<ffi::F32>, (BindSums<ffi::F32, 2>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(NormjaxRowSumsBF16, RowSums<ffi::BF16>, (BindSums<ffi::BF16, 2>()));
