// The hot loops of normjax's CPU kernels, compiled once per instruction-set level.
//
// normalize.cc includes this file several times, each time inside its own namespace and (on x86-64)
// inside a `#pragma GCC target` region: the baseline every x86-64 CPU runs (SSE2), AVX2+FMA and
// AVX-512. It has no include guard and includes nothing: every standard header is included by
// normalize.cc before the first region, so that no library code is compiled for a wider target.
// Before including it, normalize.cc defines
//   NJ_WIDTH  floats per vector register (4, 8 or 16), and
//   NJ_AVX2   1 where AVX2 intrinsics may be used in this region (0 otherwise),
// and it declares the shared types (Kernels, ForwardArgs, BackwardArgs, RunningMoments,
// kLanes, kBlock) outside the regions.
//
// Every level computes the same floating-point operations in the same order: sums run over
// kLanes = 16 lanes (element i of a block in lane i % 16, as 4, 2 or 1 registers), the lanes
// are added in order, and normalize.cc is compiled with -ffp-contract=off (no FMA contraction). So
// the results are bit-identical whichever level runs (tests/test_native_portability.py).
//
// Accuracy: statistics are accumulated in blocks of at most kBlock elements (cache resident):
// per block a float32 sum gives the block mean, a second pass over the cached block sums
// (x - block mean) and its square, and the block's (count, mean, M2) is merged into the
// row's with Chan's formula in double. Float32 error grows over at most kBlock / kLanes = 64
// additions per lane, whatever the row length and whatever the data order.

typedef float VF __attribute__((vector_size(NJ_WIDTH * 4)));
typedef uint32_t VU __attribute__((vector_size(NJ_WIDTH * 4)));
typedef int32_t VI __attribute__((vector_size(NJ_WIDTH * 4)));
typedef uint16_t VH __attribute__((vector_size(NJ_WIDTH * 2)));

constexpr int64_t kWidth = NJ_WIDTH;
constexpr int kVecs = static_cast<int>(kLanes / kWidth);
static_assert(kVecs * kWidth == kLanes, "kLanes is a whole number of vectors");

inline float Load(const float* p, int64_t i) { return p[i]; }
inline float Load(const uint16_t* p, int64_t i) {
  const uint32_t bits = static_cast<uint32_t>(p[i]) << 16;
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

inline VF LoadV(const float* p) {
  VF v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void StoreV(float* p, VF v) { std::memcpy(p, &v, sizeof(v)); }
#if NJ_WIDTH == 16
// AVX-512: the bfloat16 conversions in a few instructions each (GCC's generic code for the
// versions below widens and narrows through 256-bit halves and word permutes); the same bits.
// The masked (maskz) forms: GCC 12's unmasked ones warn (-Wmaybe-uninitialized).
inline VF LoadV(const uint16_t* p) {  // bfloat16 -> float32: the bits shifted up
  const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const VU bits = reinterpret_cast<VU>(_mm512_maskz_cvtepu16_epi32(0xffff, half)) << 16;
  return reinterpret_cast<VF>(bits);
}
inline void StoreV(uint16_t* p, VF v) {  // round to nearest even, keep NaN (quieted)
  const VU bits = reinterpret_cast<VU>(v);
  const VU rounded = bits + 0x7fffu + ((bits >> 16) & 1u);
  const __mmask16 is_nan = _mm512_cmp_ps_mask(reinterpret_cast<__m512>(v),
                                              reinterpret_cast<__m512>(v), _CMP_UNORD_Q);
  const __m512i kept = _mm512_mask_or_epi32(reinterpret_cast<__m512i>(rounded), is_nan,
                                            reinterpret_cast<__m512i>(bits),
                                            _mm512_set1_epi32(0x400000));
  const VU high = reinterpret_cast<VU>(kept) >> 16;
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_maskz_cvtepi32_epi16(0xffff, reinterpret_cast<__m512i>(high)));
}
#else
inline VF LoadV(const uint16_t* p) {  // bfloat16 -> float32: the bits shifted up
  VH h;
  std::memcpy(&h, p, sizeof(h));
  const VU bits = __builtin_convertvector(h, VU) << 16;
  VF v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}
inline void StoreV(uint16_t* p, VF v) {  // round to nearest even, keep NaN (quieted)
  VU bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const VU rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  const VU quiet_nan = (bits >> 16) | 0x40u;
  const VU is_nan = reinterpret_cast<VU>(reinterpret_cast<VI>(bits & 0x7fffffffu) > 0x7f800000);
  const VH h = __builtin_convertvector((quiet_nan & is_nan) | (rounded & ~is_nan), VH);
  std::memcpy(p, &h, sizeof(h));
}
#endif

// kLanes values (v[0], v[1], ...) stored at p.
template <typename T>
inline void StoreLanes(T* p, const VF* v) {
#pragma GCC unroll 4
  for (int k = 0; k < kVecs; ++k) StoreV(p + k * kWidth, v[k]);
}
#if NJ_AVX2 && NJ_WIDTH == 8
inline __m256i RoundToBF16Bits(VF v) {  // the 32-bit lanes hold the bfloat16 bits (StoreV)
  const __m256i bits = _mm256_castps_si256(reinterpret_cast<__m256>(v));
  const __m256i high = _mm256_srli_epi32(bits, 16);
  const __m256i lsb = _mm256_and_si256(high, _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(
      _mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7fff)), lsb), 16);
  const __m256i is_nan = _mm256_cmpgt_epi32(
      _mm256_and_si256(bits, _mm256_set1_epi32(0x7fffffff)), _mm256_set1_epi32(0x7f800000));
  const __m256i quiet_nan = _mm256_or_si256(high, _mm256_set1_epi32(0x40));
  return _mm256_blendv_epi8(rounded, quiet_nan, is_nan);
}
// One pack instruction narrows both registers (GCC's generic narrowing is slower here).
inline void StoreLanes(uint16_t* p, const VF* v) {
  // packus works per 128-bit lane: [lo0..3 hi0..3 | lo4..7 hi4..7]; the permute restores order.
  const __m256i packed = _mm256_packus_epi32(RoundToBF16Bits(v[0]), RoundToBF16Bits(v[1]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_permute4x64_epi64(packed, 0xd8));
}
#endif

// p[i] as V: a vector of kWidth elements from p + i (V = VF), or the one element (V = float).
template <typename V, typename T>
inline V Get(const T* p, int64_t i) {
  if constexpr (std::is_same_v<V, VF>) {
    return LoadV(p + i);
  } else {
    return Load(p, i);
  }
}
// p[i] += v, for kWidth elements or one.
template <typename V>
inline void AddTo(float* p, int64_t i, V v) {
  if constexpr (std::is_same_v<V, VF>) {
    StoreV(p + i, LoadV(p + i) + v);
  } else {
    p[i] += v;
  }
}

// out[i] = f(i, VF{}) kLanes at a time, then f(i, 0.f) for the tail: `f` is written once for
// both (its second argument only says which type to compute in).
template <typename T, typename F>
inline void MapRow(T* __restrict__ out, int64_t n, F f) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    VF v[kVecs];
#pragma GCC unroll 4
    for (int k = 0; k < kVecs; ++k) v[k] = f(i + k * kWidth, VF{});
    StoreLanes(out + i, v);
  }
  for (; i < n; ++i) Store(out, i, f(i, 0.f));
}

// Rows whose sums the row kernels run together: each row's float32 chain of adds is
// independent of the others', so interleaving them keeps several adds in flight (a single
// row's chain waits on the add latency). Each row's sums still run in the same order as alone.
// AVX-512: 4 rows; AVX2 (2 registers per 16 lanes): 2; the SSE baseline: 1 (its 16 registers
// hold no more accumulators).
constexpr int kRowGroup = kVecs >= 4 ? 1 : 4 / kVecs;

// totals[r][k] += sum over [begin, end) of the k-th value f writes for row r < R: f(r, i, VF*
// out) for kWidth elements from i, f(r, i, float* out) for one. The sums run in float32 over
// kLanes lanes, so [begin, end) should be one block (at most kBlock elements); the tail (the
// elements after the last whole group of kLanes) is summed first, then the lanes in order.
template <int R, int K, typename F>
inline void LaneSumsRows(int64_t begin, int64_t end, F f, double (*totals)[K]) {
  VF acc[R][K][kVecs] = {};
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) {
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        VF out[K];
        f(r, i + v * kWidth, out);
#pragma GCC unroll 4
        for (int k = 0; k < K; ++k) acc[r][k][v] += out[k];
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    float tail[K] = {};
    for (int64_t j = i; j < end; ++j) {
      float out[K];
      f(r, j, out);
      for (int k = 0; k < K; ++k) tail[k] += out[k];
    }
    for (int k = 0; k < K; ++k) {
      float total = tail[k];
      for (int v = 0; v < kVecs; ++v) {
        for (int64_t l = 0; l < kWidth; ++l) total += acc[r][k][v][l];
      }
      totals[r][k] += static_cast<double>(total);
    }
  }
}

// LaneSumsRows over [0, n), block by block (each block's float32 totals added in double).
template <int R, int K, typename F>
inline void BlockedSumsRows(int64_t n, F f, double (*totals)[K]) {
  for (int64_t b = 0; b < n; b += kBlock) LaneSumsRows<R, K>(b, std::min(n, b + kBlock), f, totals);
}

// Mean and M2 (sum of squared deviations) of len <= kBlock cached values of each row x[r],
// two-pass: the float32 block mean, then the sums of d = x - block mean and d^2 (d is small,
// so the sums lose nothing to cancellation), corrected in double.
template <int R, typename T>
inline void BlockMomentsRows(const T* const* x, int64_t len, double* mean, double* m2) {
  double sum[R][1] = {};
  LaneSumsRows<R, 1>(0, len, [&](int r, int64_t i, auto* out) {
    using V = std::remove_pointer_t<decltype(out)>;
    out[0] = Get<V>(x[r], i);
  }, sum);
  const double count = static_cast<double>(len);
  float mb[R];
  for (int r = 0; r < R; ++r) mb[r] = static_cast<float>(sum[r][0] / count);
  double t[R][2] = {};
  LaneSumsRows<R, 2>(0, len, [&](int r, int64_t i, auto* out) {
    using V = std::remove_pointer_t<decltype(out)>;
    const V d = Get<V>(x[r], i) - mb[r];
    out[0] = d;
    out[1] = d * d;
  }, t);
  for (int r = 0; r < R; ++r) {
    mean[r] = static_cast<double>(mb[r]) + t[r][0] / count;
    m2[r] = t[r][1] - t[r][0] * (t[r][0] / count);
  }
}

// (count, mean, M2) of each row x[r] (r < R) of n elements, centered; uncentered: mean 0 and
// M2 = sum of x^2. The rows' sums run interleaved (LaneSumsRows), each as if alone.
template <int R, typename T>
void RowMomentsRows(const T* const* x, int64_t n, bool centered, RunningMoments* acc) {
  if (!centered) {  // one read: the squares converted on the fly, no float copy of the block
    double m2[R][1] = {};
    BlockedSumsRows<R, 1>(n, [&](int r, int64_t i, auto* out) {
      using V = std::remove_pointer_t<decltype(out)>;
      const V v = Get<V>(x[r], i);
      out[0] = v * v;
    }, m2);
    for (int r = 0; r < R; ++r) acc[r] = RunningMoments{static_cast<double>(n), 0.0, m2[r][0]};
    return;
  }
  // The first block two-pass (BlockMomentsRows); every later block in one read, its sums
  // about K = float32(mean so far), unless they cancel (as in ColumnStatsChunk: S1^2 / n >
  // S2 / 4, or not finite), when that row's block is summed again about its own mean.
  for (int r = 0; r < R; ++r) acc[r] = RunningMoments{};
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t len = std::min(n - b, kBlock);
    const double count = static_cast<double>(len);
    double mean[R], m2[R];
    const T* xb[R];
    for (int r = 0; r < R; ++r) xb[r] = x[r] + b;
    if (b == 0) {
      BlockMomentsRows<R>(xb, len, mean, m2);
    } else {
      float k[R];
      for (int r = 0; r < R; ++r) k[r] = static_cast<float>(acc[r].mean);
      double t[R][2] = {};
      LaneSumsRows<R, 2>(0, len, [&](int r, int64_t i, auto* out) {
        using V = std::remove_pointer_t<decltype(out)>;
        const V d = Get<V>(xb[r], i) - k[r];
        out[0] = d;
        out[1] = d * d;
      }, t);
      for (int r = 0; r < R; ++r) {
        mean[r] = static_cast<double>(k[r]) + t[r][0] / count;
        m2[r] = t[r][1] - t[r][0] * (t[r][0] / count);
        if (!(t[r][0] * t[r][0] <= 0.25 * count * t[r][1])) {
          BlockMomentsRows<1>(&xb[r], len, &mean[r], &m2[r]);
        }
      }
    }
    for (int r = 0; r < R; ++r) acc[r].Merge(count, mean[r], m2[r]);
  }
}

// Calls f(std::integral_constant<int, R>, r0) for groups of rows [r0, r0 + R) covering
// [begin, end) in order: R = kRowGroup while that many rows are left, then R = 1.
template <typename F>
inline void RowGroups(int64_t begin, int64_t end, F f) {
  int64_t r = begin;
  for (; r + kRowGroup <= end; r += kRowGroup) f(std::integral_constant<int, kRowGroup>{}, r);
  for (; r < end; ++r) f(std::integral_constant<int, 1>{}, r);
}

// Rows [begin, end) of the forward (see RowsForward in normalize.cc): the statistics of
// kRowGroup rows at a time (RowMomentsRows), then each row's output.
template <typename T>
void ForwardChunk(const ForwardArgs& a, int64_t begin, int64_t end) {
  const int64_t n = a.n;
  const T* xp = static_cast<const T*>(a.x);
  T* yp = static_cast<T*>(a.y);
  const float* __restrict__ g = a.scale;
  const float* __restrict__ bias = a.bias;
  RowGroups(begin, end, [&](auto rows, int64_t r0) {
    constexpr int R = decltype(rows)::value;
    const T* xs[R];
    for (int q = 0; q < R; ++q) xs[q] = xp + (r0 + q) * n;
    RunningMoments m[R];
    RowMomentsRows<R>(xs, n, a.centered, m);
    for (int q = 0; q < R; ++q) {
      const int64_t r = r0 + q;
      const T* __restrict__ x = xs[q];
      float s, off, v;
      m[q].Finish(&s, &off, &v);
      const float rstd = RstdOf(v, a.eps);
      if (a.per_row) {
        const float factor = rstd * g[r], b = bias[r];
        MapRow(yp + r * n, n, [&](int64_t i, auto type) {
          using V = decltype(type);
          return ((Get<V>(x, i) - s) - off) * factor + b;
        });
      } else {
        MapRow(yp + r * n, n, [&](int64_t i, auto type) {
          using V = decltype(type);
          return ((Get<V>(x, i) - s) - off) * (rstd * Get<V>(g, i)) + Get<V>(bias, i);
        });
      }
      a.shift[r] = s;
      a.offset[r] = off;
      a.var[r] = v;
    }
  });
}

// Rows [begin, end) of the backward (see RowsBackward in normalize.cc). Per-row sums are blocked
// (float32 lanes within a block, double across blocks; kRowGroup rows at a time). Without
// `per_row`, the chunk's per-feature sums of g * xhat and g are added to acc[0, n) and
// acc[n, 2n): float32 partials flushed into acc every kFlushRows rows, so their error grows
// over at most kFlushRows rows.
template <typename T>
void BackwardChunk(const BackwardArgs& a, int64_t begin, int64_t end, double* acc) {
  const int64_t n = a.n;
  const T* xp = static_cast<const T*>(a.x);
  const T* cp = static_cast<const T*>(a.ct);
  T* dxp = static_cast<T*>(a.dx);
  const float* __restrict__ gamma = a.scale;
  const double inv_n = n > 0 ? 1.0 / static_cast<double>(n) : 0.0;
  std::vector<float> partial(a.per_row ? 0 : 2 * n, 0.f);
  float* __restrict__ ds = partial.data();
  float* __restrict__ db = ds + n;
  auto flush = [&]() {
    AddInOrder(partial.data(), 1, 0, 2 * n, acc);
    std::fill(partial.begin(), partial.end(), 0.f);
  };
  int64_t pending = 0;
  RowGroups(begin, end, [&](auto rows, int64_t r0) {
    constexpr int R = decltype(rows)::value;
    const T* xs[R];
    const T* cs[R];
    float s[R], m[R], rs[R];
    for (int q = 0; q < R; ++q) {
      xs[q] = xp + (r0 + q) * n;
      cs[q] = cp + (r0 + q) * n;
      s[q] = a.shift[r0 + q];
      m[q] = a.offset[r0 + q];
      rs[q] = a.rstd[r0 + q];
    }
    double t[R][2] = {};
    if (a.per_row) {
      BlockedSumsRows<R, 2>(n, [&](int q, int64_t i, auto* out) {
        using V = std::remove_pointer_t<decltype(out)>;
        const V c = Get<V>(cs[q], i);
        out[0] = c;
        out[1] = c * (((Get<V>(xs[q], i) - s[q]) - m[q]) * rs[q]);
      }, t);
    } else {
      BlockedSumsRows<R, 2>(n, [&](int q, int64_t i, auto* out) {
        using V = std::remove_pointer_t<decltype(out)>;
        const V w = Get<V>(cs[q], i) * Get<V>(gamma, i);
        out[0] = w;
        out[1] = w * (((Get<V>(xs[q], i) - s[q]) - m[q]) * rs[q]);
      }, t);
    }
    for (int q = 0; q < R; ++q) {
      const int64_t r = r0 + q;
      const T* __restrict__ x = xs[q];
      const T* __restrict__ ct = cs[q];
      const float sq = s[q], mq = m[q], rsq = rs[q];
      if (a.per_row) {
        const float mean_g = a.centered ? static_cast<float>(t[q][0] * inv_n) : 0.f;
        const float mean_gx = static_cast<float>(t[q][1] * inv_n);
        const float factor = rsq * gamma[r];
        MapRow(dxp + r * n, n, [&](int64_t j, auto type) {
          using V = decltype(type);
          const V h = ((Get<V>(x, j) - sq) - mq) * rsq;
          return factor * ((Get<V>(ct, j) - mean_g) - h * mean_gx);
        });
        a.dscale_rows[r] = static_cast<float>(t[q][1]);
        a.dbias_rows[r] = static_cast<float>(t[q][0]);
        continue;
      }
      const float mean_w = a.centered ? static_cast<float>(t[q][0] * inv_n) : 0.f;
      const float mean_wx = static_cast<float>(t[q][1] * inv_n);
      MapRow(dxp + r * n, n, [&](int64_t j, auto type) {
        using V = decltype(type);
        const V c = Get<V>(ct, j);
        const V h = ((Get<V>(x, j) - sq) - mq) * rsq;
        AddTo(ds, j, c * h);
        AddTo(db, j, c);
        return rsq * ((c * Get<V>(gamma, j) - mean_w) - h * mean_wx);
      });
      if (++pending == kFlushRows) {
        flush();
        pending = 0;
      }
    }
  });
  if (pending > 0) flush();
}

// Mean and M2 of rows [begin, end) of x [rows, n] (the row moments kernel).
template <typename T>
void RowStatsChunk(const void* xv, int64_t n, int64_t begin, int64_t end, double* mean,
                   double* m2) {
  const T* xp = static_cast<const T*>(xv);
  RowGroups(begin, end, [&](auto rows, int64_t r0) {
    constexpr int R = decltype(rows)::value;
    const T* xs[R];
    for (int q = 0; q < R; ++q) xs[q] = xp + (r0 + q) * n;
    RunningMoments m[R];
    RowMomentsRows<R>(xs, n, true, m);
    for (int q = 0; q < R; ++q) {
      mean[r0 + q] = m[q].mean;
      m2[r0 + q] = m[q].m2;
    }
  });
}

// Per row r in [begin, end) of x and g [rows, n]: the sums of g and of g * ((x - shift[r]) -
// offset[r]), blocked (float32 lanes within a block, double across blocks; kRowGroup rows at
// a time), written to sg[r] and sgx[r]: the reductions of a batch/group norm backward on
// NCHW input.
template <typename T>
void RowSumsChunk(const void* xv, const float* g, const float* shift, const float* offset,
                  int64_t n, int64_t begin, int64_t end, double* sg, double* sgx) {
  const T* xp = static_cast<const T*>(xv);
  RowGroups(begin, end, [&](auto rows, int64_t r0) {
    constexpr int R = decltype(rows)::value;
    const T* xs[R];
    const float* gs[R];
    float s[R], o[R];
    for (int q = 0; q < R; ++q) {
      xs[q] = xp + (r0 + q) * n;
      gs[q] = g + (r0 + q) * n;
      s[q] = shift[r0 + q];
      o[q] = offset[r0 + q];
    }
    double t[R][2] = {};
    BlockedSumsRows<R, 2>(n, [&](int q, int64_t i, auto* out) {
      using V = std::remove_pointer_t<decltype(out)>;
      const V gg = Get<V>(gs[q], i);
      out[0] = gg;
      out[1] = gg * ((Get<V>(xs[q], i) - s[q]) - o[q]);
    }, t);
    for (int q = 0; q < R; ++q) {
      sg[r0 + q] = t[q][0];
      sgx[r0 + q] = t[q][1];
    }
  });
}

// s1[i] and s2[i] = the float32 sums over positions [p0, p1) of the two values that
// f(p, i, out) writes for channel i < c (out[0], out[1]: kWidth channels from i as VF, or
// channel i alone as float). Channels [0, c - c % 64) are summed 64 at a time in registers,
// the rest one by one; each channel's sums run over the positions in order either way (the
// same result at every level).
template <typename F>
inline void ColumnPairSums(int64_t p0, int64_t p1, int64_t c, F f, float* __restrict__ s1,
                           float* __restrict__ s2) {
  constexpr int64_t kSlice = 64;
  constexpr int kSliceVecs = static_cast<int>(kSlice / kWidth);
  const int64_t sliced = c - c % kSlice;
  for (int64_t i0 = 0; i0 < sliced; i0 += kSlice) {
    VF a1[kSliceVecs], a2[kSliceVecs];
    for (int v = 0; v < kSliceVecs; ++v) a1[v] = a2[v] = VF{};
    for (int64_t p = p0; p < p1; ++p) {
      for (int v = 0; v < kSliceVecs; ++v) {
        VF out[2];
        f(p, i0 + v * kWidth, out);
        a1[v] += out[0];
        a2[v] += out[1];
      }
    }
    for (int v = 0; v < kSliceVecs; ++v) {
      StoreV(s1 + i0 + v * kWidth, a1[v]);
      StoreV(s2 + i0 + v * kWidth, a2[v]);
    }
  }
  std::fill(s1 + sliced, s1 + c, 0.f);
  std::fill(s2 + sliced, s2 + c, 0.f);
  for (int64_t p = p0; p < p1; ++p) {
    for (int64_t i = sliced; i < c; ++i) {
      float out[2];
      f(p, i, out);
      s1[i] += out[0];
      s2[i] += out[1];
    }
  }
}

// Per-channel mean and M2 of positions [m0, m1) of example b of x [batch, positions, c]
// (channels contiguous), written to mean[0, c) and m2[0, c). Positions are taken in blocks
// small enough to stay in cache; within a block each channel's sums run over at most
// kBlockPositions positions in float32, and blocks are merged with Chan's formula in double.
// A block's sums are of d = x - K and d^2 about a shift K per channel:
//  * the first block of the range: K = its float32 block mean (one read for the mean, a second
//    read of the cached block for the sums);
//  * every later block: K = float32(mean so far), one read. Such a sum loses precision only
//    through cancellation in M2 = S2 - S1^2 / n, i.e. when the block mean is far from K
//    compared with the block's spread; where S1^2 / n > S2 / 4 for any channel (or a sum is
//    not finite) the block is summed again about its own float32 mean, as for the first. So
//    every block's M2 keeps all but at most 0.42 bits of what the two-pass sums give, whatever
//    the data order (an outlier, a drift, a constant channel).
template <typename T>
void ColumnStatsChunk(const void* xv, int64_t positions, int64_t c, int64_t b, int64_t m0,
                      int64_t m1, double* __restrict__ mean, double* __restrict__ m2) {
  const T* x = static_cast<const T*>(xv) + b * positions * c;
  const int64_t block = ColumnBlockPositions(c);
  std::vector<float> buf(3 * c);
  float* __restrict__ shift = buf.data();
  float* __restrict__ s1 = shift + c;
  float* __restrict__ s2 = s1 + c;
  std::fill(mean, mean + c, 0.0);
  std::fill(m2, m2 + c, 0.0);
  double count = 0.0;
  // s1, s2 = sums of d = x - shift and d^2 over positions [p0, p1).
  const auto shifted_sums = [&](int64_t p0, int64_t p1) {
    ColumnPairSums(p0, p1, c, [&](int64_t p, int64_t i, auto* out) {
      using V = std::remove_pointer_t<decltype(out)>;
      const V d = Get<V>(x + p * c, i) - Get<V>(shift, i);
      out[0] = d;
      out[1] = d * d;
    }, s1, s2);
  };
  // shift = the float32 mean of positions [p0, p1), then the sums about it (s1 holds the
  // plain sums meanwhile; the second value is unused).
  const auto two_pass = [&](int64_t p0, int64_t p1) {
    ColumnPairSums(p0, p1, c, [&](int64_t p, int64_t i, auto* out) {
      using V = std::remove_pointer_t<decltype(out)>;
      out[0] = Get<V>(x + p * c, i);
      out[1] = V{};
    }, shift, s2);
    const float inv = 1.0f / static_cast<float>(p1 - p0);
    for (int64_t i = 0; i < c; ++i) shift[i] *= inv;
    shifted_sums(p0, p1);
  };
  for (int64_t p0 = m0; p0 < m1; p0 += block) {
    const int64_t p1 = std::min(m1, p0 + block);
    const double nb = static_cast<double>(p1 - p0), total = count + nb;
    if (count == 0.0) {
      two_pass(p0, p1);
    } else {
      for (int64_t i = 0; i < c; ++i) shift[i] = static_cast<float>(mean[i]);
      shifted_sums(p0, p1);
      const float nf = static_cast<float>(p1 - p0);
      bool close = true;
      for (int64_t i = 0; i < c; ++i) close &= (s1[i] * s1[i] <= 0.25f * nf * s2[i]);
      if (!close) two_pass(p0, p1);
    }
    const double w_new = nb / total, w_cross = count * nb / total;
    for (int64_t i = 0; i < c; ++i) {
      const double a1 = s1[i];
      const double block_mean = static_cast<double>(shift[i]) + a1 / nb;
      const double block_m2 = static_cast<double>(s2[i]) - a1 * (a1 / nb);
      const double delta = block_mean - mean[i];
      mean[i] += delta * w_new;
      m2[i] += block_m2 + delta * delta * w_cross;
    }
    count = total;
  }
}

// Per-channel sums of g and of g * ((x - shift) - offset) over positions [m0, m1) of example
// b of x and g [batch, positions, c] (channels contiguous; shift and offset are example b's
// [c]), written to sums[0, c) and sums[c, 2c): the reductions of a batch/instance/group norm
// backward on NHWC input, from one read of x and g. Each channel's sums run over at most
// ColumnBlockPositions(c) positions in float32 and are added across blocks in double.
template <typename T>
void ColumnSumsChunk(const void* xv, const float* gv, const float* __restrict__ shift,
                     const float* __restrict__ offset, int64_t positions, int64_t c, int64_t b,
                     int64_t m0, int64_t m1, double* sums) {
  const T* x = static_cast<const T*>(xv) + b * positions * c;
  const float* g = gv + b * positions * c;
  const int64_t block = ColumnBlockPositions(c);
  std::vector<float> buf(2 * c);
  float* __restrict__ s1 = buf.data();
  float* __restrict__ s2 = s1 + c;
  std::fill(sums, sums + 2 * c, 0.0);
  for (int64_t p0 = m0; p0 < m1; p0 += block) {
    const int64_t p1 = std::min(m1, p0 + block);
    ColumnPairSums(p0, p1, c, [&](int64_t p, int64_t i, auto* out) {
      using V = std::remove_pointer_t<decltype(out)>;
      const V gg = Get<V>(g + p * c, i);
      out[0] = gg;
      out[1] = gg * ((Get<V>(x + p * c, i) - Get<V>(shift, i)) - Get<V>(offset, i));
    }, s1, s2);
    AddInOrder(buf.data(), 1, 0, 2 * c, sums);
  }
}

// Rows [begin, end) of the fused residual-add forward (see RowsAddForward in normalize.cc):
// per row, h = x + residual in float32, rounded to T and stored (the row stays in cache), then
// the forward of ForwardChunk on the stored, rounded h: the same statistics and output as the
// unfused add followed by the forward.
template <typename T>
void AddForwardChunk(const AddForwardArgs& a, int64_t begin, int64_t end) {
  const int64_t n = a.forward.n;
  const T* xp = static_cast<const T*>(a.x);
  const T* rp = static_cast<const T*>(a.residual);
  T* hp = static_cast<T*>(a.h);
  RowGroups(begin, end, [&](auto rows, int64_t r0) {
    constexpr int R = decltype(rows)::value;
    for (int64_t r = r0; r < r0 + R; ++r) {
      const T* __restrict__ x = xp + r * n;
      const T* __restrict__ res = rp + r * n;
      MapRow(hp + r * n, n, [&](int64_t i, auto type) {
        using V = decltype(type);
        return Get<V>(x, i) + Get<V>(res, i);
      });
    }
    ForwardChunk<T>(a.forward, r0, r0 + R);
  });
}

// This level's row of the dispatch table (normalize.cc).
constexpr Kernels MakeKernels() {
  Kernels k{};
  k.forward[0] = &ForwardChunk<float>;
  k.forward[1] = &ForwardChunk<uint16_t>;
  k.backward[0] = &BackwardChunk<float>;
  k.backward[1] = &BackwardChunk<uint16_t>;
  k.row_stats[0] = &RowStatsChunk<float>;
  k.row_stats[1] = &RowStatsChunk<uint16_t>;
  k.column_stats[0] = &ColumnStatsChunk<float>;
  k.column_stats[1] = &ColumnStatsChunk<uint16_t>;
  k.column_sums[0] = &ColumnSumsChunk<float>;
  k.column_sums[1] = &ColumnSumsChunk<uint16_t>;
  k.row_sums[0] = &RowSumsChunk<float>;
  k.row_sums[1] = &RowSumsChunk<uint16_t>;
  k.add_forward[0] = &AddForwardChunk<float>;
  k.add_forward[1] = &AddForwardChunk<uint16_t>;
  return k;
}
