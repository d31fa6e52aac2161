// The vectors of one instruction-set level: their types, loads and stores (bfloat16 rounded
// to nearest even), and MapRow, the elementwise loop.
//
// Part of the loops of one instruction-set level: included by level.h only (no include guard,
// no includes; see level.h).

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

// p[i] = v, for kWidth elements or one.
template <typename V, typename T>
inline void Put(T* p, int64_t i, V v) {
  if constexpr (std::is_same_v<V, VF>) {
    StoreV(p + i, v);
  } else {
    Store(p, i, v);
  }
}

// c as V (every lane c for V = VF).
template <typename V>
inline V Splat(float c) {
  return V{} + c;
}

// exp(x) in float32 for x clamped to [-87.33, 88] (where exp is a normal float32 number),
// for kWidth lanes (V = VF) or one (V = float), with the same operations either way (so that
// every level and the tail of a row give the same bits): Cephes' expf polynomial on
// r = x - n ln 2 (ln 2 in two parts), times 2^n. n, the integer nearest x / ln 2, comes from
// adding 1.5 * 2^23 + 127 (the sum's low bits are n + 127, the biased exponent of 2^n, which
// the clamp keeps in [1, 254]). NaN kept. Used by the sigmoid and tanh only: there the clamp
// changes nothing (1 + exp(-87.33) is 1; the sigmoid is set to 0 where exp(-z) would exceed
// exp(87.33); tanh is +-1 long before). The sigmoid and silu are within 3 ulp of float64's, as XLA's
// are (tests/test_kernels_gated.py, at every exponent).
template <typename V>
inline V ExpNormal(V x) {
  using U = std::conditional_t<std::is_same_v<V, VF>, VU, uint32_t>;
  const V lo = Splat<V>(-87.33f), hi = Splat<V>(88.f);
  x = x < lo ? lo : x;  // NaN compares false: kept
  x = x > hi ? hi : x;
  const V magic = Splat<V>(12583039.f);  // 1.5 * 2^23 + 127
  const V t = x * 1.44269504088896341f + magic;
  const V n = t - magic;
  const V r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  V p = Splat<V>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const V y = (p * (r * r) + r) + 1.f;
  U bits;
  std::memcpy(&bits, &t, sizeof(bits));
  bits = bits << 23;  // (n + 127) << 23: 2^n
  V scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

// The logistic sigmoid 1 / (1 + exp(-z)), as XLA:CPU expands jax.nn.sigmoid, with a result
// below float32's normal range (z below about -87.34) set to 0, as XLA's threads flush it,
// whether or not this thread flushes subnormal numbers (so silu(-Inf) = -Inf * 0 = NaN, as
// XLA's, although exp(-z) is clamped).
template <typename V>
inline V Sigmoid(V z) {
  const V s = Splat<V>(1.f) / (Splat<V>(1.f) + ExpNormal(-z));
  return s < 1.17549435e-38f ? V{} : s;
}

// tanh(x) in float32 (Cephes' tanhf), for kWidth lanes (V = VF) or one (V = float), with the
// same operations either way: an odd polynomial for |x| <= 0.625, else
// 1 - 2 / (exp(2|x|) + 1) with x's sign (+-1 beyond 44, where exp(2|x|) is clamped). NaN kept.
// Within 3 ulp of float64's (tests/test_kernels_tanh.py, at every exponent).
template <typename V>
inline V Tanh(V x) {
  const V zero = V{};
  const V ax = x < zero ? -x : x;
  const V e = ExpNormal(ax + ax);
  V big = 1.f - 2.f / (e + 1.f);
  big = x < zero ? -big : big;
  const V z = x * x;
  V p = Splat<V>(-5.70498872745e-3f);
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const V small = (p * z) * x + x;
  return ax > 0.625f ? big : small;
}
