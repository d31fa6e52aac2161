// The hot loops of normjax's CPU kernels, compiled once per instruction-set level, and the
// level's row of the dispatch table (MakeKernels).
//
// levels.cc includes this file several times, each time inside its own namespace and (on
// x86-64) inside a `#pragma GCC target` region: the baseline every x86-64 CPU runs (SSE2),
// AVX2+FMA and AVX-512. Neither it nor its parts (level_vectors.h, level_rows.h,
// level_columns.h) has an include guard or includes a standard header: every standard header
// is included by levels.cc before the first region, so that no library code is compiled for
// a wider target. Before including it, levels.cc defines
//   NJ_WIDTH  floats per vector register (4, 8 or 16), and
//   NJ_AVX2   1 where AVX2 intrinsics may be used in this region (0 otherwise),
// and the shared types (Kernels, ForwardArgs, BackwardArgs, RunningMoments, kLanes, kBlock)
// are declared outside the regions, in kernels.h.
//
// Every level computes the same floating-point operations in the same order: sums run over
// kLanes = 16 lanes (element i of a block in lane i % 16, as 4, 2 or 1 registers), the lanes
// are added in order, and the library is compiled with -ffp-contract=off (no FMA
// contraction). So the results are bit-identical whichever level runs
// (tests/test_kernels_cpu_portability.py).
//
// Accuracy: statistics are accumulated in blocks of at most kBlock elements (cache resident):
// per block the sums of d = x - K and d^2 about a float32 shift K near the mean (a row's
// first block: the mean of its first 4 * kLanes values; later blocks: the mean so far), summed
// again about the block's own float32 mean (a second pass over the cached block) wherever the
// shift was too far for them (they cancel, or are not finite), and the block's (count, mean,
// M2) is merged into the row's with Chan's formula in double. Float32 error grows over at
// most kBlock / kLanes = 64 additions per lane, whatever the row length and whatever the
// data order.

#include "level_vectors.h"   // NOLINT(build/include)
#include "level_rows.h"      // NOLINT(build/include)
#include "level_columns.h"   // NOLINT(build/include)
#include "level_gated.h"     // NOLINT(build/include)
#include "level_tanh.h"      // NOLINT(build/include)

// This level's row of the dispatch table (levels.cc).
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
  k.add_forward_mixed = &AddForwardChunk<uint16_t, float>;
  k.add_backward_mixed = &BackwardChunk<float, uint16_t>;
  k.gated_forward[0] = &GatedForwardChunk<float>;
  k.gated_forward[1] = &GatedForwardChunk<uint16_t>;
  k.gated_backward[0] = &GatedBackwardChunk<float>;
  k.gated_backward[1] = &GatedBackwardChunk<uint16_t>;
  k.tanh_backward[0] = &TanhBackwardChunk<float>;
  k.tanh_backward[1] = &TanhBackwardChunk<uint16_t>;
  return k;
}
