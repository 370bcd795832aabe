// The row helpers the vocabulary-reading native ops stand on (csrc/token_logprobs.cpp, and through
// it csrc/ppo_loss.cpp's Python side): the online log-sum-exp over a row of logits and the
// softmax-gradient pass that recomputes it, in ATen's Vectorized<float> (AVX2 / AVX-512 chosen at
// build time by -DCPU_CAPABILITY). The C++ mirror of kernels/_rows.py.
// Both take a TRUNC template flag (top-k / top-p): the logits below the row's threshold tau
// (csrc/truncation.cpp) are read as -inf. The plain instantiation is the untruncated code as it was.
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

// exp(d) for d <= 0 (a logit less the row max, over T), with ATen's exp_u20 (a degree-5 polynomial
// after a power-of-two split; relative error ~1e-6, 20 ulp) instead of exp (Sleef, 1 ulp): on a CPU
// with fast memory the vocabulary-wide exp is the bound of the two passes, and float32 logits,
// their log-sum-exp and the float64 references the kernels are tested against already differ by
// more. -inf -> 0 as exp; NaN -> NaN (exp_u20's clamps would turn it into a finite value).
inline Vec exp_row(const Vec& d) {
  const Vec e = d.exp_u20();
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(d, d, _CMP_UNORD_Q), e, d);
#else
  return Vec::blendv(e, d, d != d);
#endif
}

// exp(d) * d with 0 where exp(d) = 0 (d = -inf would give 0 * -inf = NaN).
inline Vec exp_times(const Vec& e, const Vec& d) {
  return Vec::blendv(Vec(0.f), e * d, e > Vec(0.f));
}

// Bit i set where lane i of a Vec comparison (all-ones or zero per lane) is true.
inline uint32_t lanes(const Vec& cmp) {
  return ~static_cast<uint32_t>(cmp.zero_mask()) & ((1u << W) - 1);
}

// Bit i set where x_i < y_i, resp. x_i >= y_i (both false for NaN). AVX-512 reads the comparison's
// mask register straight; Vec's comparisons would widen it to a vector and lanes() narrow it back.
inline uint32_t lt_bits(const Vec& x, const Vec& y) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_cmp_ps_mask(x, y, _CMP_LT_OQ);
#else
  return lanes(x < y);
#endif
}

inline uint32_t ge_bits(const Vec& x, const Vec& y) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_cmp_ps_mask(x, y, _CMP_GE_OQ);
#else
  return lanes(x >= y);
#endif
}

// With TRUNC, a logit below tau is out of the sampler's kept set: -inf. NaN stays NaN (NaN in, NaN
// out): x < tau is false for NaN, so this is the blend on (x >= tau) | isnan(x) in one comparison.
// AVX-512: straight on the comparison's mask register (Vec's < and blendv go through a vector mask).
template <bool TRUNC>
inline Vec truncate(const Vec& x, const Vec& tau) {
  if constexpr (TRUNC) {
#if defined(CPU_CAPABILITY_AVX512)
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, tau, _CMP_LT_OQ), x, Vec(NEG_INF));
#else
    return Vec::blendv(x, Vec(NEG_INF), x < tau);
#endif
  } else {
    return x;
  }
}

struct RowStats {
  float m, log_s, entropy;
};

// One pass over a row of V logits in chunks of CHUNK that stay in L1: the chunk's max first (an L1
// re-read, not a memory one), then the running (m, s, t) re-based once per chunk, then one exp per
// logit:  d = (x - m) / T,  s = sum exp(d),  t = sum exp(d) d,  entropy = log s - t / s.
// With TRUNC, over the logits >= tau only.
template <bool TRUNC = false, typename scalar_t>
RowStats row_logsumexp(const scalar_t* x, int64_t V, float inv_t, bool entropy, float tau = NEG_INF) {
  float m = NEG_INF, s = 0.f, t = 0.f;
  const Vec vtau(tau);
  for (int64_t c0 = 0; c0 < V; c0 += CHUNK) {
    const int64_t c1 = std::min(V, c0 + CHUNK);
    Vec vmax(NEG_INF);
    for (int64_t i = c0; i < c1; i += W) vmax = at::vec::maximum(vmax, load(x + i, std::min(W, c1 - i)));
    const float cmax = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmax);
    if constexpr (TRUNC) {
      // The kept logits' max is the chunk's own max when that is kept (or NaN); else the whole
      // chunk is dropped and would add exp(-inf) = 0 to s and t: skip it.
      if (cmax < tau) continue;
    }
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
      const Vec d = (truncate<TRUNC>(load(x + i, std::min(W, c1 - i)), vtau) - vm) * vinv;
      const Vec e = exp_row(d);
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
// With TRUNC the kept set is held fixed (it is piecewise constant in the logits): a logit below tau
// reads as -inf, so p = 0 and its gradient is exactly +0 (exp_times keeps 0 * -inf out), and the
// one-hot term is added only where the label itself is kept.
template <bool TRUNC = false, typename scalar_t>
void row_grad(const scalar_t* x, scalar_t* g, int64_t V, int64_t label, float m, float log_s,
              float h, float g_lp, float g_h, float inv_t, bool has_g_h, float tau = NEG_INF) {
  if constexpr (TRUNC) {
    if (label >= 0 && label < V && static_cast<float>(x[label]) < tau) label = -1;  // before g is written
  }
  // Reads each vector of x before writing the same vector of g, so g may alias x (in place).
  const Vec vm(m), vinv(inv_t), vlogs(log_s), vh(h), vglp(g_lp), vgh(g_h), vtau(tau);
  for (int64_t i = 0; i < V; i += W) {
    const int64_t n = std::min(W, V - i);
    const Vec xv = load(x + i, n);
    if constexpr (TRUNC) {
      if (lt_bits(xv, vtau) == (1u << W) - 1) {  // all dropped (padding lanes are -inf): p = 0, grad +0
        store(g + i, Vec(0.f), n);
        continue;
      }
    }
    const Vec logp = (truncate<TRUNC>(xv, vtau) - vm) * vinv - vlogs;
    const Vec p = exp_row(logp);
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
