// One-position attention over a long trace on CPUs: the decode and latent steps' read of the
// shared KV trace, at close to the memory bandwidth.
//
// A one-position step reads every key and value of the trace once and does little arithmetic per
// byte (G query heads of a KV head: 2 G multiply-adds per element). PyTorch's CPU SDPA kernels
// read the trace at a third to a quarter of the bandwidth here (bench/decode_attention.py), so on
// long traces this read is most of the step. The kernel lists each row's visible positions (masked
// ones have weight exactly 0 and are never read), splits each (row, KV head)'s list into chunks
// (split-KV: a batch of one still fills every core), runs the G query heads over each key and
// value once, and merges the chunks' softmax states. Chunks and vector lanes follow a position's
// index in its row's list, not its column: a row's sums run in the same order whatever padding or
// hidden columns surround its entries, so its output has the same bits alone and in any batch. Keys and values are fp32 or bf16 (a bf16 model's trace: half the bytes
// to read, widened to fp32 in registers); the query, the arithmetic and the output are fp32
// throughout; the reductions run in another order than SDPA's (closer to float64 in the tests). An AVX-512 path covers head_dim 64 and 128 with up to 8 query
// heads per KV head; `supports` says whether this build has one for a shape, and the Python side
// keeps SDPA where it does not.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kChunk = 256;  // visible positions per work item: short enough for batch-1 parallelism

struct Softmax {  // one chunk's state for one query head: max score and sum of exp(score - max)
  float max, sum;
};

struct Mask {  // a row's mask over positions: keep[l * stride] (bool) or bias[l * stride] (added)
  const bool* keep;
  const float* bias;
  int64_t stride;

  // Position l gets exactly zero weight (false in a bool mask, -inf in a float one): its key and
  // value need not be read, and skipping them adds no term that was not exactly zero.
  bool masks(int64_t l) const {
    return keep ? !keep[l * stride] : bias && bias[l * stride] == kNegInf;
  }
};

#ifdef __AVX512F__
// 16 keys' or values' elements as fp32: bf16 is fp32's upper half, so widening is a shift.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

// e^x for x <= 0 (a score minus its row's maximum): 2^n * p(f), f in [-0.5, 0.5], p a degree-6
// minimax polynomial of 2^f (relative error about 2e-7); x below -87 flushes to about 1e-38.
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887440266574e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// Scores of G query heads over the n positions pos[0..n), in scores[g * n + i]; returns each head's max.
template <typename T, int G, int DC>
void chunk_scores(const __m512 (&qv)[G][DC], const T* k, int64_t pos_stride, const int32_t* pos, int64_t n,
                  const Mask& mask, float* scores, float* mx) {
  for (int g = 0; g < G; ++g) mx[g] = kNegInf;
  for (int64_t i = 0; i < n; ++i) {
    const T* kl = k + pos[i] * pos_stride;
    __m512 kc[DC];
    for (int c = 0; c < DC; ++c) kc[c] = load16(kl + 16 * c);
    const float add = mask.bias ? mask.bias[pos[i] * mask.stride] : 0.f;
    for (int g = 0; g < G; ++g) {
      __m512 a = _mm512_mul_ps(qv[g][0], kc[0]);
      for (int c = 1; c < DC; ++c) a = _mm512_fmadd_ps(qv[g][c], kc[c], a);
      const float s = _mm512_reduce_add_ps(a) + add;
      scores[g * n + i] = s;
      mx[g] = std::max(mx[g], s);
    }
  }
}

// scores -> exp(score - max) in place; returns their sum.
inline float exponentiate(float* s, int64_t n, float mx) {
  const __m512 m = _mm512_set1_ps(mx);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 lanes = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
    const __m512 x = _mm512_maskz_loadu_ps(lanes, s + i);
    const __m512 e = _mm512_maskz_mov_ps(lanes, exp_nonpositive(_mm512_sub_ps(x, m)));
    _mm512_mask_storeu_ps(s + i, lanes, e);
    sum = _mm512_add_ps(sum, e);
  }
  return _mm512_reduce_add_ps(sum);
}

// One chunk of n >= 1 visible positions pos[0..n): softmax states in part[G] and unnormalised sums
// of values in acc[G][16 * DC].
template <typename T, int G, int DC>
void chunk_attention(const float* q, int64_t q_head_stride, const T* k, const T* v, int64_t pos_stride,
                     const int32_t* pos, int64_t n, const Mask& mask, float scale, float* scores, float* acc,
                     Softmax* part) {
  __m512 qv[G][DC];  // the query heads, pre-scaled, in registers for the whole chunk
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < DC; ++c)
      qv[g][c] = _mm512_mul_ps(_mm512_loadu_ps(q + g * q_head_stride + 16 * c), _mm512_set1_ps(scale));
  float mx[G];
  chunk_scores<T, G, DC>(qv, k, pos_stride, pos, n, mask, scores, mx);
  for (int g = 0; g < G; ++g) part[g] = {mx[g], exponentiate(scores + g * n, n, mx[g])};
  __m512 av[G][DC];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < DC; ++c) av[g][c] = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; ++i) {
    const T* vl = v + pos[i] * pos_stride;
    __m512 vc[DC];
    for (int c = 0; c < DC; ++c) vc[c] = load16(vl + 16 * c);
    for (int g = 0; g < G; ++g) {
      const __m512 p = _mm512_set1_ps(scores[g * n + i]);
      for (int c = 0; c < DC; ++c) av[g][c] = _mm512_fmadd_ps(p, vc[c], av[g][c]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < DC; ++c) _mm512_storeu_ps(acc + g * 16 * DC + 16 * c, av[g][c]);
}
#endif

template <typename T>
using ChunkFn = void (*)(const float*, int64_t, const T*, const T*, int64_t, const int32_t*, int64_t, const Mask&,
                         float, float*, float*, Softmax*);

template <typename T, int DC>
ChunkFn<T> chunk_fn_for_group(int64_t G) {
#ifdef __AVX512F__
  switch (G) {
    case 1: return chunk_attention<T, 1, DC>;
    case 2: return chunk_attention<T, 2, DC>;
    case 3: return chunk_attention<T, 3, DC>;
    case 4: return chunk_attention<T, 4, DC>;
    case 5: return chunk_attention<T, 5, DC>;
    case 6: return chunk_attention<T, 6, DC>;
    case 7: return chunk_attention<T, 7, DC>;
    case 8: return chunk_attention<T, 8, DC>;
  }
#endif
  return nullptr;
}

template <typename T>
ChunkFn<T> chunk_fn(int64_t G, int64_t D) {
  if (D == 64) return chunk_fn_for_group<T, 4>(G);
  if (D == 128) return chunk_fn_for_group<T, 8>(G);
  return nullptr;
}

// Merge one (row, query head)'s chunks into its output: sum_c e^(max_c - M) acc_c / sum_c e^(max_c - M) sum_c.
void merge(const Softmax* parts, const float* accs, int64_t nchunks, int64_t stride, int64_t D, float* out) {
  float M = kNegInf;
  for (int64_t c = 0; c < nchunks; ++c) M = std::max(M, parts[c * stride].max);
  std::fill(out, out + D, 0.f);
  float total = 0.f;
  for (int64_t c = 0; c < nchunks; ++c) {
    const Softmax& p = parts[c * stride];
    if (p.sum == 0.f) continue;
    const float w = std::exp(p.max - M);
    total += w * p.sum;
    const float* a = accs + c * stride * D;
    for (int64_t d = 0; d < D; ++d) out[d] += w * a[d];
  }
  if (total == 0.f) return;  // every position masked: zeros, as PyTorch's SDPA gives
  for (int64_t d = 0; d < D; ++d) out[d] /= total;
}

}  // namespace

bool supports(int64_t groups, int64_t head_dim) { return chunk_fn<float>(groups, head_dim) != nullptr; }

// query [B, Hq, 1, D] fp32; key and value [B, Hkv, L, D], both fp32 or both bf16, with the same
// strides and contiguous last dims; mask None or [B or 1, 1, 1, L], bool (true: attend) or fp32
// (added to the scores). Returns [B, 1, Hq, D] fp32, the layout transformers' attention functions
// return.
template <typename T>
torch::Tensor attend(const torch::Tensor& query, const torch::Tensor& key, const torch::Tensor& value,
                     const c10::optional<torch::Tensor>& mask, double scale) {
  const int64_t B = query.size(0), Hq = query.size(1), D = query.size(3), Hkv = key.size(1), L = key.size(2);
  const int64_t G = Hq / Hkv;
  const ChunkFn<T> fn = Hq % Hkv == 0 ? chunk_fn<T>(G, D) : nullptr;
  TORCH_CHECK(fn, "decode_attention: no kernel for ", G, " query heads per KV head of dim ", D);
  TORCH_CHECK(query.size(2) == 1 && query.stride(3) == 1 && key.stride(3) == 1 && key.strides() == value.strides(),
              "decode_attention: one query position; contiguous head dims; key and value strides equal");
  Mask row_mask{nullptr, nullptr, 0};
  int64_t mask_row_stride = 0;
  if (mask.has_value()) {
    const torch::Tensor& m = *mask;
    TORCH_CHECK(m.dim() == 4 && m.size(1) == 1 && m.size(2) == 1 && m.size(3) == L && (m.size(0) == 1 || m.size(0) == B),
                "decode_attention: mask must be [B, 1, 1, L]");
    TORCH_CHECK(m.scalar_type() == at::kBool || m.scalar_type() == at::kFloat, "decode_attention: bool or float mask");
    mask_row_stride = m.size(0) == 1 ? 0 : m.stride(0);
    row_mask.stride = m.stride(3);
    if (m.scalar_type() == at::kBool) row_mask.keep = m.data_ptr<bool>();
    else row_mask.bias = m.data_ptr<float>();
  }
  // Each row's visible positions, in order (one list for all rows when the mask is shared or absent).
  TORCH_CHECK(L <= std::numeric_limits<int32_t>::max(), "decode_attention: a trace of more than 2^31 positions");
  const int64_t lists = mask_row_stride == 0 ? 1 : B;
  std::vector<int32_t> pos(lists * L);  // int32: half the bytes each chunk reads back
  std::vector<int64_t> first(lists + 1, 0);
  for (int64_t r = 0; r < lists; ++r) {
    Mask m = row_mask;
    if (m.keep) m.keep += r * mask_row_stride;
    if (m.bias) m.bias += r * mask_row_stride;
    int64_t n = first[r];
    for (int64_t l = 0; l < L; ++l) {
      pos[n] = static_cast<int32_t>(l);
      n += !m.masks(l);  // branch-free: the slot is kept only for a visible position
    }
    first[r + 1] = n;
  }
  int64_t nchunks = 1;  // per (row, KV head): the longest row's; a shorter row's last ones stay empty
  for (int64_t r = 0; r < lists; ++r) nchunks = std::max(nchunks, (first[r + 1] - first[r] + kChunk - 1) / kChunk);
  const int64_t units = B * Hkv * nchunks;
  auto out = torch::empty({B, 1, Hq, D}, query.options());
  auto accs = torch::empty({units, G, D}, query.options());
  std::vector<Softmax> parts(units * G, Softmax{kNegInf, 0.f});  // an empty chunk: weight 0 in `merge`
  const float* qp = query.data_ptr<float>();
  const T *kp = key.data_ptr<T>(), *vp = value.data_ptr<T>();
  float* ap = accs.data_ptr<float>();
  at::parallel_for(0, units, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> scores(G * kChunk);
    for (int64_t u = lo; u < hi; ++u) {
      const int64_t c = u % nchunks, b = u / nchunks / Hkv, h = u / nchunks % Hkv, r = lists == 1 ? 0 : b;
      const int64_t begin = first[r] + c * kChunk, end = std::min(first[r + 1], begin + kChunk);
      if (begin >= end) continue;
      const int64_t kv = b * key.stride(0) + h * key.stride(1);
      Mask m = row_mask;
      if (m.bias) m.bias += b * mask_row_stride;
      fn(qp + b * query.stride(0) + h * G * query.stride(1), query.stride(1), kp + kv, vp + kv, key.stride(2),
         pos.data() + begin, end - begin, m, static_cast<float>(scale), scores.data(), ap + u * G * D,
         parts.data() + u * G);
    }
  });
  float* op = out.data_ptr<float>();
  for (int64_t bh = 0; bh < B * Hkv; ++bh)
    for (int64_t g = 0; g < G; ++g)
      merge(parts.data() + bh * nchunks * G + g, ap + (bh * nchunks * G + g) * D, nchunks, G, D,
            op + ((bh / Hkv) * Hq + (bh % Hkv) * G + g) * D);
  return out;
}

torch::Tensor decode_attention(const torch::Tensor& query, const torch::Tensor& key, const torch::Tensor& value,
                               const c10::optional<torch::Tensor>& mask, double scale) {
  TORCH_CHECK(query.scalar_type() == at::kFloat && key.scalar_type() == value.scalar_type() &&
                  (key.scalar_type() == at::kFloat || key.scalar_type() == at::kBFloat16),
              "decode_attention: an fp32 query; fp32 or bf16 keys and values");
  if (key.scalar_type() == at::kBFloat16) return attend<at::BFloat16>(query, key, value, mask, scale);
  return attend<float>(query, key, value, mask, scale);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, "one-position attention over a KV trace (fp32 or bf16 keys and values)");
  m.def("supports", &supports, "whether this build has a kernel for (query heads per KV head, head dim)");
}
