// token_logprobs forward and backward on CPU: per token, log p(label) and (optionally) the entropy of
// softmax(logits / T), and the gradient of g_lp * log p + g_h * H with respect to the logits. The
// Python side is kernels/token_logprobs.py (TokenLogprobs' native backend); kernels/ppo_loss.py's
// native backend also runs its vocabulary pass and its backward through these two.
//
// Same math as kernels/token_logprobs.py, one row (token) at a time, rows spread over OpenMP threads,
// the vocabulary loop vectorised with the helpers of rows.h (the mirror of kernels/_rows.py).
// Byte floor: forward reads N*V*b once; backward reads N*V*b once and writes N*V*b once.
//
// Forward, per row (rows.h row_logsumexp): one exp per logit,
//   d = (x - m) / T,  s = sum exp(d),  t = sum exp(d) d,  log p_label = d_label - log s,
//   entropy = log s - t / s.
// One exp per logit instead of two (a per-lane online max would need a rescaling exp per vector).
// Backward, per row (rows.h row_grad): log p = (x - m) / T - log s,  p = exp(log p),
//   grad = (g_lp (1[v == label] - p) - g_h p (log p + H)) / T.
// Top-k / top-p: given the per-row thresholds tau of csrc/truncation.cpp, both passes read the logits
// below tau as -inf (the truncated distribution; a dropped label gets log p = -inf, a dropped logit a
// zero gradient). Without them (None) the plain instantiation runs, bit for bit the untruncated op.
#include "rows.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

namespace fastppo {

namespace {

// Ask for transparent huge pages on a fresh buffer before its first write: where THP is in "madvise"
// mode, paging in a new (N, V) gradient otherwise costs one fault per 4 KB page (tens of ms at
// N*V = 131M floats). Advisory only: nothing changes if the kernel declines.
void advise_huge_pages(void* ptr, int64_t bytes) {
  constexpr uintptr_t huge = 2u << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(ptr) + huge - 1) & ~(huge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(ptr) + bytes) & ~(huge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
}

// tau per row (float32, (N,)) from the optional thresholds, or nullptr: the plain op.
const float* threshold_data(const c10::optional<at::Tensor>& thresholds, int64_t N) {
  if (!thresholds.has_value()) return nullptr;
  const at::Tensor& t = *thresholds;
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 1 && t.size(0) == N && t.is_contiguous(),
              "thresholds must be float32 (N,) contiguous");
  return t.data_ptr<float>();
}

// Calls f(std::bool_constant<TRUNC>) with TRUNC = whether there are thresholds.
template <typename F>
void with_truncation(const float* tau, F&& f) {
  if (tau != nullptr) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

}  // namespace

// logits: (outer, inner, V) view with a contiguous last dim; labels: (N,) int64; thresholds: None,
// or float32 (N,) tau per row (logits < tau are dropped). Returns (logprobs, entropy, m, log_s),
// float32 (N,), of the (truncated) distribution.
std::vector<at::Tensor> token_logprobs_forward(at::Tensor logits, at::Tensor labels,
                                               double temperature, int64_t ignore_index,
                                               bool return_entropy,
                                               c10::optional<at::Tensor> thresholds) {
  TORCH_CHECK(logits.dim() == 3 && logits.stride(2) == 1, "logits must be (outer, inner, V), unit stride");
  const int64_t outer = logits.size(0), inner = logits.size(1), V = logits.size(2), N = outer * inner;
  const int64_t so = logits.stride(0), si = logits.stride(1);
  auto opts = logits.options().dtype(at::kFloat);
  auto lp = at::empty({N}, opts), ent = at::empty({N}, opts);
  auto mx = at::empty({N}, opts), ls = at::empty({N}, opts);
  const float inv_t = static_cast<float>(1.0 / temperature);
  const int64_t* y = labels.data_ptr<int64_t>();
  float *plp = lp.data_ptr<float>(), *pent = ent.data_ptr<float>();
  float *pm = mx.data_ptr<float>(), *pls = ls.data_ptr<float>();
  const float* ptau = threshold_data(thresholds, N);
  dispatch(logits, [&](auto zero) {
    using scalar_t = decltype(zero);
    const scalar_t* base = logits.data_ptr<scalar_t>();
    with_truncation(ptau, [&](auto trunc) {
      constexpr bool TRUNC = decltype(trunc)::value;
      at::parallel_for(0, N, 1, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const scalar_t* x = base + (r / inner) * so + (r % inner) * si;
          const int64_t label = y[r];
          if (label == ignore_index) {
            plp[r] = pent[r] = pm[r] = pls[r] = 0.f;
            continue;
          }
          const float tau = TRUNC ? ptau[r] : NEG_INF;
          const RowStats st = row_logsumexp<TRUNC>(x, V, inv_t, return_entropy, tau);
          const bool in_vocab = label >= 0 && label < V;
          float lp_r = std::numeric_limits<float>::quiet_NaN();
          if (in_vocab) {
            float xl = static_cast<float>(x[label]);
            if (TRUNC && xl < tau) xl = NEG_INF;  // a dropped label: -inf, or NaN in a NaN row
            lp_r = (xl - st.m) * inv_t - st.log_s;
          }
          plp[r] = lp_r;
          pent[r] = return_entropy ? st.entropy : 0.f;
          pm[r] = st.m;
          pls[r] = st.log_s;
        }
      });
    });
  });
  return {lp, ent, mx, ls};
}

// Writes the gradient into `grad` ((outer, inner, V) with a unit last stride; may alias logits).
// thresholds: the forward's, or None.
void token_logprobs_backward(at::Tensor logits, at::Tensor labels, at::Tensor mx, at::Tensor ls,
                             at::Tensor ent, at::Tensor g_lp, at::Tensor g_h, at::Tensor grad,
                             double temperature, int64_t ignore_index, bool has_g_h,
                             c10::optional<at::Tensor> thresholds) {
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
  const float* ptau = threshold_data(thresholds, N);
  dispatch(logits, [&](auto zero) {
    using scalar_t = decltype(zero);
    const scalar_t* base = logits.data_ptr<scalar_t>();
    scalar_t* gbase = grad.data_ptr<scalar_t>();
    with_truncation(ptau, [&](auto trunc) {
      constexpr bool TRUNC = decltype(trunc)::value;
      at::parallel_for(0, N, 1, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t o = r / inner, i = r % inner;
          scalar_t* g = gbase + o * gso + i * gsi;
          if (y[r] == ignore_index) {
            std::fill(g, g + V, static_cast<scalar_t>(0.f));
            continue;
          }
          row_grad<TRUNC>(base + o * so + i * si, g, V, y[r], pm[r], pls[r], pent[r], pglp[r],
                          has_g_h ? pgh[r] : 0.f, inv_t, has_g_h, TRUNC ? ptau[r] : NEG_INF);
        }
      });
    });
  });
}

}  // namespace fastppo
