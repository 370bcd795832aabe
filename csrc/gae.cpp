// Generalised advantage estimation on CPU, forward and backward: advantages and returns from
// per-step rewards and values over each row's valid positions, and their gradient. The Python side
// is kernels/gae.py (its native backend; the math is written out there).
//
// One thread per row: the forward runs right to left, the backward left to right; masked positions
// are holes, skipped rather than read as zeros.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros_like.h>

#include <cstdint>
#include <vector>

namespace fastppo {

// rewards, values: (B, T) float32; mask: (B, T) uint8. Returns (advantages, returns), float32.
std::vector<at::Tensor> gae_forward(at::Tensor rewards, at::Tensor values, at::Tensor mask,
                                    double gamma, double lam) {
  const int64_t B = rewards.size(0), T = rewards.size(1);
  auto adv = at::zeros_like(rewards), ret = at::zeros_like(rewards);
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

// With u = g_A + g_R, g_delta_j = u_j + gamma lam g_delta_prev(j) (left to right),
// g_r = g_delta, g_V_j = -g_delta_j + gamma g_delta_prev(j) + g_R_j, all over valid positions.
// Returns (grad_rewards, grad_values), float32 (B, T).
std::vector<at::Tensor> gae_backward(at::Tensor grad_adv, at::Tensor grad_ret, at::Tensor mask,
                                     double gamma, double lam) {
  const int64_t B = grad_adv.size(0), T = grad_adv.size(1);
  auto g_r = at::zeros_like(grad_adv), g_v = at::zeros_like(grad_adv);
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

}  // namespace fastppo
