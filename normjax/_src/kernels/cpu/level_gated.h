// The gated RMS norm's loops of one instruction-set level (Mamba-2's RMSNormGated): the
// forward and the backward of y = rms_norm(x * silu(z)) * scale (`before` false) or
// y = rms_norm(x) * scale * silu(z) (`before` true), silu(z) = z * sigmoid(z) in float32.
//
// Part of the loops of one instruction-set level: included by level.h only (no include guard,
// no includes; see level.h).

// Rows [begin, end) of the gated forward (see RowsGatedForward in handlers_rows.cc; row r
// scaled by scale row r % groups, see GatedArgs): per
// group of kRowGroup rows, the gated input u = x * silu(z) in float32 in a row buffer (gate
// first) or x itself (gate after), its mean square (RowMomentsRows, uncentered: the RMS
// kernel's sums), then each row's output.
template <typename T>
void GatedForwardChunk(const GatedArgs& a, int64_t begin, int64_t end) {
  const int64_t n = a.n;
  const T* xp = static_cast<const T*>(a.x);
  const T* zp = static_cast<const T*>(a.z);
  T* yp = static_cast<T*>(a.out);
  std::vector<float> buffer(a.before ? 0 : kRowGroup * n);
  RowGroups(begin, end, [&](auto rows, int64_t r0) {
    constexpr int R = decltype(rows)::value;
    RunningMoments m[R];
    if (a.before) {
      const T* xs[R];
      for (int q = 0; q < R; ++q) xs[q] = xp + (r0 + q) * n;
      RowMomentsRows<R>(xs, n, false, m);
    } else {
      const float* us[R];
      for (int q = 0; q < R; ++q) {
        const T* __restrict__ x = xp + (r0 + q) * n;
        const T* __restrict__ z = zp + (r0 + q) * n;
        float* u = buffer.data() + q * n;
        MapRow(u, n, [&](int64_t i, auto type) {
          using V = decltype(type);
          const V zi = Get<V>(z, i);
          return Get<V>(x, i) * (zi * Sigmoid(zi));
        });
        us[q] = u;
      }
      RowMomentsRows<R>(us, n, false, m);
    }
    for (int q = 0; q < R; ++q) {
      const int64_t r = r0 + q;
      float s, off, v;
      m[q].Finish(&s, &off, &v);
      const float rstd = RstdOf(v, a.eps);
      const T* __restrict__ x = xp + r * n;
      const T* __restrict__ z = zp + r * n;
      const float* __restrict__ g = a.scale + (r % a.groups) * n;
      if (a.before) {
        MapRow(yp + r * n, n, [&](int64_t i, auto type) {
          using V = decltype(type);
          const V zi = Get<V>(z, i);
          return (Get<V>(x, i) * (rstd * Get<V>(g, i))) * (zi * Sigmoid(zi));
        });
      } else {
        const float* __restrict__ u = buffer.data() + q * n;
        MapRow(yp + r * n, n, [&](int64_t i, auto type) {
          using V = decltype(type);
          return Get<V>(u, i) * (rstd * Get<V>(g, i));
        });
      }
    }
  });
}

// Rows [begin, end) of the gated backward (see RowsGatedBackward in handlers_rows.cc), with
// c = ct * scale, s = sigmoid(z) (kept in a row buffer), gate = z * s and
// gate' = s * (1 + z * (1 - s)):
//   gate first (u = x * gate, h = u * rstd): du = rstd * (c - h * mean(c * h)),
//     dx = du * gate, dz = du * x * gate', dscale += ct * h;
//   gate after (h = x * rstd, c' = c * gate): dx = rstd * (c' - h * mean(c' * h)),
//     dz = c * h * gate', dscale += ct * gate * h.
// rstd is recomputed from the same sums as the forward's (the same bits), in the pass that
// sums c * u; dscale's per-feature sums go to acc[0, groups * n) (FeaturePartials), row r's
// to scale row r % groups's.
template <typename T>
void GatedBackwardChunk(const GatedArgs& a, int64_t begin, int64_t end, double* acc) {
  const int64_t n = a.n;
  const T* xp = static_cast<const T*>(a.x);
  const T* zp = static_cast<const T*>(a.z);
  const T* cp = static_cast<const T*>(a.ct);
  T* dxp = static_cast<T*>(a.out);
  T* dzp = static_cast<T*>(a.dz);
  const double inv_n = n > 0 ? 1.0 / static_cast<double>(n) : 0.0;
  const bool before = a.before;
  std::vector<float> buffer(kRowGroup * n);
  FeaturePartials partial(a.groups * n, acc);
  RowGroups(begin, end, [&](auto rows, int64_t r0) {
    constexpr int R = decltype(rows)::value;
    const T* xs[R];
    const T* zs[R];
    const T* cs[R];
    const float* ss[R];
    const float* gs[R];
    for (int q = 0; q < R; ++q) {
      gs[q] = a.scale + ((r0 + q) % a.groups) * n;
      xs[q] = xp + (r0 + q) * n;
      zs[q] = zp + (r0 + q) * n;
      cs[q] = cp + (r0 + q) * n;
      float* sig = buffer.data() + q * n;
      MapRow(sig, n, [&](int64_t i, auto type) {
        using V = decltype(type);
        return Sigmoid(Get<V>(zs[q], i));
      });
      ss[q] = sig;
    }
    double t[R][2] = {};
    BlockedSumsRows<R, 2>(n, [&](int q, int64_t i, auto* out) {
      using V = std::remove_pointer_t<decltype(out)>;
      const V x = Get<V>(xs[q], i);
      const V gate = Get<V>(zs[q], i) * Get<V>(ss[q], i);
      const V c = Get<V>(cs[q], i) * Get<V>(gs[q], i);
      if (before) {
        out[0] = x * x;
        out[1] = (c * gate) * x;
      } else {
        const V u = x * gate;
        out[0] = u * u;
        out[1] = c * u;
      }
    }, t);
    for (int q = 0; q < R; ++q) {
      const int64_t r = r0 + q;
      const T* __restrict__ x = xs[q];
      const T* __restrict__ z = zs[q];
      const T* __restrict__ ct = cs[q];
      const float* __restrict__ sig = ss[q];
      const float* __restrict__ gamma = gs[q];
      float* __restrict__ ds = partial.data() + (r % a.groups) * n;
      T* __restrict__ dz = dzp + r * n;
      float s, off, v;
      RunningMoments{static_cast<double>(n), 0.0, t[q][0]}.Finish(&s, &off, &v);
      const float rstd = RstdOf(v, a.eps);
      const float mean_ch = static_cast<float>(t[q][1] * inv_n * static_cast<double>(rstd));
      MapRow(dxp + r * n, n, [&](int64_t j, auto type) {
        using V = decltype(type);
        const V xj = Get<V>(x, j), zj = Get<V>(z, j), sj = Get<V>(sig, j);
        const V gate = zj * sj;
        const V slope = sj * (1.f + zj * (1.f - sj));
        const V cj = Get<V>(ct, j);
        const V c = cj * Get<V>(gamma, j);
        if (before) {
          const V h = xj * rstd;
          Put(dz, j, (c * h) * slope);
          AddTo(ds, j, (cj * gate) * h);
          return rstd * ((c * gate) - h * mean_ch);
        }
        const V h = (xj * gate) * rstd;
        const V du = rstd * (c - h * mean_ch);
        Put(dz, j, (du * xj) * slope);
        AddTo(ds, j, cj * h);
        return du * gate;
      });
      partial.RowDone();
    }
  });
}
