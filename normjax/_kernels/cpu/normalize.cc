// Native CPU kernels for normalization over contiguous rows (layer, RMS and channels-first
// instance norm; normjax/_rows.py), and per-channel moments of channels-last input (batch,
// instance and group norm on NHWC; normjax/_columns.py).
//
// XLA:CPU reads a layer-norm row three to five times (one reduction per sum, then the
// normalize pass, and as many again in the backward). These kernels read each row from memory
// once: the row stays in L1 while its statistics and output are computed. They are XLA FFI
// handlers, registered by normjax/_native.py and called through the primitives there; every
// other platform (and a CPU without this library) uses the jax.numpy definition of the same
// primitives.
//
// Layout: x is [rows, features] (row-major, the features contiguous); statistics are per row,
// scale and bias per feature (or, with `per_row`, per row), all statistics in float32. The mean is split as
// `shift + offset` with `shift` the row's first element, so that `x - shift` is exact for
// rows whose spread is small next to their mean (Sterbenz) and the variance is a two-pass
// sum over the cached row: `1e5 + N(0, 1)` in float32 loses nothing to cancellation.
//
// Threads: rows are split over XLA's intra-op thread pool in chunks fixed by the shape, so the
// results do not depend on the thread count. The calling thread works too, and a scheduled
// task that starts after the work is done returns at once, so a busy pool delays nothing and
// cannot deadlock.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kLanes = 16;                  // independent accumulators (vectorizable)
constexpr int64_t kMinElementsPerTask = 1 << 15;  // smaller inputs run on the calling thread
constexpr int64_t kMaxChunks = 64;

inline float Load(const float* p, int64_t i) { return p[i]; }
inline float Load(const uint16_t* p, int64_t i) {
  uint32_t bits = static_cast<uint32_t>(p[i]) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
inline void Store(float* p, int64_t i, float v) { p[i] = v; }
inline void Store(uint16_t* p, int64_t i, float v) {  // round to nearest even, keep NaN
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    p[i] = static_cast<uint16_t>((bits >> 16) | 0x40u);
    return;
  }
  bits += 0x7fffu + ((bits >> 16) & 1u);
  p[i] = static_cast<uint16_t>(bits >> 16);
}

// Eight floats, one AVX register (two SSE registers without AVX). The reductions below are
// written with it explicitly: left to itself, GCC vectorized the same lane loops well in one
// inlined copy and into shuffles and stack spills in another (the per-row backward ran 2-3x
// slower than the per-feature one on the same rows).
typedef float V8 __attribute__((vector_size(32)));
constexpr int64_t kWidth = 8;
static_assert(kLanes == 2 * kWidth, "two vector accumulators");

inline V8 LoadV(const float* p) {
  V8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void StoreV(float* p, V8 v) { std::memcpy(p, &v, sizeof(v)); }
inline V8 Splat(float s) { return V8{} + s; }

// bfloat16 <-> float32 eight at a time (the same maths as Load/Store below).
typedef uint32_t U8 __attribute__((vector_size(32)));
typedef uint16_t H8 __attribute__((vector_size(16)));

inline V8 LoadV(const uint16_t* p) {
#if defined(__AVX2__)
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return reinterpret_cast<V8>(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
#else
  H8 h;
  std::memcpy(&h, p, sizeof(h));
  const U8 bits = __builtin_convertvector(h, U8) << 16;
  V8 v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
#endif
}
typedef int32_t I8 __attribute__((vector_size(32)));
inline void StoreV(uint16_t* p, V8 v) {  // round to nearest even, keep NaN (quieted)
  U8 bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const U8 rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  const U8 quiet_nan = (bits >> 16) | 0x40u;
  const U8 is_nan = reinterpret_cast<U8>(reinterpret_cast<I8>(bits & 0x7fffffffu) > 0x7f800000);
  const H8 h = __builtin_convertvector((quiet_nan & is_nan) | (rounded & ~is_nan), H8);
  std::memcpy(p, &h, sizeof(h));
}

// Sixteen values (`lo` then `hi`) at once; for bfloat16 with AVX2 (the overload below), one
// pack instruction narrows both.
template <typename T>
inline void StoreV2(T* p, V8 lo, V8 hi) {
  StoreV(p, lo);
  StoreV(p + kWidth, hi);
}
#if defined(__AVX2__)
inline __m256i RoundToBF16Bits(V8 v) {  // the 32-bit lanes hold the bfloat16 bits (StoreV)
  const __m256i bits = _mm256_castps_si256(reinterpret_cast<__m256>(v));
  const __m256i high = _mm256_srli_epi32(bits, 16);
  const __m256i lsb = _mm256_and_si256(high, _mm256_set1_epi32(1));
  const __m256i rounded =
      _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7fff)), lsb),
                        16);
  const __m256i is_nan = _mm256_cmpgt_epi32(
      _mm256_and_si256(bits, _mm256_set1_epi32(0x7fffffff)), _mm256_set1_epi32(0x7f800000));
  const __m256i quiet_nan = _mm256_or_si256(high, _mm256_set1_epi32(0x40));
  return _mm256_blendv_epi8(rounded, quiet_nan, is_nan);
}
inline void StoreV2(uint16_t* p, V8 lo, V8 hi) {
  // packus works per 128-bit lane: [lo0..3 hi0..3 | lo4..7 hi4..7]; the permute restores order.
  const __m256i packed = _mm256_packus_epi32(RoundToBF16Bits(lo), RoundToBF16Bits(hi));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_permute4x64_epi64(packed, 0xd8));
}
#endif

// out[i] = f(i, V8{}) sixteen at a time, then f(i, 0.f) for the tail: `f` is written once for
// both (its second argument only says which type to compute in; see Get).
template <typename T, typename F>
inline void MapRow(T* __restrict__ out, int64_t n, F f) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) StoreV2(out + i, f(i, V8{}), f(i + kWidth, V8{}));
  for (; i < n; ++i) Store(out, i, f(i, 0.f));
}
template <typename V>
inline V Get(const float* p, int64_t i) {
  if constexpr (std::is_same_v<V, V8>) {
    return LoadV(p + i);
  } else {
    return p[i];
  }
}

// The lanes of `lo` then `hi` (lanes 0..15 in order) added to `total`.
inline float AddLanes(float total, V8 lo, V8 hi) {
  for (int64_t l = 0; l < kWidth; ++l) total += lo[l];
  for (int64_t l = 0; l < kWidth; ++l) total += hi[l];
  return total;
}

// The row as float32: the row itself for float input, converted into `scratch` otherwise.
inline const float* AsFloat(const float* row, int64_t n, std::vector<float>& scratch) {
  (void)n;
  (void)scratch;
  return row;
}
inline const float* AsFloat(const uint16_t* row, int64_t n, std::vector<float>& scratch) {
  scratch.resize(n);
  float* out = scratch.data();
  int64_t i = 0;
  for (; i + kWidth <= n; i += kWidth) StoreV(out + i, LoadV(row + i));
  for (; i < n; ++i) out[i] = Load(row, i);
  return out;
}

// Sum of (x - s) and of ((x - s) - m)^2, each with kLanes independent accumulators.
inline float SumShifted(const float* x, int64_t n, float s) {
  const V8 vs = Splat(s);
  V8 lo = {}, hi = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    lo += LoadV(x + i) - vs;
    hi += LoadV(x + i + kWidth) - vs;
  }
  float total = 0.f;
  for (; i < n; ++i) total += x[i] - s;
  return AddLanes(total, lo, hi);
}

inline float SumSquares(const float* x, int64_t n, float s, float m) {
  const V8 vs = Splat(s), vm = Splat(m);
  V8 lo = {}, hi = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const V8 a = (LoadV(x + i) - vs) - vm, b = (LoadV(x + i + kWidth) - vs) - vm;
    lo += a * a;
    hi += b * b;
  }
  float total = 0.f;
  for (; i < n; ++i) {
    float d = (x[i] - s) - m;
    total += d * d;
  }
  return AddLanes(total, lo, hi);
}

// One output row: y = ((x - s) - m) * (rstd * g) + b.
template <typename T>
void NormalizeRow(const float* __restrict__ x, const float* __restrict__ g,
                  const float* __restrict__ b, float s, float m, float rstd, int64_t n,
                  T* __restrict__ out) {
  MapRow(out, n, [&](int64_t i, auto type) {
    using V = decltype(type);
    return ((Get<V>(x, i) - s) - m) * (rstd * Get<V>(g, i)) + Get<V>(b, i);
  });
}

// Sum of (x - s) and of (x - s)^2 in one pass (per-row moments without an output row).
template <typename T>
inline std::pair<float, float> SumShiftedAndSquares(const T* x, int64_t n, float s) {
  const V8 vs = Splat(s);
  V8 a_lo = {}, a_hi = {}, q_lo = {}, q_hi = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const V8 lo = LoadV(x + i) - vs, hi = LoadV(x + i + kWidth) - vs;
    a_lo += lo;
    a_hi += hi;
    q_lo += lo * lo;
    q_hi += hi * hi;
  }
  float a = 0.f, q = 0.f;
  for (; i < n; ++i) {
    const float d = Load(x, i) - s;
    a += d;
    q += d * d;
  }
  return {AddLanes(a, a_lo, a_hi), AddLanes(q, q_lo, q_hi)};
}

// The forward's first pass over a row: returns the row as float32 (the row itself for float
// input; a bfloat16 row is converted into `scratch` in the same loop) and sets `sum` to the
// sum of (x - s) when `centered`, else of x^2.
inline const float* FirstPass(const float* row, int64_t n, bool centered, float s,
                              std::vector<float>& scratch, float* sum) {
  (void)scratch;
  *sum = centered ? SumShifted(row, n, s) : SumSquares(row, n, 0.f, 0.f);
  return row;
}
inline const float* FirstPass(const uint16_t* row, int64_t n, bool centered, float s,
                              std::vector<float>& scratch, float* sum) {
  scratch.resize(n);
  float* out = scratch.data();
  const V8 vs = Splat(s);
  V8 lo = {}, hi = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const V8 a = LoadV(row + i), b = LoadV(row + i + kWidth);
    StoreV(out + i, a);
    StoreV(out + i + kWidth, b);
    if (centered) {
      lo += a - vs;
      hi += b - vs;
    } else {
      lo += a * a;
      hi += b * b;
    }
  }
  float total = 0.f;
  for (; i < n; ++i) {
    out[i] = Load(row, i);
    total += centered ? out[i] - s : out[i] * out[i];
  }
  *sum = AddLanes(total, lo, hi);
  return out;
}

// The backward's first pass over a row: writes xhat = ((x - s) - m) * rs and returns
// {sum of w, sum of w * xhat} with w = ct * gamma (w = ct without `kHasGamma`).
template <bool kHasGamma>
inline std::pair<float, float> XhatAndSums(const float* __restrict__ x,
                                           const float* __restrict__ ct,
                                           const float* __restrict__ gamma, float s, float m,
                                           float rs, int64_t n, float* __restrict__ xhat) {
  const V8 vs = Splat(s), vm = Splat(m), vr = Splat(rs);
  V8 w_lo = {}, w_hi = {}, wx_lo = {}, wx_hi = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const V8 h_lo = ((LoadV(x + i) - vs) - vm) * vr;
    const V8 h_hi = ((LoadV(x + i + kWidth) - vs) - vm) * vr;
    V8 g_lo = LoadV(ct + i), g_hi = LoadV(ct + i + kWidth);
    if (kHasGamma) {
      g_lo *= LoadV(gamma + i);
      g_hi *= LoadV(gamma + i + kWidth);
    }
    StoreV(xhat + i, h_lo);
    StoreV(xhat + i + kWidth, h_hi);
    w_lo += g_lo;
    w_hi += g_hi;
    wx_lo += g_lo * h_lo;
    wx_hi += g_hi * h_hi;
  }
  float sum_w = 0.f, sum_wx = 0.f;
  for (; i < n; ++i) {
    const float h = ((x[i] - s) - m) * rs;
    const float w = kHasGamma ? ct[i] * gamma[i] : ct[i];
    xhat[i] = h;
    sum_w += w;
    sum_wx += w * h;
  }
  return {AddLanes(sum_w, w_lo, w_hi), AddLanes(sum_wx, wx_lo, wx_hi)};
}

// One row of the backward (see RowsBackward); adds the row's terms of dscale and dbias.
template <typename T>
void BackwardRow(const float* __restrict__ x, const float* __restrict__ ct,
                 const float* __restrict__ gamma, float s, float m, float rs, bool centered,
                 int64_t n, float* __restrict__ xhat, float* __restrict__ dscale,
                 float* __restrict__ dbias, T* __restrict__ out) {
  const auto [sum_g, sum_gx] = XhatAndSums<true>(x, ct, gamma, s, m, rs, n, xhat);
  const float inv_n = 1.0f / static_cast<float>(n);
  const float a = centered ? sum_g * inv_n : 0.f;
  const float c = sum_gx * inv_n;
  MapRow(out, n, [&](int64_t j, auto type) {
    using V = decltype(type);
    return rs * ((Get<V>(ct, j) * Get<V>(gamma, j) - a) - Get<V>(xhat, j) * c);
  });
  for (int64_t j = 0; j < n; ++j) {
    dscale[j] += ct[j] * xhat[j];
    dbias[j] += ct[j];
  }
}

// The same two with one scale and bias for the whole row (instance norm over the trailing
// axes: one row per (example, channel)). BackwardRowScalar returns the row's dscale and dbias.
template <typename T>
void NormalizeRowScalar(const float* __restrict__ x, float g, float b, float s, float m,
                        float rstd, int64_t n, T* __restrict__ out) {
  const float factor = rstd * g;
  MapRow(out, n, [&](int64_t i, auto type) {
    using V = decltype(type);
    return ((Get<V>(x, i) - s) - m) * factor + b;
  });
}

template <typename T>
void BackwardRowScalar(const float* __restrict__ x, const float* __restrict__ ct, float gamma,
                       float s, float m, float rs, bool centered, int64_t n,
                       float* __restrict__ xhat, T* __restrict__ out, float* dscale,
                       float* dbias) {
  const auto [sum_g, sum_gx] = XhatAndSums<false>(x, ct, nullptr, s, m, rs, n, xhat);
  const float inv_n = 1.0f / static_cast<float>(n);
  const float a = centered ? sum_g * inv_n : 0.f;
  const float c = sum_gx * inv_n;
  const float factor = rs * gamma;
  MapRow(out, n, [&](int64_t j, auto type) {
    using V = decltype(type);
    return factor * ((Get<V>(ct, j) - a) - Get<V>(xhat, j) * c);
  });
  *dscale = sum_gx;
  *dbias = sum_g;
}

// Rows are cut into a fixed number of chunks that depends only on the shape (so sums over
// rows, added chunk by chunk in order, are the same whatever the thread count and timing).
int64_t NumChunks(int64_t rows, int64_t row_elements) {
  const int64_t by_size = rows * row_elements / kMinElementsPerTask;
  return std::max<int64_t>(1, std::min<int64_t>({by_size, rows, kMaxChunks}));
}

// Runs body(begin_row, end_row, chunk) for every chunk of [0, rows), on the calling thread
// and up to `pool.num_threads() - 1` pool tasks. A task that starts after the calling thread
// has claimed the last chunk returns at once; the caller waits only for tasks that claimed
// work, so a busy pool delays nothing and cannot deadlock.
struct Shared {
  std::atomic<int64_t> next_chunk{0};
  std::mutex mu;
  std::condition_variable done;
  int64_t active = 0;
  bool closed = false;
};

template <typename Body>
void ParallelChunks(ffi::ThreadPool& pool, int64_t rows, int64_t chunks, Body body) {
  const int64_t chunk_rows = (rows + chunks - 1) / chunks;
  auto run_chunk = [&body, rows, chunk_rows](int64_t c) {
    const int64_t begin = c * chunk_rows;
    if (begin < rows) body(begin, std::min(rows, begin + chunk_rows), c);
  };
  const int64_t tasks = std::min<int64_t>(pool.num_threads(), chunks) - 1;
  if (tasks <= 0) {
    for (int64_t c = 0; c < chunks; ++c) run_chunk(c);
    return;
  }
  auto shared = std::make_shared<Shared>();
  auto drain = [shared, chunks, run_chunk]() {
    for (int64_t c; (c = shared->next_chunk.fetch_add(1)) < chunks;) run_chunk(c);
  };
  for (int64_t t = 0; t < tasks; ++t) {
    // `body` lives on the caller's stack: a task only touches it after registering, and the
    // caller does not return before every registered task has finished.
    pool.Schedule([shared, drain]() {
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
  drain();
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->closed = true;
  shared->done.wait(lock, [&] { return shared->active == 0; });
}

template <ffi::DataType T>
ffi::Error RowsForward(ffi::ThreadPool pool, ffi::Buffer<T, 2> x, ffi::Buffer<ffi::F32, 1> scale,
                       ffi::Buffer<ffi::F32, 1> bias, ffi::ResultBuffer<T, 2> y,
                       ffi::ResultBuffer<ffi::F32, 1> shift,
                       ffi::ResultBuffer<ffi::F32, 1> offset,
                       ffi::ResultBuffer<ffi::F32, 1> var, float eps, bool centered,
                       bool per_row) {
  const int64_t rows = x.dimensions()[0], n = x.dimensions()[1];
  const size_t params = static_cast<size_t>(per_row ? rows : n);
  if (scale.element_count() != params || bias.element_count() != params) {
    return ffi::Error::InvalidArgument("normjax rows_forward: scale/bias size mismatch");
  }
  const auto* xp = x.typed_data();
  auto* yp = y->typed_data();
  const float* g = scale.typed_data();
  const float* b = bias.typed_data();
  float* shift_p = shift->typed_data();
  float* offset_p = offset->typed_data();
  float* var_p = var->typed_data();
  const float inv_n = 1.0f / static_cast<float>(n);
  ParallelChunks(pool, rows, NumChunks(rows, n), [&](int64_t begin, int64_t end, int64_t) {
    std::vector<float> scratch;
    for (int64_t r = begin; r < end; ++r) {
      const float s = centered && n > 0 ? Load(xp + r * n, 0) : 0.f;
      float first = 0.f;
      const float* row = FirstPass(xp + r * n, n, centered, s, scratch, &first);
      const float m = centered ? first * inv_n : 0.f;
      const float v = (centered ? SumSquares(row, n, s, m) : first) * inv_n;
      const float rstd = 1.0f / std::sqrt(v + eps);
      if (per_row) {
        NormalizeRowScalar(row, g[r], b[r], s, m, rstd, n, yp + r * n);
      } else {
        NormalizeRow(row, g, b, s, m, rstd, n, yp + r * n);
      }
      shift_p[r] = s;
      offset_p[r] = m;
      var_p[r] = v;
    }
  });
  return ffi::Error::Success();
}

// dx = rstd * (g*scale - E[g*scale] - xhat * E[g*scale*xhat])  (no E[g*scale] term for RMS),
// dscale = sum over rows of g * xhat, dbias = sum over rows of g; with `per_row` (one scale
// per row) dscale and dbias are per row instead, the same sums over the row.
template <ffi::DataType T>
ffi::Error RowsBackward(ffi::ThreadPool pool, ffi::Buffer<T, 2> x, ffi::Buffer<T, 2> ct,
                        ffi::Buffer<ffi::F32, 1> shift, ffi::Buffer<ffi::F32, 1> offset,
                        ffi::Buffer<ffi::F32, 1> rstd, ffi::Buffer<ffi::F32, 1> scale,
                        ffi::ResultBuffer<T, 2> dx, ffi::ResultBuffer<ffi::F32, 1> dscale,
                        ffi::ResultBuffer<ffi::F32, 1> dbias, bool centered, bool per_row) {
  const int64_t rows = x.dimensions()[0], n = x.dimensions()[1];
  if (scale.element_count() != static_cast<size_t>(per_row ? rows : n)) {
    return ffi::Error::InvalidArgument("normjax rows_backward: scale size mismatch");
  }
  const auto* xp = x.typed_data();
  const auto* cp = ct.typed_data();
  auto* dxp = dx->typed_data();
  const float* s_p = shift.typed_data();
  const float* m_p = offset.typed_data();
  const float* r_p = rstd.typed_data();
  const float* gamma = scale.typed_data();
  float* ds = dscale->typed_data();
  float* db = dbias->typed_data();
  const int64_t chunks = NumChunks(rows, n);
  if (per_row) {
    ParallelChunks(pool, rows, chunks, [&](int64_t begin, int64_t end, int64_t) {
      std::vector<float> x_scratch, c_scratch, xhat(n);
      for (int64_t r = begin; r < end; ++r) {
        const float* xr = AsFloat(xp + r * n, n, x_scratch);
        const float* cr = AsFloat(cp + r * n, n, c_scratch);
        BackwardRowScalar(xr, cr, gamma[r], s_p[r], m_p[r], r_p[r], centered, n, xhat.data(),
                          dxp + r * n, ds + r, db + r);
      }
    });
    return ffi::Error::Success();
  }
  // Per-chunk partial sums of g * xhat and g (one row of n each), added up in chunk order.
  std::vector<float> partial(static_cast<size_t>(chunks) * 2 * n, 0.f);
  ParallelChunks(pool, rows, chunks, [&](int64_t begin, int64_t end, int64_t chunk) {
    std::vector<float> x_scratch, c_scratch, xhat(n);
    float* dscale_acc = partial.data() + chunk * 2 * n;
    float* dbias_acc = dscale_acc + n;
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = AsFloat(xp + r * n, n, x_scratch);
      const float* cr = AsFloat(cp + r * n, n, c_scratch);
      BackwardRow(xr, cr, gamma, s_p[r], m_p[r], r_p[r], centered, n, xhat.data(), dscale_acc,
                  dbias_acc, dxp + r * n);
    }
  });
  for (int64_t j = 0; j < n; ++j) {
    float a = 0.f, b = 0.f;
    for (int64_t c = 0; c < chunks; ++c) {
      a += partial[c * 2 * n + j];
      b += partial[c * 2 * n + n + j];
    }
    ds[j] = a;
    db[j] = b;
  }
  return ffi::Error::Success();
}

// Per-channel moments of x viewed as [batch, positions, channels] (channels contiguous, as
// batch/instance/group norm see NHWC input): shift = x[b, 0, c], sum1 = sum over positions of
// (x - shift), sum2 = sum of (x - shift)^2, from one read of x. The shift is a sample of the
// channel, so sum2 / n - (sum1 / n)^2 cancels nothing significant unless that sample is many
// standard deviations from the mean.
// The bfloat16 widening happens in the loop (no converted copy of the row); GCC vectorizes
// it, faster on these short channel rows than the explicit vectors of the row kernels.
template <typename T>
void AccumulateShifted(const T* __restrict__ x, const float* __restrict__ shift, int64_t n,
                       float* __restrict__ sum1, float* __restrict__ sum2) {
  for (int64_t i = 0; i < n; ++i) {
    const float d = Load(x, i) - shift[i];
    sum1[i] += d;
    sum2[i] += d * d;
  }
}

// Pools shifted sums: entries start, start + stride, ... (`count` of them, each the sums of
// `n` elements about its own shift) are re-shifted to the first entry's shift K and added up,
// sum(x - K) = s1 + n d and sum((x - K)^2) = s2 + 2 d s1 + n d^2 with d = shift - K; every
// pooled entry then holds the totals.
inline void PoolShifted(float* shift, float* s1, float* s2, int64_t start, int64_t stride,
                        int64_t count, float n) {
  const float k = shift[start];
  float t1 = 0.f, t2 = 0.f;
  for (int64_t t = 0; t < count; ++t) {
    const int64_t j = start + t * stride;
    const float d = shift[j] - k;
    t1 += s1[j] + n * d;
    t2 += s2[j] + 2.f * d * s1[j] + n * d * d;
  }
  for (int64_t t = 0; t < count; ++t) {
    const int64_t j = start + t * stride;
    shift[j] = k;
    s1[j] = t1;
    s2[j] = t2;
  }
}

// Groups of `group_size` consecutive entries (group norm's channel groups) pooled.
inline void PoolGroups(float* shift, float* s1, float* s2, int64_t entries, int64_t group_size,
                       float n) {
  if (group_size <= 1) return;
  for (int64_t g = 0; g < entries; g += group_size) {
    PoolShifted(shift, s1, s2, g, 1, group_size, n);
  }
}

template <ffi::DataType T>
ffi::Error ColumnMoments(ffi::ThreadPool pool, ffi::Buffer<T, 3> x,
                         ffi::ResultBuffer<ffi::F32, 2> shift, ffi::ResultBuffer<ffi::F32, 2> sum1,
                         ffi::ResultBuffer<ffi::F32, 2> sum2, int64_t group_size) {
  const int64_t batch = x.dimensions()[0], positions = x.dimensions()[1], c = x.dimensions()[2];
  if (group_size < 1 || c % group_size != 0) {
    return ffi::Error::InvalidArgument("normjax column_moments: bad group_size");
  }
  const auto* xp = x.typed_data();
  float* shift_p = shift->typed_data();
  float* s1 = sum1->typed_data();
  float* s2 = sum2->typed_data();
  if (positions == 0 || c == 0) {
    std::fill(shift_p, shift_p + batch * c, 0.f);
    std::fill(s1, s1 + batch * c, 0.f);
    std::fill(s2, s2 + batch * c, 0.f);
    return ffi::Error::Success();
  }
  // Chunks: each example's positions cut into `per_example` ranges fixed by the shape.
  const int64_t per_example =
      std::max<int64_t>(1, NumChunks(batch * positions, c) / std::max<int64_t>(1, batch));
  const int64_t span = (positions + per_example - 1) / per_example;
  const int64_t chunks = batch * per_example;
  std::vector<float> partial(static_cast<size_t>(chunks) * 2 * c, 0.f);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t i = 0; i < c; ++i) shift_p[b * c + i] = Load(xp + b * positions * c, i);
  }
  ParallelChunks(pool, chunks, chunks, [&](int64_t begin, int64_t end, int64_t) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t b = k / per_example, part = k % per_example;
      const int64_t m0 = part * span, m1 = std::min(positions, m0 + span);
      float* a1 = partial.data() + k * 2 * c;
      for (int64_t m = m0; m < m1; ++m) {
        AccumulateShifted(xp + (b * positions + m) * c, shift_p + b * c, c, a1, a1 + c);
      }
    }
  });
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t i = 0; i < c; ++i) {
      float a = 0.f, q = 0.f;
      for (int64_t part = 0; part < per_example; ++part) {
        const float* p = partial.data() + (b * per_example + part) * 2 * c;
        a += p[i];
        q += p[c + i];
      }
      s1[b * c + i] = a;
      s2[b * c + i] = q;
    }
  }
  PoolGroups(shift_p, s1, s2, batch * c, group_size, static_cast<float>(positions));
  return ffi::Error::Success();
}

// x -> (shift, sum1, sum2), the binding both moments kernels start from.
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

// Moments of channels-first input (batch/group norm on NCHW): x viewed as [outer, channels,
// positions], positions contiguous. Per row (o, c): shift = x[o, c, 0] and the shifted sums
// of its positions, one read of x. `pool_outer` pools each channel over `outer` too (batch
// norm: outer is the batch); `group_size` pools groups of consecutive channels (group norm).
template <ffi::DataType T>
ffi::Error RowMoments(ffi::ThreadPool pool, ffi::Buffer<T, 3> x,
                      ffi::ResultBuffer<ffi::F32, 2> shift, ffi::ResultBuffer<ffi::F32, 2> sum1,
                      ffi::ResultBuffer<ffi::F32, 2> sum2, bool pool_outer, int64_t group_size) {
  const int64_t outer = x.dimensions()[0], c = x.dimensions()[1], n = x.dimensions()[2];
  if (group_size < 1 || c % group_size != 0) {
    return ffi::Error::InvalidArgument("normjax row_moments: bad group_size");
  }
  const auto* xp = x.typed_data();
  float* shift_p = shift->typed_data();
  float* s1 = sum1->typed_data();
  float* s2 = sum2->typed_data();
  const int64_t rows = outer * c;
  ParallelChunks(pool, rows, NumChunks(rows, n), [&](int64_t begin, int64_t end, int64_t) {
    for (int64_t r = begin; r < end; ++r) {
      const float s = n > 0 ? Load(xp + r * n, 0) : 0.f;
      const auto [a, q] = SumShiftedAndSquares(xp + r * n, n, s);
      shift_p[r] = s;
      s1[r] = a;
      s2[r] = q;
    }
  });
  float count = static_cast<float>(n);
  if (pool_outer && outer > 1) {
    for (int64_t j = 0; j < c; ++j) PoolShifted(shift_p, s1, s2, j, c, outer, count);
    count *= static_cast<float>(outer);
  }
  PoolGroups(shift_p, s1, s2, rows, group_size, count);
  return ffi::Error::Success();
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

}  // namespace

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
