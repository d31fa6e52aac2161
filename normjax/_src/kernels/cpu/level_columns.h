// The channels-last kernels' loops of one instruction-set level: per-channel moments and
// sums over positions.
//
// Part of the loops of one instruction-set level: included by level.h only (no include guard,
// no includes; see level.h).

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
