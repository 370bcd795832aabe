// The Python module of the native CPU kernels: the one PYBIND11_MODULE, binding the ops defined one
// per source (token_logprobs.cpp, truncation.cpp, ppo_loss.cpp, gae.cpp). kernels/_native.py compiles
// every csrc/*.cpp into it on first use; kernels/token_logprobs.py, _truncation.py, ppo_loss.py and
// gae.py call it by these names.
// Only this file includes <torch/extension.h> (pybind11): the op files include the lighter ATen
// headers, so that the build's parallel compiles stay short. A new op: its own .cpp, its declaration
// and m.def here.
#include <torch/extension.h>

#include <cstdint>
#include <vector>

namespace fastppo {

std::vector<at::Tensor> token_logprobs_forward(at::Tensor logits, at::Tensor labels,
                                               double temperature, int64_t ignore_index,
                                               bool return_entropy,
                                               c10::optional<at::Tensor> thresholds);
void token_logprobs_backward(at::Tensor logits, at::Tensor labels, at::Tensor mx, at::Tensor ls,
                             at::Tensor ent, at::Tensor g_lp, at::Tensor g_h, at::Tensor grad,
                             double temperature, int64_t ignore_index, bool has_g_h,
                             c10::optional<at::Tensor> thresholds);
at::Tensor truncation_thresholds(at::Tensor logits, at::Tensor labels, int64_t ignore_index,
                                 double temperature, int64_t top_k, double top_p);
void ppo_loss_terms(at::Tensor stats, at::Tensor mask, at::Tensor weights, at::Tensor old_lp,
                    at::Tensor adv, c10::optional<at::Tensor> values,
                    c10::optional<at::Tensor> old_values, c10::optional<at::Tensor> returns,
                    c10::optional<at::Tensor> ref_lp, bool has_clip, double clip_low,
                    double clip_high, bool has_dual_clip, double dual_clip, bool has_value_clip,
                    double value_clip, double vf_coef, double entropy_coef, double kl_coef,
                    int64_t kl_estimator);
std::vector<at::Tensor> gae_forward(at::Tensor rewards, at::Tensor values, at::Tensor mask,
                                    double gamma, double lam);
std::vector<at::Tensor> gae_backward(at::Tensor grad_adv, at::Tensor grad_ret, at::Tensor mask,
                                     double gamma, double lam);

}  // namespace fastppo

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastppo's native CPU kernels (csrc/; loaded by fastppo.kernels._native)";
  m.def("token_logprobs_forward", &fastppo::token_logprobs_forward,
        "token_logprobs forward (CPU): logits (outer, inner, V) with a unit last stride, labels (N,) "
        "int64 -> [logprobs, entropy, row max, log sum exp], each float32 (N,); rows whose label is "
        "ignore_index get zeros, out-of-vocabulary labels NaN log-probs. thresholds (last): None, or "
        "float32 (N,) tau from truncation_thresholds: logits < tau are dropped (top-k / top-p), a "
        "dropped label gets -inf.");
  m.def("token_logprobs_backward", &fastppo::token_logprobs_backward,
        "token_logprobs backward (CPU): writes d(g_lp * logprob + g_h * entropy) / d logits into "
        "grad ((outer, inner, V), may alias logits) from the forward's row max, log sum exp and "
        "entropy; rows whose label is ignore_index get zeros. thresholds (last): the forward's, or "
        "None; the kept set is held fixed, dropped logits get zero gradient.");
  m.def("truncation_thresholds", &fastppo::truncation_thresholds,
        "top-k / top-p thresholds (CPU): logits (outer, inner, V) with a unit last stride, labels (N,) "
        "int64, ignore_index, temperature, top_k (0: none), top_p (1: none) -> tau float32 (N,), the "
        "kept set being logits >= tau: one of the row's own values, or -inf where nothing is cut or "
        "the label is ignore_index.");
  m.def("ppo_loss_terms", &fastppo::ppo_loss_terms,
        "ppo_loss per-token terms (CPU): from rows LP and ENTROPY of the (len(STATS), N) float32 "
        "buffer, writes rows PG, VF, CLIPPED, VCLIPPED, LOSS, DLP (w * d loss / d logprob) and DV "
        "(w * d loss / d value); masked tokens get zeros.");
  m.def("gae_forward", &fastppo::gae_forward,
        "GAE forward (CPU): rewards, values (B, T) float32 and mask (B, T) uint8 -> [advantages, "
        "returns], over each row's valid positions, right to left.");
  m.def("gae_backward", &fastppo::gae_backward,
        "GAE backward (CPU): grad of advantages and returns (B, T) float32 and mask (B, T) uint8 -> "
        "[grad rewards, grad values].");
}
