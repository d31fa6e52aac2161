// What the parts of normjax's native CPU library share: the constants and types of the loops
// (level*.h, compiled once per instruction-set level by levels.cc), the arguments the handlers
// (handlers_rows.cc, handlers_moments.cc) pass them, and the dispatch table between the two.
//
// Everything here is baseline code: levels.cc includes this header before its first
// `#pragma GCC target` region, so nothing here is compiled for a wider target.

#ifndef NORMJAX_SRC_KERNELS_CPU_KERNELS_H_
#define NORMJAX_SRC_KERNELS_CPU_KERNELS_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

// Hidden: the library exports only its FFI handlers and NormjaxCpuLevel.
namespace normjax_cpu __attribute__((visibility("hidden"))) {

constexpr int64_t kLanes = 16;     // float32 accumulators per sum (see level.h)
constexpr int64_t kBlock = 1024;   // elements per block of a row's statistics
constexpr int64_t kFlushRows = 128;  // rows per float32 partial of the per-feature sums

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

// 1 / sqrt(var + eps) for a finite variance, else NaN (see handlers_rows.cc).
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
  // [rows, n] of T added to dx, or null: the residual-add backward (RowsAddBackward), where the
  // sum h's own cotangent joins the norm's.
  const void* add = nullptr;
  // [rows, n] of the cotangent's dtype, or null: the mixed residual-add backward
  // (RowsAddBackwardMixed: float32 h, bfloat16 cotangent) also writes dx rounded to bfloat16
  // there, x's cotangent, beside the float32 dx (the float32 residual's).
  void* dx_narrow = nullptr;
};

// The fused residual-add forward (RowsAddForward): h = x + residual is written to `h`, then
// the forward reads it back through `forward.x` (the same buffer).
struct AddForwardArgs {
  const void* x;
  const void* residual;
  void* h;
  ForwardArgs forward;
};

// The gated RMS norm (RowsGatedForward, RowsGatedBackward): x, z and (backward) ct are
// [rows, n], scale [groups, n]: row r is scaled by scale row r % groups (Mamba-2's groups of
// a feature axis as consecutive rows; 1 otherwise); `out` is y (forward) or dx, `dz` the
// backward's dz.
struct GatedArgs {
  const void* x;
  const void* z;
  const void* ct;
  const float* scale;
  void* out;
  void* dz;
  int64_t n;
  float eps;
  bool before;
  int64_t groups;
};

// Dynamic tanh's backward (TanhBackward): x, g and dx are [rows, n], scale [n], and t the
// forward's tanh(alpha * x) [rows, n] in float32, or null (recomputed).
struct TanhArgs {
  const void* x;
  const float* t;
  const void* g;
  const float* scale;
  void* dx;
  int64_t n;
  float alpha;
};

// The loops of one instruction-set level (a row of the dispatch table); index 0 is float32,
// 1 bfloat16.
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
  // bfloat16 x, float32 residual and h, bfloat16 y.
  void (*add_forward_mixed)(const AddForwardArgs&, int64_t begin, int64_t end);
  // float32 x (h) and dx, bfloat16 cotangent and dx_narrow.
  void (*add_backward_mixed)(const BackwardArgs&, int64_t begin, int64_t end, double* acc);
  void (*gated_forward[2])(const GatedArgs&, int64_t begin, int64_t end);
  void (*gated_backward[2])(const GatedArgs&, int64_t begin, int64_t end, double* acc);
  void (*tanh_backward[2])(const TanhArgs&, int64_t begin, int64_t end, double* acc);
};

// The instruction-set levels, narrowest first (levels.cc).
enum Level : int { kBaseline, kAvx2, kAvx512, kNumLevels };

// The level the kernels run at: the widest this CPU supports, capped by NORMJAX_CPU_LEVEL;
// chosen once, at the first call.
Level ActiveLevel();

// The loops of ActiveLevel() (its row of the dispatch table).
const Kernels& Active();

}  // namespace normjax_cpu

#endif  // NORMJAX_SRC_KERNELS_CPU_KERNELS_H_
