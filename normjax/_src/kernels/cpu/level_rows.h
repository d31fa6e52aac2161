// The row kernels' loops of one instruction-set level: the statistics of rows (interleaved
// in groups), the forward, the backward, the fused residual-add forward, and the per-row
// moments and sums of channels-first input.
//
// Part of the loops of one instruction-set level: included by level.h only (no include guard,
// no includes; see level.h).

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

// The sums t[r] of d = x[r] - k[r] and d^2 over len <= kBlock values of each row x[r], and
// from them the mean k + S1 / len and M2 = S2 - S1^2 / len, corrected in double.
template <int R, typename T>
inline void ShiftedMomentsRows(const T* const* x, int64_t len, const float* k, double (*t)[2],
                               double* mean, double* m2) {
  LaneSumsRows<R, 2>(0, len, [&](int r, int64_t i, auto* out) {
    using V = std::remove_pointer_t<decltype(out)>;
    const V d = Get<V>(x[r], i) - k[r];
    out[0] = d;
    out[1] = d * d;
  }, t);
  const double count = static_cast<double>(len);
  for (int r = 0; r < R; ++r) {
    mean[r] = static_cast<double>(k[r]) + t[r][0] / count;
    m2[r] = t[r][1] - t[r][0] * (t[r][0] / count);
  }
}

// mean[r] = the float32 mean of the first len <= kBlock values of each row x[r] (float32
// lane sums, the same bits on every level).
template <int R, typename T>
inline void BlockMeanRows(const T* const* x, int64_t len, float* mean) {
  double sum[R][1] = {};
  LaneSumsRows<R, 1>(0, len, [&](int r, int64_t i, auto* out) {
    using V = std::remove_pointer_t<decltype(out)>;
    out[0] = Get<V>(x[r], i);
  }, sum);
  for (int r = 0; r < R; ++r) mean[r] = static_cast<float>(sum[r][0] / static_cast<double>(len));
}

// Mean and M2 (sum of squared deviations) of len <= kBlock cached values of each row x[r],
// two-pass: the float32 block mean, then the sums of d = x - block mean and d^2 (d is small,
// so the sums lose nothing to cancellation), corrected in double.
template <int R, typename T>
inline void BlockMomentsRows(const T* const* x, int64_t len, double* mean, double* m2) {
  float mb[R];
  BlockMeanRows<R>(x, len, mb);
  double t[R][2] = {};
  ShiftedMomentsRows<R>(x, len, mb, t, mean, m2);
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
  // Every block in one read: its sums about a shift K per row, unless they cancel or are not
  // finite, when that row's block is summed again two-pass about its own mean
  // (BlockMomentsRows). The first block's K is the float32 mean of its first kHead values
  // (BlockMeanRows: the same sum on every level), kept where S1^2 / n <= S2 / 16 (M2 loses at
  // most log2(16/15) = 0.09 bits to the subtraction; for independent values K's spread about
  // the block mean is under an eighth of their standard deviation, which passes about 96 % of
  // rows); a later block's K is float32(mean so far), kept where S1^2 / n <= S2 / 4 (as in
  // ColumnStatsChunk: at most 0.42 bits; there a block far from the ones before it is what
  // fails).
  constexpr int64_t kHead = 4 * kLanes;
  for (int r = 0; r < R; ++r) acc[r] = RunningMoments{};
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t len = std::min(n - b, kBlock);
    const double count = static_cast<double>(len);
    double mean[R], m2[R];
    const T* xb[R];
    for (int r = 0; r < R; ++r) xb[r] = x[r] + b;
    float k[R];
    if (b == 0) {
      BlockMeanRows<R>(xb, std::min(len, kHead), k);
    } else {
      for (int r = 0; r < R; ++r) k[r] = static_cast<float>(acc[r].mean);
    }
    const double bound = b == 0 ? 0.0625 : 0.25;
    double t[R][2] = {};
    ShiftedMomentsRows<R>(xb, len, k, t, mean, m2);
    for (int r = 0; r < R; ++r) {
      if (!(t[r][0] * t[r][0] <= bound * count * t[r][1]) || !std::isfinite(t[r][1])) {
        BlockMomentsRows<1>(&xb[r], len, &mean[r], &m2[r]);
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

// Rows [begin, end) of the forward (see RowsForward in handlers_rows.cc): the statistics of
// kRowGroup rows at a time (RowMomentsRows), then each row's output (of type TY: T but for
// the mixed residual add's bfloat16 output of a float32 sum).
template <typename T, typename TY = T>
void ForwardChunk(const ForwardArgs& a, int64_t begin, int64_t end) {
  const int64_t n = a.n;
  const T* xp = static_cast<const T*>(a.x);
  TY* yp = static_cast<TY*>(a.y);
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

// Per-feature float32 partial sums (`width` of them) over rows, flushed into acc[0, width)
// (added in order, in double) every kFlushRows rows and at the end, so that their float32
// error grows over at most kFlushRows rows: the backward kernels' sums over rows.
class FeaturePartials {
 public:
  FeaturePartials(int64_t width, double* acc) : sums_(width, 0.f), acc_(acc) {}
  ~FeaturePartials() { Flush(); }
  float* data() { return sums_.data(); }
  void RowDone() {
    if (++pending_ == kFlushRows) Flush();
  }

 private:
  void Flush() {
    if (pending_ == 0) return;
    AddInOrder(sums_.data(), 1, 0, static_cast<int64_t>(sums_.size()), acc_);
    std::fill(sums_.begin(), sums_.end(), 0.f);
    pending_ = 0;
  }
  std::vector<float> sums_;
  double* acc_;
  int64_t pending_ = 0;
};

// Rows [begin, end) of the backward (see RowsBackward in handlers_rows.cc; with `add`, the
// residual-add backward's dx = the norm's dx + add). Per-row sums are blocked
// (float32 lanes within a block, double across blocks; kRowGroup rows at a time). Without
// `per_row`, the chunk's per-feature sums of g * xhat and g are added to acc[0, n) and
// acc[n, 2n): float32 partials flushed into acc every kFlushRows rows, so their error grows
// over at most kFlushRows rows. With TC = bfloat16 and T = float32 (the mixed residual-add
// backward), the cotangent is read as bfloat16 (widened exactly) and dx, computed and stored
// in float32, is also stored rounded to bfloat16 in `dx_narrow`: the bits of XLA's converts
// around the float32 backward (with or without `add`).
template <typename T, typename TC = T>
void BackwardChunk(const BackwardArgs& a, int64_t begin, int64_t end, double* acc) {
  const int64_t n = a.n;
  const T* xp = static_cast<const T*>(a.x);
  const TC* cp = static_cast<const TC*>(a.ct);
  T* dxp = static_cast<T*>(a.dx);
  const T* addp = static_cast<const T*>(a.add);
  TC* narrowp = static_cast<TC*>(a.dx_narrow);
  const float* __restrict__ gamma = a.scale;
  const double inv_n = n > 0 ? 1.0 / static_cast<double>(n) : 0.0;
  FeaturePartials partial(a.per_row ? 0 : 2 * n, acc);
  float* __restrict__ ds = partial.data();
  float* __restrict__ db = ds + n;
  RowGroups(begin, end, [&](auto rows, int64_t r0) {
    constexpr int R = decltype(rows)::value;
    const T* xs[R];
    const TC* cs[R];
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
      const TC* __restrict__ ct = cs[q];
      const float sq = s[q], mq = m[q], rsq = rs[q];
      // dx[j] = body(j), plus add[j] (in float32, rounded once) for the residual-add backward;
      // with TC != T, also stored to dx_narrow, rounded from dx's stored value.
      auto write_dx = [&](auto body) {
        if (addp == nullptr) {
          if constexpr (std::is_same_v<T, TC>) {
            MapRow(dxp + r * n, n, body);
          } else {
            MapRow(dxp + r * n, n, [&](int64_t j, auto type) {
              using V = decltype(type);
              const V total = body(j, type);
              Put<V>(narrowp + r * n, j, total);
              return total;
            });
          }
          return;
        }
        const T* __restrict__ extra = addp + r * n;
        MapRow(dxp + r * n, n, [&](int64_t j, auto type) {
          using V = decltype(type);
          const V total = body(j, type) + Get<V>(extra, j);
          if constexpr (!std::is_same_v<T, TC>) Put<V>(narrowp + r * n, j, total);
          return total;
        });
      };
      if (a.per_row) {
        const float mean_g = a.centered ? static_cast<float>(t[q][0] * inv_n) : 0.f;
        const float mean_gx = static_cast<float>(t[q][1] * inv_n);
        const float factor = rsq * gamma[r];
        write_dx([&](int64_t j, auto type) {
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
      write_dx([&](int64_t j, auto type) {
        using V = decltype(type);
        const V c = Get<V>(ct, j);
        const V h = ((Get<V>(x, j) - sq) - mq) * rsq;
        AddTo(ds, j, c * h);
        AddTo(db, j, c);
        return rsq * ((c * Get<V>(gamma, j) - mean_w) - h * mean_wx);
      });
      partial.RowDone();
    }
  });
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

// Rows [begin, end) of the fused residual-add forward (see RowsAddForward in handlers_rows.cc):
// per row, h = x + residual in float32, rounded to T and stored (the row stays in cache), then
// the forward of ForwardChunk on the stored, rounded h: the same statistics and output as the
// unfused add followed by the forward. With TX = bfloat16 and T = float32 (a float32 residual
// stream), x is widened exactly, h is the float32 sum and y is rounded to bfloat16 once: the
// same bits as converting x, adding, normalizing in float32 and rounding the output.
template <typename TX, typename T = TX>
void AddForwardChunk(const AddForwardArgs& a, int64_t begin, int64_t end) {
  const int64_t n = a.forward.n;
  const TX* xp = static_cast<const TX*>(a.x);
  const T* rp = static_cast<const T*>(a.residual);
  T* hp = static_cast<T*>(a.h);
  RowGroups(begin, end, [&](auto rows, int64_t r0) {
    constexpr int R = decltype(rows)::value;
    for (int64_t r = r0; r < r0 + R; ++r) {
      const TX* __restrict__ x = xp + r * n;
      const T* __restrict__ res = rp + r * n;
      MapRow(hp + r * n, n, [&](int64_t i, auto type) {
        using V = decltype(type);
        return Get<V>(x, i) + Get<V>(res, i);
      });
    }
    ForwardChunk<T, TX>(a.forward, r0, r0 + R);
  });
}
