// truncation_thresholds on CPU: per row, the top-k / top-p threshold tau of kernels/_truncation.py, so
// that the sampler's kept set (reference.truncation_mask) is {v : x_v >= tau}. token_logprobs'
// forward and backward (and through them ppo_loss) then read the logits below tau as -inf.
//
// A selection pass per row, never a sort of V:
//   top-k: one vectorised scan that keeps the values >= a running threshold in a small buffer (the
//     threshold refreshed to the buffer's k-th largest by nth_element whenever the buffer fills), then
//     nth_element on the buffer: the k-th largest, ties counted, as torch.topk(...).values[-1].
//   top-p: over the top-k candidates (or the whole row), with m their max, e = exp((x - m) / T) and
//     target = p sum e, tau is the largest candidate t with mass(x >= t) >= target: a kept token's
//     strictly-more-likely mass is then below p, a dropped one's at least p. A large candidate set is
//     first narrowed by a mass histogram over d = (m - x) / T to the one bucket where the running
//     mass crosses the target (buckets are monotone in x, so the buckets above it are kept whole);
//     the few candidates left go to a weighted quickselect.
// Byte floor: reads N*V*b once from memory. top-p re-reads each row from L2 (a 152k-logit float32 row
// is 600 KB) for its histogram and for the crossing bucket's values, and costs about one exp and one
// scalar scatter-add per logit: about as much as the plain forward and backward together.
#include "rows.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <vector>

namespace fastppo {

namespace {

constexpr int64_t BUCKETS = 1024;      // per histogram level
constexpr float D_SPAN = 64.f;         // level 0: d in [0, 64) (exp(-64) ~ 1e-28), the rest 1 bucket
constexpr int64_t QUICKSELECT = 4096;  // candidates few enough for the weighted quickselect
constexpr int64_t TOP_K_BUFFER = 256;  // the top-k buffer holds at least this many, and 4k

// Per-thread buffers, reused across the rows of a thread's range.
struct Scratch {
  std::vector<float> v, e;  // candidate values, their masses
  std::vector<double> hist;
  std::vector<int32_t> chunk_bucket;
  std::vector<float> chunk_mass;
};

// Appends the lanes of xv set in bits to out and returns their number. May write W floats at out.
// AVX-512: a register compress and a full store (the memory-destination compress is slow on AMD).
inline int64_t append(float* out, const Vec& xv, uint32_t bits) {
#if defined(CPU_CAPABILITY_AVX512)
  _mm512_storeu_ps(out, _mm512_maskz_compress_ps(static_cast<__mmask16>(bits), xv));
  return __builtin_popcount(bits);
#else
  float lane[W];
  xv.store(lane);
  int64_t n = 0;
  for (; bits; bits &= bits - 1) out[n++] = lane[__builtin_ctz(bits)];
  return n;
#endif
}

// Every value >= the k-th largest of the row (ties counted, -inf a value, NaN skipped) into v[0, n);
// returns the k-th largest, or NaN where the row has fewer than k values that are not NaN.
// The buffer holds every value scanned so far >= thr, and thr never exceeds the k-th largest scanned,
// so the top k are always in it. Each refill (nth_element, O(cap)) raises thr to the k-th largest of
// the prefix, so that later values pass ever more rarely: O(log(V / k)) refills of a small buffer.
template <typename scalar_t>
float top_k_candidates(const scalar_t* x, int64_t V, int64_t k, std::vector<float>& v, int64_t& n) {
  int64_t cap = std::max(4 * k, TOP_K_BUFFER);
  if (static_cast<int64_t>(v.size()) < std::min(cap, V) + W) v.resize(std::min(cap, V) + W);
  Vec vthr(NEG_INF);
  n = 0;
  for (int64_t i = 0; i < V; i += W) {
    const int64_t w = std::min(W, V - i);
    const Vec xv = load(x + i, w);
    const uint32_t bits = ge_bits(xv, vthr) & ((1u << w) - 1);  // NaN fails >=: never a candidate
    if (bits == 0) continue;
    n += append(v.data() + n, xv, bits);
    if (n > cap) {  // full (cap + W slots): thr = the k-th largest so far, keep what is >= it
      std::nth_element(v.begin(), v.begin() + (k - 1), v.begin() + n, std::greater<float>());
      const float thr = v[k - 1];
      vthr = Vec(thr);
      int64_t kept = k;
      for (int64_t j = k; j < n; ++j) {
        if (v[j] >= thr) v[kept++] = v[j];  // ties with the k-th
      }
      n = kept;
      if (n > cap / 2) {  // many ties at thr: grow, or every few vectors would refill
        cap *= 2;
        if (static_cast<int64_t>(v.size()) < std::min(cap, V) + W) v.resize(std::min(cap, V) + W);
      }
    }
  }
  if (n < k) return NAN;
  std::nth_element(v.begin(), v.begin() + (k - 1), v.begin() + n, std::greater<float>());
  const float kth = v[k - 1];
  int64_t kept = k;
  for (int64_t j = k; j < n; ++j) {
    if (v[j] >= kth) v[kept++] = v[j];
  }
  n = kept;
  return kth;
}

// The largest t among v[0, n) with sum(e_i : v_i >= t) >= need (v, e with W slots of slack): a
// quickselect by value that carries the mass of each side, a tie group always on one side. Each
// round sums the mass above and at a pivot, then keeps only the side that holds t: vectorised and
// branch-free (the comparisons are coin flips; a 3-way partition mispredicts every other one). The
// sums are per lane in double (float lanes lose the tail masses that p ~ 1 weighs). Where the mass
// falls short of need (rounding), every candidate is kept: the smallest value.
float weighted_select(float* v, float* e, int64_t n, double need) {
  float smallest = NEG_INF;
  while (n > 0) {
    const float a = v[0], b = v[n / 2], c = v[n - 1];
    const float pv = std::max(std::min(a, b), std::min(std::max(a, b), c));  // median of three
    const Vec pivot(pv);
    double above_lane[W] = {}, at_lane[W] = {};
    for (int64_t i = 0; i < n; i += W) {
      const int64_t w = std::min(W, n - i);
      const Vec x = Vec::loadu(v + i, w), mass = Vec::loadu(e + i, w);  // missing lanes: mass 0
      float above_i[W], at_i[W];
      (mass & (x > pivot)).store(above_i);
      (mass & (x == pivot)).store(at_i);
      for (int64_t j = 0; j < W; ++j) {
        above_lane[j] += above_i[j];
        at_lane[j] += at_i[j];
      }
    }
    double above = 0.0, at = 0.0;
    for (int64_t j = 0; j < W; ++j) {
      above += above_lane[j];
      at += at_lane[j];
    }
    const bool up = above >= need;  // t > pivot (then that side is non-empty: need > 0)
    if (!up && above + at >= need) return pv;
    if (!up) {
      need -= above + at;
      smallest = pv;
    }
    int64_t kept = 0;
    for (int64_t i = 0; i < n; i += W) {  // in place: writes stay below i + W, read already
      const int64_t w = std::min(W, n - i);
      const Vec x = Vec::loadu(v + i, w), mass = Vec::loadu(e + i, w);
      const uint32_t bits = (up ? lt_bits(pivot, x) : lt_bits(x, pivot)) & ((1u << w) - 1);
      append(e + kept, mass, bits);
      kept += append(v + kept, x, bits);
    }
    n = kept;
  }
  return smallest;
}

// One histogram level: bucket = floor(pos), pos = x slope + offset (slope < 0) clamped to
// [0, BUCKETS - 1], and the masses exp((x - m) / T). Any such pos is monotone (non-increasing) in x,
// rounding included: a bucket's values all lie strictly below those of the buckets before it, and a
// tie group never straddles two. Level 0 spans d = (m - x) / T in [0, D_SPAN), each next level the
// last one's bucket. No NaN here.
struct Level {
  float m, inv_t, slope, offset;

  static Level first(float m, float inv_t) {
    constexpr float scale = BUCKETS / D_SPAN;
    return {m, inv_t, -inv_t * scale, m * inv_t * scale};
  }
  Level refine(int64_t c) const { return {m, inv_t, slope * BUCKETS, (offset - c) * BUCKETS}; }
  Vec unclamped(const Vec& x) const { return at::vec::fmadd(x, Vec(slope), Vec(offset)); }
  Vec pos(const Vec& x) const {
    return at::vec::clamp(unclamped(x), Vec(0.f), Vec(static_cast<float>(BUCKETS - 1)));
  }
};

// hist[b] = the mass of bucket b over src[0, n). Two phases per CHUNK: the vectorised bucket and mass
// of each value into L1 arrays, then the scalar scatter-add from them (read back lane by lane straight
// after a vector store, they would stall on store forwarding); odd and even values into two
// histograms, so that a run of one bucket does not chain its adds. The scatter, 3 loads and a store
// per value, is the floor here. exp_u20 (ATen's 20-ulp exp, ~1e-6): the float32 inputs already
// blur the masses by about as much, and it is one sixth of this pass cheaper than exp.
template <typename scalar_t>
void histogram(const scalar_t* src, int64_t n, const Level& L, Scratch& s) {
  s.hist.assign(2 * BUCKETS, 0.0);
  s.chunk_bucket.resize(CHUNK);
  s.chunk_mass.resize(CHUNK);
  double* hist = s.hist.data();
  int32_t* bucket = s.chunk_bucket.data();
  float* mass = s.chunk_mass.data();
  const Vec vm(L.m), vinv(L.inv_t);
  for (int64_t c0 = 0; c0 < n; c0 += CHUNK) {
    const int64_t cn = std::min(CHUNK, n - c0);
    for (int64_t i = 0; i < cn; i += W) {
      const Vec xv = load(src + c0 + i, std::min(W, cn - i));
      at::vec::convert_to_int_of_same_size(L.pos(xv)).store(bucket + i);
      ((xv - vm) * vinv).exp_u20().store(mass + i);
    }
    int64_t j = 0;
    for (; j + 1 < cn; j += 2) {
      hist[bucket[j]] += mass[j];
      hist[BUCKETS + bucket[j + 1]] += mass[j + 1];
    }
    if (j < cn) hist[bucket[j]] += mass[j];
  }
  for (int64_t b = 0; b < BUCKETS; ++b) hist[b] += hist[BUCKETS + b];
}

// Bucket c's values of src[0, n) into dst (may be src: in place), as float; returns their number.
template <typename scalar_t>
int64_t keep_bucket(const scalar_t* src, int64_t n, const Level& L, int64_t c, float* dst) {
  // floor(pos) == c, on the unclamped pos: the end buckets extend to -inf and +inf (x = -inf)
  const Vec lo(c == 0 ? NEG_INF : static_cast<float>(c)), hi(static_cast<float>(c + 1));
  const bool last = c == BUCKETS - 1;
  int64_t kept = 0;
  for (int64_t i = 0; i < n; i += W) {
    const int64_t w = std::min(W, n - i);
    const Vec xv = load(src + i, w);
    const Vec pos = L.unclamped(xv);
    const uint32_t bits = ge_bits(pos, lo) & (last ? ~0u : lt_bits(pos, hi)) & ((1u << w) - 1);
    if (bits) kept += append(dst + kept, xv, bits);  // in place: writes stay below i + W, read already
  }
  return kept;
}

// The top-p threshold among the candidates src[0, n): the largest t with mass(x >= t) >= p mass(all),
// or NEG_INF where the masses are undefined (max NaN, +-inf). Histogram levels narrow the candidates
// to the bucket where the running mass crosses the target (the buckets before it kept whole), each
// level spanning the last one's bucket, until the weighted quickselect takes the rest. The first
// level reads src (the row, or the top-k buffer); the rest s.v, in place.
template <typename scalar_t>
float top_p_threshold(const scalar_t* src, int64_t n, float inv_t, double p, Scratch& s) {
  Vec vmax(NEG_INF);
  for (int64_t i = 0; i < n; i += W) vmax = at::vec::maximum(vmax, load(src + i, std::min(W, n - i)));
  const float m = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmax);
  if (!std::isfinite(m)) return NEG_INF;  // NaN logits: the forward's output is NaN anyway
  // The candidates are the row, or already in s.v (the top-k buffer, with its W slots of slack).
  bool in_v = static_cast<const void*>(src) == static_cast<const void*>(s.v.data());
  if (!in_v && static_cast<int64_t>(s.v.size()) < n + W) s.v.resize(n + W);
  float* v = s.v.data();
  double need = -1.0;  // target mass still to collect from the candidates; known after a first sum
  Level L = Level::first(m, inv_t);
  while (n > QUICKSELECT) {
    in_v ? histogram(v, n, L, s) : histogram(src, n, L, s);
    const double* hist = s.hist.data();
    if (need < 0.0) {
      double total = 0.0;
      for (int64_t b = 0; b < BUCKETS; ++b) total += hist[b];
      need = p * total;
    }
    int64_t c = 0;
    double before = 0.0;
    while (c < BUCKETS && before + hist[c] < need) before += hist[c++];
    if (c == BUCKETS) {  // short of the target (rounding): keep them all
      float lo = -NEG_INF;
      for (int64_t i = 0; i < n; ++i) lo = std::min(lo, in_v ? v[i] : static_cast<float>(src[i]));
      return lo;
    }
    const int64_t kept = in_v ? keep_bucket(v, n, L, c, v) : keep_bucket(src, n, L, c, v);
    in_v = true;
    if (kept == n) break;  // no progress (values closer than float d resolves): quickselect them
    n = kept;
    need -= before;
    L = L.refine(c);
  }
  if (!in_v) {
    for (int64_t i = 0; i < n; i += W) {
      load(src + i, std::min(W, n - i)).store(v + i, std::min(W, n - i));
    }
  }
  if (static_cast<int64_t>(s.e.size()) < n + W) s.e.resize(n + W);
  float* e = s.e.data();
  const Vec vm(m), vinv(inv_t);
  double total = 0.0;
  for (int64_t i = 0; i < n; i += W) {
    const int64_t w = std::min(W, n - i);
    ((Vec::loadu(v + i, w) - vm) * vinv).exp().store(e + i, w);
    for (int64_t j = i; j < i + w; ++j) total += e[j];
  }
  if (need < 0.0) need = p * total;
  return weighted_select(v, e, n, need);
}

// Whether any of the row's logits is below tau (mostly answered by the first chunk).
template <typename scalar_t>
bool cuts(const scalar_t* x, int64_t V, float tau) {
  const Vec vtau(tau);
  for (int64_t i0 = 0; i0 < V; i0 += CHUNK) {
    const int64_t i1 = std::min(V, i0 + CHUNK);
    uint32_t below = 0;
    for (int64_t i = i0; i < i1; i += W) {
      const int64_t w = std::min(W, i1 - i);
      below |= lt_bits(load(x + i, w), vtau) & ((1u << w) - 1);
    }
    if (below) return true;
  }
  return false;
}

// tau for one row; NEG_INF where nothing is cut.
template <typename scalar_t>
float row_threshold(const scalar_t* x, int64_t V, int64_t top_k, double top_p, float inv_t,
                    Scratch& s) {
  float tau = NEG_INF;
  int64_t n = V;
  if (top_k > 0 && top_k < V) {
    tau = top_k_candidates(x, V, top_k, s.v, n);
    if (std::isnan(tau)) return NEG_INF;  // NaN logits: the forward's output is NaN anyway
    if (n == V) tau = NEG_INF;  // ties at the k-th (or -inf) keep the whole row
    if (top_p < 1.0) tau = std::max(tau, top_p_threshold(s.v.data(), n, inv_t, top_p, s));
  } else if (top_p < 1.0) {
    tau = top_p_threshold(x, V, inv_t, top_p, s);
  }
  if (tau != NEG_INF && n == V && !cuts(x, V, tau)) tau = NEG_INF;
  return tau;
}

}  // namespace

// logits: (outer, inner, V) view with a unit last stride; labels: (N,) int64.
// Returns tau, float32 (N,): one of the row's own values (as float32, before the temperature), or
// -inf where nothing is cut or the label is ignore_index.
at::Tensor truncation_thresholds(at::Tensor logits, at::Tensor labels, int64_t ignore_index,
                                 double temperature, int64_t top_k, double top_p) {
  TORCH_CHECK(logits.dim() == 3 && logits.stride(2) == 1, "logits must be (outer, inner, V), unit stride");
  const int64_t inner = logits.size(1), V = logits.size(2), N = logits.size(0) * inner;
  const int64_t so = logits.stride(0), si = logits.stride(1);
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.numel() == N && labels.is_contiguous(),
              "labels must be int64 (N,) contiguous");
  TORCH_CHECK(temperature > 0.0, "temperature must be > 0");
  TORCH_CHECK(top_k >= 0 && top_p > 0.0 && top_p <= 1.0, "need top_k >= 0 and 0 < top_p <= 1");
  auto tau = at::empty({N}, logits.options().dtype(at::kFloat));
  const float inv_t = static_cast<float>(1.0 / temperature);
  const int64_t* y = labels.data_ptr<int64_t>();
  float* out = tau.data_ptr<float>();
  const bool active = (top_k > 0 && top_k < V) || top_p < 1.0;
  dispatch(logits, [&](auto zero) {
    using scalar_t = decltype(zero);
    const scalar_t* base = logits.data_ptr<scalar_t>();
    at::parallel_for(0, N, 1, [&](int64_t r0, int64_t r1) {
      Scratch s;
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* x = base + (r / inner) * so + (r % inner) * si;
        const bool cut = active && y[r] != ignore_index;  // ignored rows: no work at all
        out[r] = cut ? row_threshold(x, V, top_k, top_p, inv_t, s) : NEG_INF;
      }
    });
  });
  return tau;
}

}  // namespace fastppo
