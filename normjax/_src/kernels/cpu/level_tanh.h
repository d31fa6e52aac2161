// Dynamic tanh's backward loop of one instruction-set level: y = tanh(alpha * x) * scale + bias
// over rows [rows, n] with per-feature scale and bias and a scalar alpha.
//
// Part of the loops of one instruction-set level: included by level.h only (no include guard,
// no includes; see level.h).

// Rows [begin, end) of the backward (see TanhBackward in handlers_rows.cc), in one pass over x,
// g and (where the forward saved it, a.t not null) t: with t = tanh(alpha * x) (the forward's
// float32 one, else recomputed) and s = 1 - t^2,
//   dx = g * scale * alpha * s, dalpha = sum of g * scale * x * s,
//   dscale = sum over rows of g * t, dbias = sum over rows of g.
// dalpha's sums are blocked per row (float32 lanes within a block, double across blocks),
// added in row order into acc[2n]; the per-feature sums go to acc[0, n) and acc[n, 2n)
// (FeaturePartials).
template <typename T>
void TanhBackwardChunk(const TanhArgs& a, int64_t begin, int64_t end, double* acc) {
  const int64_t n = a.n;
  const T* xp = static_cast<const T*>(a.x);
  const T* gp = static_cast<const T*>(a.g);
  T* dxp = static_cast<T*>(a.dx);
  const float* __restrict__ w = a.scale;
  const float alpha = a.alpha;
  FeaturePartials partial(2 * n, acc);
  float* __restrict__ ds = partial.data();
  float* __restrict__ db = ds + n;
  // One row, with t read (saved: std::true_type) or recomputed (std::false_type).
  auto row = [&](int64_t r, auto saved) {
    const T* __restrict__ x = xp + r * n;
    const float* __restrict__ tr = saved ? a.t + r * n : nullptr;
    const T* __restrict__ g = gp + r * n;
    T* __restrict__ dx = dxp + r * n;
    double sum[1][1] = {};
    BlockedSumsRows<1, 1>(n, [&](int, int64_t i, auto* out) {
      using V = std::remove_pointer_t<decltype(out)>;
      const V xi = Get<V>(x, i), gi = Get<V>(g, i);
      V t;
      if constexpr (decltype(saved)::value) {
        t = Get<V>(tr, i);
      } else {
        t = Tanh(alpha * xi);
      }
      const V s = 1.f - t * t;
      const V c = gi * Get<V>(w, i);
      Put(dx, i, (c * alpha) * s);
      AddTo(ds, i, gi * t);
      AddTo(db, i, gi);
      out[0] = (c * xi) * s;
    }, sum);
    acc[2 * n] += sum[0][0];
    partial.RowDone();
  };
  for (int64_t r = begin; r < end; ++r) {
    if (a.t != nullptr) {
      row(r, std::true_type{});
    } else {
      row(r, std::false_type{});
    }
  }
}
