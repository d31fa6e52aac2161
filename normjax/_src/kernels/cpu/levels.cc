// The instruction-set levels of normjax's CPU kernels and the one dispatch table.
//
// The loops (level.h) are compiled for the x86-64 baseline, for AVX2+FMA and for AVX-512, and
// the widest level the CPU supports is picked once, at the first call
// (`NORMJAX_CPU_LEVEL=baseline|avx2|avx512` caps it; `NormjaxCpuLevel()` says which). Every
// level gives bit-identical results. Everything outside the `#pragma GCC target` regions is
// baseline code.

// Every standard header the loops use, before the first region (see level.h).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "kernels.h"

namespace normjax_cpu {
namespace {

namespace baseline {
#define NJ_WIDTH 4
#define NJ_AVX2 0
#include "level.h"  // NOLINT(build/include)
#undef NJ_AVX2
#undef NJ_WIDTH
}  // namespace baseline

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#define NJ_WIDTH 8
#define NJ_AVX2 1
#include "level.h"  // NOLINT(build/include)
#undef NJ_AVX2
#undef NJ_WIDTH
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma")
namespace avx512 {
#define NJ_WIDTH 16
#define NJ_AVX2 1
#include "level.h"  // NOLINT(build/include)
#undef NJ_AVX2
#undef NJ_WIDTH
}  // namespace avx512
#pragma GCC pop_options
#endif

// The names of the levels, as NORMJAX_CPU_LEVEL and NormjaxCpuLevel spell them.
constexpr const char* kLevelNames[kNumLevels] = {"baseline", "avx2", "avx512"};

// The dispatch table: the loops of each level this build has, indexed by Level (a build for
// another architecture has the baseline only).
constexpr Kernels kDispatch[] = {
    baseline::MakeKernels(),
#if defined(__x86_64__)
    avx2::MakeKernels(),
    avx512::MakeKernels(),
#endif
};
#if defined(__x86_64__)
static_assert(sizeof(kDispatch) / sizeof(kDispatch[0]) == kNumLevels, "a row per level");
#endif

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

}  // namespace

Level ActiveLevel() {
  static const Level level = std::min(SupportedLevel(), CapLevel());
  return level;
}

const Kernels& Active() { return kDispatch[ActiveLevel()]; }

}  // namespace normjax_cpu

// The instruction-set level the kernels run at ("baseline", "avx2" or "avx512"), picked at
// the first call; the loader (normjax/_src/kernels/cpu/__init__.py) exposes it as CPU_LEVEL.
extern "C" __attribute__((visibility("default"))) const char* NormjaxCpuLevel() {
  return normjax_cpu::kLevelNames[normjax_cpu::ActiveLevel()];
}
