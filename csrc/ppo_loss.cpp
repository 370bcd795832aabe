// ppo_loss's per-token terms on CPU: from each token's log p and entropy, the clipped policy-gradient
// term, the (clipped) value term, the KL penalty, the per-token loss and its derivatives with respect
// to log p and the value. The Python side is kernels/ppo_loss.py (NativePPOLossFunction), which runs
// the vocabulary pass and the backward through csrc/token_logprobs.cpp; the same math as its Triton
// forward kernel after the vocabulary loop.
//
// The rows of the per-token buffer are defined once, by STATS in kernels/_ppo.py; the build
// (kernels/_native.py) passes them as -DPPO_STAT_<NAME>=<row> and -DPPO_STAT_COUNT=len(STATS).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#if !defined(PPO_STAT_LP) || !defined(PPO_STAT_ENTROPY) || !defined(PPO_STAT_PG) ||         \
    !defined(PPO_STAT_VF) || !defined(PPO_STAT_CLIPPED) || !defined(PPO_STAT_VCLIPPED) ||   \
    !defined(PPO_STAT_LOSS) || !defined(PPO_STAT_DLP) || !defined(PPO_STAT_DV) ||           \
    !defined(PPO_STAT_MAX) || !defined(PPO_STAT_LOGSUM) || !defined(PPO_STAT_COUNT)
#error "ppo_loss.cpp needs -DPPO_STAT_<NAME>=<row> for every name in kernels/_ppo.py's STATS \
and -DPPO_STAT_COUNT (kernels/_native.py passes them)"
#endif

namespace fastppo {

namespace {

// Rows of the (PPO_STAT_COUNT, N) float32 buffer, numbered as STATS in kernels/_ppo.py.
enum Stat : int64_t {
  LP = PPO_STAT_LP,
  ENTROPY = PPO_STAT_ENTROPY,
  PG = PPO_STAT_PG,
  VF = PPO_STAT_VF,
  CLIPPED = PPO_STAT_CLIPPED,
  VCLIPPED = PPO_STAT_VCLIPPED,
  LOSS = PPO_STAT_LOSS,
  DLP = PPO_STAT_DLP,
  DV = PPO_STAT_DV,
  MAX = PPO_STAT_MAX,
  LOGSUM = PPO_STAT_LOGSUM,
};
constexpr int64_t STAT_COUNT = PPO_STAT_COUNT;

// The rows written here, in the order they are written.
constexpr Stat WRITTEN[] = {PG, VF, CLIPPED, VCLIPPED, LOSS, DLP, DV};

}  // namespace

// stats: (len(STATS), N) float32 with rows LP, ENTROPY (and MAX, LOGSUM) filled by the caller from
// token_logprobs_forward; written here: PG, VF, CLIPPED, VCLIPPED, LOSS, DLP (w * d loss / d lp),
// DV (w * d loss / d V). The clamps pass gradient inside their closed range (as torch.clamp); the
// branch max/min does not take passes none. Invalid tokens get zeros.
void ppo_loss_terms(at::Tensor stats, at::Tensor mask, at::Tensor weights, at::Tensor old_lp,
                    at::Tensor adv, c10::optional<at::Tensor> values,
                    c10::optional<at::Tensor> old_values, c10::optional<at::Tensor> returns,
                    c10::optional<at::Tensor> ref_lp, bool has_clip, double clip_low,
                    double clip_high, bool has_dual_clip, double dual_clip, bool has_value_clip,
                    double value_clip, double vf_coef, double entropy_coef, double kl_coef,
                    int64_t kl_estimator) {
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == STAT_COUNT && stats.is_contiguous() &&
                  stats.scalar_type() == at::kFloat,
              "stats must be a contiguous float32 (", STAT_COUNT, ", N) buffer; got ",
              stats.sizes(), " ", stats.scalar_type());
  const int64_t N = stats.size(1);
  float* st = stats.data_ptr<float>();
  auto row = [&](Stat r) { return st + static_cast<int64_t>(r) * N; };
  const uint8_t* mk = mask.data_ptr<uint8_t>();
  const float *w = weights.data_ptr<float>(), *olp = old_lp.data_ptr<float>(), *a = adv.data_ptr<float>();
  const float* v = values ? values->data_ptr<float>() : nullptr;
  const float* ov = old_values ? old_values->data_ptr<float>() : nullptr;
  const float* ret = returns ? returns->data_ptr<float>() : nullptr;
  const float* ref = ref_lp ? ref_lp->data_ptr<float>() : nullptr;
  at::parallel_for(0, N, 1024, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      if (!mk[t]) {
        for (const Stat r : WRITTEN) row(r)[t] = 0.f;
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
      float loss = pg - float(entropy_coef) * row(ENTROPY)[t], dlp = dpg;
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

}  // namespace fastppo
