// Threads and errors (threads.h): the chunks, the pool, exceptions into ffi::Error.

#include "threads.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <vector>

#include "kernels.h"

namespace normjax_cpu {
namespace {

constexpr int64_t kMinElementsPerTask = 1 << 15;  // smaller inputs run on the calling thread
constexpr int64_t kMaxChunks = 64;

// What the calling thread and the pool tasks of one ParallelChunks call share.
struct Shared {
  std::atomic<int64_t> next_chunk{0};
  std::mutex mu;
  std::condition_variable done;
  int64_t active = 0;
  bool closed = false;
  std::exception_ptr error;
};

}  // namespace

int64_t NumChunks(int64_t rows, int64_t row_elements) {
  const int64_t by_size = rows * row_elements / kMinElementsPerTask;
  return std::max<int64_t>(1, std::min<int64_t>({by_size, rows, kMaxChunks}));
}

ExampleRanges::ExampleRanges(int64_t batch, int64_t positions_, int64_t position_elements)
    : positions(positions_),
      per_example(std::max<int64_t>(
          1, NumChunks(batch * positions_, position_elements) / std::max<int64_t>(1, batch))),
      span((positions_ + per_example - 1) / per_example),
      chunks(batch * per_example) {}

void ParallelChunks(ffi::ThreadPool& pool, int64_t rows, int64_t chunks,
                    FunctionRef<void(int64_t begin, int64_t end, int64_t chunk)> body) {
  const int64_t chunk_rows = (rows + chunks - 1) / chunks;
  auto run_chunk = [&body, rows, chunk_rows](int64_t c) {
    const int64_t begin = c * chunk_rows;
    if (begin < rows) body(begin, std::min(rows, begin + chunk_rows), c);
  };
  // Every pool thread is offered a task (not one fewer, as if the caller were one of them):
  // right after an XLA fusion the pool's workers are still busy on their cores, and with
  // num_threads - 1 tasks the kernel often ran on the caller alone (RMS norm 8x512x1024:
  // 0.95 ms after itself, 1.5 ms after any XLA fusion; docs/performance-history.md).
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

void GroupSums(ffi::ThreadPool& pool, int64_t groups, int64_t pieces, int64_t width,
               int64_t chunks, FunctionRef<void(int64_t group, int64_t piece, double* acc)> body,
               FunctionRef<void(int64_t group, const double* sums)> done) {
  if (groups <= 0) return;
  if (pieces == 1) {  // each group's one piece: its sums
    const int64_t group_chunks = std::min(groups, chunks);
    ParallelChunks(pool, groups, group_chunks, [&](int64_t begin, int64_t end, int64_t) {
      std::vector<double> sums(width);
      for (int64_t g = begin; g < end; ++g) {
        std::fill(sums.begin(), sums.end(), 0.0);
        body(g, 0, sums.data());
        done(g, sums.data());
      }
    });
    return;
  }
  const int64_t per_call =
      std::max<int64_t>(1, kMaxAccumulators / std::max<int64_t>(1, pieces * width));
  std::vector<double> acc, sums(width);
  for (int64_t first = 0; first < groups; first += per_call) {
    const int64_t count = std::min(per_call, groups - first), all = count * pieces;
    acc.assign(static_cast<size_t>(all * width), 0.0);
    ParallelChunks(pool, all, std::min(all, chunks), [&](int64_t begin, int64_t end, int64_t) {
      for (int64_t c = begin; c < end; ++c) {
        body(first + c / pieces, c % pieces, acc.data() + c * width);
      }
    });
    for (int64_t g = 0; g < count; ++g) {
      std::fill(sums.begin(), sums.end(), 0.0);
      AddInOrder(acc.data() + g * pieces * width, pieces, width, width, sums.data());
      done(first + g, sums.data());
    }
  }
}

ffi::Error Guarded(const char* kernel, FunctionRef<ffi::Error()> f) {
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

}  // namespace normjax_cpu
