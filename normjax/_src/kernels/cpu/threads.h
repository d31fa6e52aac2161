// Threads and errors, shared by the handlers (handlers_rows.cc, handlers_moments.cc).
//
// Rows are split over XLA's intra-op thread pool in chunks fixed by the shape, so the results
// do not depend on the thread count. The calling thread works too, and a scheduled task that
// starts after the work is done returns at once, so a busy pool delays nothing and cannot
// deadlock. A C++ exception (std::bad_alloc, say) anywhere, pool tasks included, is returned
// to XLA as an ffi::Error, never thrown through the C boundary.

#ifndef NORMJAX_SRC_KERNELS_CPU_THREADS_H_
#define NORMJAX_SRC_KERNELS_CPU_THREADS_H_

#include <algorithm>
#include <cstdint>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace normjax_cpu __attribute__((visibility("hidden"))) {

namespace ffi = xla::ffi;

// Index of an XLA element type in the Kernels arrays (kernels.h): 0 float32, 1 bfloat16.
template <ffi::DataType T>
constexpr int DtypeIndex() {
  return T == ffi::BF16 ? 1 : 0;
}

// A reference to a callable (not owning it: it must outlive the call it is passed to).
template <typename Signature>
class FunctionRef;

template <typename R, typename... Args>
class FunctionRef<R(Args...)> {
 public:
  template <typename F>
  FunctionRef(const F& f)  // NOLINT(runtime/explicit): takes a lambda where one is passed
      : object_(&f), call_([](const void* object, Args... args) -> R {
          return (*static_cast<const F*>(object))(args...);
        }) {}

  R operator()(Args... args) const { return call_(object_, args...); }

 private:
  const void* object_;
  R (*call_)(const void*, Args...);
};

// Rows are cut into a fixed number of chunks that depends only on the shape (so sums over
// rows, added chunk by chunk in order, are the same whatever the thread count and timing).
int64_t NumChunks(int64_t rows, int64_t row_elements);

// Doubles of per-piece sums a backward may hold (GroupSums): they bound its pieces.
constexpr int64_t kMaxAccumulators = 1 << 21;

// The chunks of the channels-last kernels: each of `batch` examples' positions cut into
// `per_example` ranges fixed by the shape (about NumChunks of them over the whole input), so
// that per-range results added in order are the same whatever the thread count.
struct ExampleRanges {
  int64_t positions, per_example, span, chunks;

  ExampleRanges(int64_t batch, int64_t positions_, int64_t position_elements);

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
void ParallelChunks(ffi::ThreadPool& pool, int64_t rows, int64_t chunks,
                    FunctionRef<void(int64_t begin, int64_t end, int64_t chunk)> body);

// How many pieces of a group GroupSums takes for `wanted` (a shape's chunk count) with sums
// `width` doubles wide: as many as fit in kMaxAccumulators, at least one.
inline int64_t SumPieces(int64_t wanted, int64_t width) {
  return std::max<int64_t>(1, std::min(wanted, kMaxAccumulators / std::max<int64_t>(1, width)));
}

// Sums of `width` doubles per group, the same bits whatever the thread count: each of `groups`
// groups (the examples of per-example parameters, one for per-feature ones) is cut into
// `pieces` pieces fixed by the shape; `body(group, piece, acc)` adds its piece's sums into a
// zeroed buffer of its own, and the buffers of a group are added in piece order (in double)
// before `done(group, sums)` takes them. With one piece per group, groups are summed and
// handed to `done` within a chunk, on any of the pool's threads (each group once); else the
// pieces of as many groups as kMaxAccumulators holds (at least one) go to one call on the
// pool and `done` runs on the calling thread. The pieces of a call are dealt in at most
// `chunks` chunks (consecutive pieces together).
void GroupSums(ffi::ThreadPool& pool, int64_t groups, int64_t pieces, int64_t width,
               int64_t chunks, FunctionRef<void(int64_t group, int64_t piece, double* acc)> body,
               FunctionRef<void(int64_t group, const double* sums)> done);

// Runs `f`, turning any C++ exception into an ffi::Error that names `kernel`.
ffi::Error Guarded(const char* kernel, FunctionRef<ffi::Error()> f);

}  // namespace normjax_cpu

#endif  // NORMJAX_SRC_KERNELS_CPU_THREADS_H_
