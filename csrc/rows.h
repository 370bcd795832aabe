// The row helpers the vocabulary-reading native ops stand on (csrc/token_logprobs.cpp, and through
// it csrc/ppo_loss.cpp's Python side): the online log-sum-exp over a row of logits and the
// softmax-gradient pass that recomputes it, in ATen's Vectorized<float> (AVX2 / AVX-512 chosen at
// build time by -DCPU_CAPABILITY). The C++ mirror of kernels/_rows.py.
//
// Everything here is a template or `inline`, in namespace fastppo, so every translation unit that
// includes it links cleanly; all of them are built with the same flags, so Vec is one type.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace fastppo {

using Vec = at::vec::Vectorized<float>;
inline constexpr int64_t W = Vec::size();
inline constexpr int64_t CHUNK = 1024;  // logits per chunk: 4 KB of float32, comfortably in L1
inline constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

// Load n <= W logits as float32; missing lanes are -inf (they then add exp(-inf) = 0).
template <typename scalar_t>
inline Vec load(const scalar_t* p, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return n == W ? Vec::loadu(p) : Vec::set(Vec(NEG_INF), Vec::loadu(p, n), n);
  } else {
    float buf[W];
    for (int64_t i = 0; i < W; ++i) buf[i] = i < n ? static_cast<float>(p[i]) : NEG_INF;
    if (n == W) {
      Vec out;
      at::vec::load_to_float<scalar_t>(p, out);
      return out;
    }
    return Vec::loadu(buf);
  }
}

template <typename scalar_t>
inline void store(scalar_t* p, const Vec& v, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    v.store(p, n);
  } else {
    auto half = at::vec::convert_from_float<scalar_t>(v, v);  // rounds to nearest even
    half.store(p, n);
  }
}

// exp(d) * d with 0 where exp(d) = 0 (d = -inf would give 0 * -inf = NaN).
inline Vec exp_times(const Vec& e, const Vec& d) {
  return Vec::blendv(Vec(0.f), e * d, e > Vec(0.f));
}

struct RowStats {
  float m, log_s, entropy;
};

// One pass over a row of V logits in chunks of CHUNK that stay in L1: the chunk's max first (an L1
// re-read, not a memory one), then the running (m, s, t) re-based once per chunk, then one exp per
// logit:  d = (x - m) / T,  s = sum exp(d),  t = sum exp(d) d,  entropy = log s - t / s.
template <typename scalar_t>
RowStats row_logsumexp(const scalar_t* x, int64_t V, float inv_t, bool entropy) {
  float m = NEG_INF, s = 0.f, t = 0.f;
  for (int64_t c0 = 0; c0 < V; c0 += CHUNK) {
    const int64_t c1 = std::min(V, c0 + CHUNK);
    Vec vmax(NEG_INF);
    for (int64_t i = c0; i < c1; i += W) vmax = at::vec::maximum(vmax, load(x + i, std::min(W, c1 - i)));
    const float cmax = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmax);
    // NaN in, NaN out: std::max would drop a NaN chunk max (every comparison with NaN is false)
    // and the row would come out finite, or +inf; a NaN max makes every later term NaN instead.
    const float m_new = std::isnan(cmax) || std::isnan(m) ? NAN : std::max(m, cmax);
    if (m_new == NEG_INF) continue;  // everything so far is banned: nothing to add
    // Re-base (s, t) from m to m_new: a = exp((m - m_new) / T), t' = a (t + s (m - m_new) / T).
    const float shift = s > 0.f ? (m - m_new) * inv_t : 0.f;
    const float a = std::exp(shift);
    t = a * (t + s * shift);
    s = a * s;
    m = m_new;
    Vec vs(0.f), vt(0.f);
    const Vec vm(m), vinv(inv_t);
    for (int64_t i = c0; i < c1; i += W) {
      const Vec d = (load(x + i, std::min(W, c1 - i)) - vm) * vinv;
      const Vec e = d.exp();
      vs = vs + e;
      if (entropy) vt = vt + exp_times(e, d);
    }
    s += at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, vs);
    if (entropy) t += at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, vt);
  }
  const float log_s = std::log(s);
  return {m, log_s, log_s - t / s};
}

// The softmax-gradient pass over one row, recomputing p from the stored (m, log s):
//   log p = (x - m) / T - log s,  p = exp(log p),
//   grad = (g_lp (1[v == label] - p) - g_h p (log p + H)) / T.
template <typename scalar_t>
void row_grad(const scalar_t* x, scalar_t* g, int64_t V, int64_t label, float m, float log_s,
              float h, float g_lp, float g_h, float inv_t, bool has_g_h) {
  // Reads each vector of x before writing the same vector of g, so g may alias x (in place).
  const Vec vm(m), vinv(inv_t), vlogs(log_s), vh(h), vglp(g_lp), vgh(g_h);
  for (int64_t i = 0; i < V; i += W) {
    const int64_t n = std::min(W, V - i);
    const Vec logp = (load(x + i, n) - vm) * vinv - vlogs;
    const Vec p = logp.exp();
    Vec grad = Vec(0.f) - vglp * p;
    if (has_g_h) grad = grad - vgh * exp_times(p, logp + vh);
    grad = grad * vinv;
    if (label >= i && label < i + n) {  // the one-hot term, added in float32 before rounding
      float lanes[W];
      grad.store(lanes);
      lanes[label - i] += g_lp * inv_t;
      grad = Vec::loadu(lanes);
    }
    store(g + i, grad, n);
  }
}

// Calls f(scalar_t{}) for the logits' dtype: float32, bfloat16 or float16.
template <typename F>
void dispatch(const at::Tensor& logits, F&& f) {
  if (logits.scalar_type() == at::kFloat) {
    f(float{});
  } else if (logits.scalar_type() == at::kBFloat16) {
    f(at::BFloat16{});
  } else if (logits.scalar_type() == at::kHalf) {
    f(at::Half{});
  } else {
    TORCH_CHECK(false, "native kernels take float32, bfloat16 or float16 logits; got ",
                logits.scalar_type());
  }
}

}  // namespace fastppo
