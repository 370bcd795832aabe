// Native CPU kernels for fastppo.kernels.token_logprobs and ppo_loss.
//
// Same math as kernels/token_logprobs.py, one row (token) at a time, rows spread over OpenMP threads,
// the vocabulary loop vectorised with ATen's Vectorized<float> (AVX2 / AVX-512 chosen at build time).
// Byte floor: forward reads N*V*b once; backward reads N*V*b once and writes N*V*b once.
//
// Forward, per row, in chunks of CHUNK logits that stay in L1: the chunk's max first (an L1 re-read,
// not a memory one), then the running (m, s, t) re-based once per chunk, then one exp per logit:
//   d = (x - m) / T,  s = sum exp(d),  t = sum exp(d) d,  log p_label = d_label - log s,
//   entropy = log s - t / s.
// One exp per logit instead of two (a per-lane online max would need a rescaling exp per vector).
// Backward, per row: log p = (x - m) / T - log s,  p = exp(log p),
//   grad = (g_lp (1[v == label] - p) - g_h p (log p + H)) / T.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <sys/mman.h>

#include <cmath>
#include <cstdint>
#include <limits>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t W = Vec::size();
constexpr int64_t CHUNK = 1024;  // logits per chunk: 4 KB of float32, comfortably in L1
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

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

template <typename scalar_t>
RowStats row_logsumexp(const scalar_t* x, int64_t V, float inv_t, bool entropy) {
  float m = NEG_INF, s = 0.f, t = 0.f;
  for (int64_t c0 = 0; c0 < V; c0 += CHUNK) {
    const int64_t c1 = std::min(V, c0 + CHUNK);
    Vec vmax(NEG_INF);
    for (int64_t i = c0; i < c1; i += W) vmax = at::vec::maximum(vmax, load(x + i, std::min(W, c1 - i)));
    const float cmax = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmax);
    const float m_new = std::max(m, cmax);
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

template <typename F>
void dispatch(const torch::Tensor& logits, F&& f) {
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

}  // namespace

// logits: (outer, inner, V) view with a contiguous last dim; labels: (N,) int64.
// Returns (logprobs, entropy, m, log_s), float32 (N,).
std::vector<torch::Tensor> forward(torch::Tensor logits, torch::Tensor labels, double temperature,
                                   int64_t ignore_index, bool return_entropy) {
  TORCH_CHECK(logits.dim() == 3 && logits.stride(2) == 1, "logits must be (outer, inner, V), unit stride");
  const int64_t outer = logits.size(0), inner = logits.size(1), V = logits.size(2), N = outer * inner;
  const int64_t so = logits.stride(0), si = logits.stride(1);
  auto opts = logits.options().dtype(torch::kFloat32);
  auto lp = torch::empty({N}, opts), ent = torch::empty({N}, opts);
  auto mx = torch::empty({N}, opts), ls = torch::empty({N}, opts);
  const float inv_t = static_cast<float>(1.0 / temperature);
  const int64_t* y = labels.data_ptr<int64_t>();
  float *plp = lp.data_ptr<float>(), *pent = ent.data_ptr<float>();
  float *pm = mx.data_ptr<float>(), *pls = ls.data_ptr<float>();
  dispatch(logits, [&](auto zero) {
    using scalar_t = decltype(zero);
    const scalar_t* base = logits.data_ptr<scalar_t>();
    at::parallel_for(0, N, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* x = base + (r / inner) * so + (r % inner) * si;
        const int64_t label = y[r];
        if (label == ignore_index) {
          plp[r] = pent[r] = pm[r] = pls[r] = 0.f;
          continue;
        }
        const RowStats st = row_logsumexp(x, V, inv_t, return_entropy);
        const bool in_vocab = label >= 0 && label < V;
        plp[r] = in_vocab ? (static_cast<float>(x[label]) - st.m) * inv_t - st.log_s
                          : std::numeric_limits<float>::quiet_NaN();
        pent[r] = return_entropy ? st.entropy : 0.f;
        pm[r] = st.m;
        pls[r] = st.log_s;
      }
    });
  });
  return {lp, ent, mx, ls};
}

// Ask for transparent huge pages on a fresh buffer before its first write: where THP is in "madvise"
// mode, paging in a new (N, V) gradient otherwise costs one fault per 4 KB page (tens of ms at
// N*V = 131M floats). Advisory only: nothing changes if the kernel declines.
void advise_huge_pages(void* ptr, int64_t bytes) {
  constexpr uintptr_t huge = 2u << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(ptr) + huge - 1) & ~(huge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(ptr) + bytes) & ~(huge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
}

// Writes the gradient into `grad` ((outer, inner, V) with a unit last stride; may alias logits).
void backward(torch::Tensor logits, torch::Tensor labels, torch::Tensor mx, torch::Tensor ls,
              torch::Tensor ent, torch::Tensor g_lp, torch::Tensor g_h, torch::Tensor grad,
              double temperature, int64_t ignore_index, bool has_g_h) {
  const int64_t inner = logits.size(1), V = logits.size(2), N = logits.size(0) * inner;
  const int64_t so = logits.stride(0), si = logits.stride(1);
  const int64_t gso = grad.stride(0), gsi = grad.stride(1);
  const float inv_t = static_cast<float>(1.0 / temperature);
  if (grad.data_ptr() != logits.data_ptr() && grad.is_contiguous()) {
    advise_huge_pages(grad.data_ptr(), grad.numel() * grad.element_size());
  }
  const int64_t* y = labels.data_ptr<int64_t>();
  const float *pm = mx.data_ptr<float>(), *pls = ls.data_ptr<float>(), *pent = ent.data_ptr<float>();
  const float *pglp = g_lp.data_ptr<float>(), *pgh = has_g_h ? g_h.data_ptr<float>() : nullptr;
  dispatch(logits, [&](auto zero) {
    using scalar_t = decltype(zero);
    const scalar_t* base = logits.data_ptr<scalar_t>();
    scalar_t* gbase = grad.data_ptr<scalar_t>();
    at::parallel_for(0, N, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t o = r / inner, i = r % inner;
        scalar_t* g = gbase + o * gso + i * gsi;
        if (y[r] == ignore_index) {
          std::fill(g, g + V, static_cast<scalar_t>(0.f));
          continue;
        }
        row_grad(base + o * so + i * si, g, V, y[r], pm[r], pls[r], pent[r], pglp[r],
                 has_g_h ? pgh[r] : 0.f, inv_t, has_g_h);
      }
    });
  });
}

// The per-token PPO terms, the same as kernels/ppo_loss.py's forward kernel after its vocabulary loop.
// stats: (11, N) float32 with rows LP, ENTROPY (filled by the caller from forward()), then written
// here: PG, VF, CLIPPED, VCLIPPED, LOSS, DLP (w * d loss / d lp), DV (w * d loss / d V). The clamps
// pass gradient inside their closed range (as torch.clamp); the branch max/min does not take passes
// none. Invalid tokens get zeros.
void ppo_terms(torch::Tensor stats, torch::Tensor mask, torch::Tensor weights, torch::Tensor old_lp,
               torch::Tensor adv, c10::optional<torch::Tensor> values,
               c10::optional<torch::Tensor> old_values, c10::optional<torch::Tensor> returns,
               c10::optional<torch::Tensor> ref_lp, bool has_clip, double clip_low, double clip_high,
               bool has_dual_clip, double dual_clip, bool has_value_clip, double value_clip,
               double vf_coef, double entropy_coef, double kl_coef, int64_t kl_estimator) {
  enum { LP, ENT, PG, VF, CLIPPED, VCLIPPED, LOSS, DLP, DV };
  const int64_t N = stats.size(1);
  float* st = stats.data_ptr<float>();
  auto row = [&](int r) { return st + r * N; };
  const uint8_t* mk = mask.data_ptr<uint8_t>();
  const float *w = weights.data_ptr<float>(), *olp = old_lp.data_ptr<float>(), *a = adv.data_ptr<float>();
  const float* v = values ? values->data_ptr<float>() : nullptr;
  const float* ov = old_values ? old_values->data_ptr<float>() : nullptr;
  const float* ret = returns ? returns->data_ptr<float>() : nullptr;
  const float* ref = ref_lp ? ref_lp->data_ptr<float>() : nullptr;
  at::parallel_for(0, N, 1024, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      if (!mk[t]) {
        for (int r = PG; r <= DV; ++r) row(r)[t] = 0.f;
        continue;
      }
      const float lp = row(LP)[t], A = a[t];
      const float log_ratio = lp - olp[t];
      const float ratio = std::exp(std::min(std::max(log_ratio, -20.f), 20.f));
      const float ratio_grad = (log_ratio >= -20.f && log_ratio <= 20.f) ? ratio : 0.f;
      float pg = -A * ratio, dpg = -A * ratio_grad, clipped = 0.f;
      if (has_clip) {
        const float pg_clip = -A * std::min(std::max(ratio, float(clip_low)), float(clip_high));
        if (pg_clip > pg) {  // only outside [clip_low, clip_high]: zero gradient there
          pg = pg_clip;
          dpg = 0.f;
          clipped = 1.f;
        }
      }
      if (has_dual_clip && A < 0.f && -A * float(dual_clip) < pg) {
        pg = -A * float(dual_clip);
        dpg = 0.f;
      }
      float loss = pg - float(entropy_coef) * row(ENT)[t], dlp = dpg;
      if (kl_estimator > 0) {
        const float x = lp - ref[t];
        const float k = kl_estimator == 1 ? x : kl_estimator == 2 ? 0.5f * x * x : std::exp(-x) - 1.f + x;
        const float dk = kl_estimator == 1 ? 1.f : kl_estimator == 2 ? x : 1.f - std::exp(-x);
        loss += float(kl_coef) * k;
        dlp += float(kl_coef) * dk;
      }
      float vf = 0.f, dv = 0.f, vclipped = 0.f;
      if (v) {
        vf = (v[t] - ret[t]) * (v[t] - ret[t]);
        dv = v[t] - ret[t];
        if (has_value_clip) {
          const float vc = std::min(std::max(v[t], ov[t] - float(value_clip)), ov[t] + float(value_clip));
          const float vf_clip = (vc - ret[t]) * (vc - ret[t]);
          if (vf_clip > vf) {  // only when V is outside old_V +- value_clip: zero gradient there
            vf = vf_clip;
            dv = 0.f;
            vclipped = 1.f;
          }
        }
        vf *= 0.5f;
        loss += float(vf_coef) * vf;
        dv *= float(vf_coef);
      }
      row(PG)[t] = pg;
      row(VF)[t] = vf;
      row(CLIPPED)[t] = clipped;
      row(VCLIPPED)[t] = vclipped;
      row(LOSS)[t] = loss;
      row(DLP)[t] = w[t] * dlp;
      row(DV)[t] = w[t] * dv;
    }
  });
}

// GAE over each row's valid positions (kernels/gae.py has the math): one thread per row, right to
// left. rewards, values: (B, T) float32; mask: (B, T) uint8. Returns (advantages, returns), float32.
std::vector<torch::Tensor> gae_forward(torch::Tensor rewards, torch::Tensor values, torch::Tensor mask,
                                       double gamma, double lam) {
  const int64_t B = rewards.size(0), T = rewards.size(1);
  auto adv = torch::zeros_like(rewards), ret = torch::zeros_like(rewards);
  const float *r = rewards.data_ptr<float>(), *v = values.data_ptr<float>();
  const uint8_t* mk = mask.data_ptr<uint8_t>();
  float *pa = adv.data_ptr<float>(), *pr = ret.data_ptr<float>();
  const float g = float(gamma), gl = float(gamma * lam);
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      float next_value = 0.f, next_adv = 0.f;
      for (int64_t t = T - 1; t >= 0; --t) {
        const int64_t i = b * T + t;
        if (!mk[i]) continue;  // holes are skipped, not read as zeros
        next_adv = r[i] + g * next_value - v[i] + gl * next_adv;
        next_value = v[i];
        pa[i] = next_adv;
        pr[i] = next_adv + v[i];
      }
    }
  });
  return {adv, ret};
}

// Its backward: with u = g_A + g_R, g_delta_j = u_j + gamma lam g_delta_prev(j) (left to right),
// g_r = g_delta, g_V_j = -g_delta_j + gamma g_delta_prev(j) + g_R_j, all over valid positions.
std::vector<torch::Tensor> gae_backward(torch::Tensor grad_adv, torch::Tensor grad_ret,
                                        torch::Tensor mask, double gamma, double lam) {
  const int64_t B = grad_adv.size(0), T = grad_adv.size(1);
  auto g_r = torch::zeros_like(grad_adv), g_v = torch::zeros_like(grad_adv);
  const float *ga = grad_adv.data_ptr<float>(), *gr = grad_ret.data_ptr<float>();
  const uint8_t* mk = mask.data_ptr<uint8_t>();
  float *pgr = g_r.data_ptr<float>(), *pgv = g_v.data_ptr<float>();
  const float g = float(gamma), gl = float(gamma * lam);
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      float prev_delta = 0.f;
      for (int64_t t = 0; t < T; ++t) {
        const int64_t i = b * T + t;
        if (!mk[i]) continue;
        const float g_delta = ga[i] + gr[i] + gl * prev_delta;
        pgr[i] = g_delta;
        pgv[i] = -g_delta + g * prev_delta + gr[i];
        prev_delta = g_delta;
      }
    }
  });
  return {g_r, g_v};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gae_forward", &gae_forward, "GAE forward (CPU)");
  m.def("gae_backward", &gae_backward, "GAE backward (CPU)");
  m.def("token_logprobs_forward", &forward, "token_logprobs forward (CPU)");
  m.def("token_logprobs_backward", &backward, "token_logprobs backward (CPU)");
  m.def("ppo_loss_terms", &ppo_terms, "ppo_loss per-token terms (CPU)");
}
