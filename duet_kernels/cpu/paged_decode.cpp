// Paged decode attention on the CPU: one query token per sequence, grouped-query heads,
// keys and values read straight from the paged cache (no gather, no copies).
//
// q [B, Hq, D] fp32; k_cache, v_cache [N, bs, Hkv, D] of T (float or bfloat16), any
// strides but a contiguous last dim; block_tables [B, max_blocks] int64; ctx_lens [B] int64.
// Out [B, Hq, D] fp32. One task per sequence: each cache block read once (all kv heads),
// scores for every query head, an fp32 softmax, then one pass over the values. A task's
// sum order depends only on its own sequence, so results do not depend on the batch.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <type_traits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

inline float f32(float x) { return x; }
inline float f32(at::BFloat16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// K rows of one block -> an fp32 tile transposed per head, [H, D, bs]: the scores of a
// block's keys are then D vector FMAs across its tokens, with no horizontal sums
template <typename T>
inline void load_keys_t(const T* src, int64_t n, int64_t H, int64_t s_tok, int64_t s_head,
                        int64_t D, int64_t bs, float* tile) {
  for (int64_t j = 0; j < n; ++j)
    for (int64_t h = 0; h < H; ++h) {
      const T* r = src + j * s_tok + h * s_head;
      float* t = tile + h * D * bs + j;
      for (int64_t d = 0; d < D; ++d) t[d * bs] = f32(r[d]);
    }
}

// V rows of one block -> an fp32 tile [n, H, D]
template <typename T>
inline void load_vals(const T* src, int64_t n, int64_t H, int64_t s_tok, int64_t s_head,
                      int64_t D, float* tile) {
  for (int64_t j = 0; j < n; ++j)
    for (int64_t h = 0; h < H; ++h) {
      const T* r = src + j * s_tok + h * s_head;
      float* t = tile + (j * H + h) * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) t[d] = f32(r[d]);
    }
}

// One sequence: every query head over its context, reading each cache block once.
template <typename T>
void decode_seq(const float* __restrict q, const T* kbase, const T* vbase, const int64_t* table,
                int64_t ctx, int64_t bs, int64_t s_blk, int64_t s_tok, int64_t s_head,
                int64_t Hq, int64_t Hkv, int64_t D, float scale, float* __restrict out,
                std::vector<float>& scores, std::vector<float>& tile) {
  const int64_t G = Hq / Hkv;
  const int64_t nblocks = (ctx + bs - 1) / bs;
  scores.assign(Hq * nblocks * bs, 0.f);
  tile.resize(bs * Hkv * D);
  float* __restrict sc = scores.data();                // [Hq, nblocks * bs]
  float* __restrict tl = tile.data();
  const int64_t row = nblocks * bs;
  for (int64_t bi = 0; bi < nblocks; ++bi) {          // scores: q . k for every key
    const int64_t t0 = bi * bs, n = std::min(bs, ctx - t0);
    load_keys_t(kbase + table[bi] * s_blk, n, Hkv, s_tok, s_head, D, bs, tl);
    for (int64_t hq = 0; hq < Hq; ++hq) {
      const float* qh = q + hq * D;
      const float* kt = tl + (hq / G) * D * bs;
      float* sh = sc + hq * row + t0;
      for (int64_t d = 0; d < D; ++d) {
        const float qd = qh[d] * scale;
        const float* kd = kt + d * bs;
#pragma omp simd
        for (int64_t j = 0; j < bs; ++j) sh[j] += qd * kd[j];
      }
    }
  }
  for (int64_t hq = 0; hq < Hq; ++hq) {               // softmax in fp32, per head
    float* sh = sc + hq * row;
    float mx = -std::numeric_limits<float>::infinity(), sum = 0.f;
    for (int64_t t = 0; t < ctx; ++t) mx = std::max(mx, sh[t]);
    for (int64_t t = 0; t < ctx; ++t) {
      sh[t] = std::exp(sh[t] - mx);
      sum += sh[t];
    }
    const float inv = 1.f / sum;
    for (int64_t t = 0; t < ctx; ++t) sh[t] *= inv;
  }
  std::memset(out, 0, Hq * D * sizeof(float));
  for (int64_t bi = 0; bi < nblocks; ++bi) {          // out = sum of p * v
    const int64_t t0 = bi * bs, n = std::min(bs, ctx - t0);
    load_vals(vbase + table[bi] * s_blk, n, Hkv, s_tok, s_head, D, tl);
    for (int64_t hq = 0; hq < Hq; ++hq) {
      float* o = out + hq * D;
      const int64_t h = hq / G;
      for (int64_t j = 0; j < n; ++j) {
        const float p = sc[hq * row + t0 + j];
        const float* v = tl + (j * Hkv + h) * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) o[d] += p * v[d];
      }
    }
  }
}

#if defined(__AVX512F__)
// AVX-512 path for a bf16 cache with head_dim 64 (the common case): one (sequence, kv head)
// at a time, its G query heads in registers; keys and values converted 16 lanes at a time.
inline __m512 bf16x16(const at::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

inline __m512 exp512(__m512 x) {   // exp_approx of fused.cpp, 16 lanes
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3f)), _mm512_set1_ps(-87.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_add_ps(_mm512_sub_ps(x, _mm512_mul_ps(n, _mm512_set1_ps(0.693359375f))),
                                 _mm512_mul_ps(n, _mm512_set1_ps(2.12194440e-4f)));
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(p, r), r), r), _mm512_set1_ps(1.f));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

constexpr int kMaxG = 8;

bool decode_seq_avx512(const float* q, const at::BFloat16* kbase, const at::BFloat16* vbase,
                       const int64_t* table, int64_t ctx, int64_t bs, int64_t s_blk,
                       int64_t s_tok, int64_t s_head, int64_t Hq, int64_t Hkv, int64_t D,
                       float scale, float* out, std::vector<float>& scores) {
  const int64_t G = Hq / Hkv;
  if (D != 64 || G > kMaxG) return false;
  const int64_t nblocks = (ctx + bs - 1) / bs, row = nblocks * bs;
  scores.resize(G * row);
  for (int64_t h = 0; h < Hkv; ++h) {
    __m512 qv[kMaxG][4];
    for (int64_t g = 0; g < G; ++g)
      for (int c = 0; c < 4; ++c)
        qv[g][c] = _mm512_mul_ps(_mm512_loadu_ps(q + (h * G + g) * D + 16 * c), _mm512_set1_ps(scale));
    float mx[kMaxG];
    for (int64_t g = 0; g < G; ++g) mx[g] = -std::numeric_limits<float>::infinity();
    for (int64_t t = 0; t < ctx; ++t) {                // scores
      const at::BFloat16* k = kbase + table[t / bs] * s_blk + (t % bs) * s_tok + h * s_head;
      const __m512 k0 = bf16x16(k), k1 = bf16x16(k + 16), k2 = bf16x16(k + 32), k3 = bf16x16(k + 48);
      for (int64_t g = 0; g < G; ++g) {
        __m512 a = _mm512_mul_ps(qv[g][0], k0);
        a = _mm512_add_ps(a, _mm512_mul_ps(qv[g][1], k1));
        a = _mm512_add_ps(a, _mm512_mul_ps(qv[g][2], k2));
        a = _mm512_add_ps(a, _mm512_mul_ps(qv[g][3], k3));
        const float sc = _mm512_reduce_add_ps(a);
        scores[g * row + t] = sc;
        mx[g] = std::max(mx[g], sc);
      }
    }
    float inv[kMaxG];
    for (int64_t g = 0; g < G; ++g) {                 // softmax, 16 lanes at a time
      float* sg = scores.data() + g * row;
      const __m512 m = _mm512_set1_ps(mx[g]);
      __m512 sum = _mm512_setzero_ps();
      int64_t t = 0;
      for (; t + 16 <= ctx; t += 16) {
        const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(sg + t), m));
        _mm512_storeu_ps(sg + t, e);
        sum = _mm512_add_ps(sum, e);
      }
      if (t < ctx) {
        const __mmask16 tail = static_cast<__mmask16>((1u << (ctx - t)) - 1);
        const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, sg + t), m));
        _mm512_mask_storeu_ps(sg + t, tail, e);
        sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(tail, e));
      }
      inv[g] = 1.f / _mm512_reduce_add_ps(sum);
    }
    __m512 acc[kMaxG][4];
    for (int64_t g = 0; g < G; ++g)
      for (int c = 0; c < 4; ++c) acc[g][c] = _mm512_setzero_ps();
    for (int64_t t = 0; t < ctx; ++t) {                // out = sum of p * v
      const at::BFloat16* v = vbase + table[t / bs] * s_blk + (t % bs) * s_tok + h * s_head;
      const __m512 v0 = bf16x16(v), v1 = bf16x16(v + 16), v2 = bf16x16(v + 32), v3 = bf16x16(v + 48);
      for (int64_t g = 0; g < G; ++g) {
        const __m512 p = _mm512_set1_ps(scores[g * row + t]);
        acc[g][0] = _mm512_add_ps(acc[g][0], _mm512_mul_ps(p, v0));
        acc[g][1] = _mm512_add_ps(acc[g][1], _mm512_mul_ps(p, v1));
        acc[g][2] = _mm512_add_ps(acc[g][2], _mm512_mul_ps(p, v2));
        acc[g][3] = _mm512_add_ps(acc[g][3], _mm512_mul_ps(p, v3));
      }
    }
    for (int64_t g = 0; g < G; ++g)
      for (int c = 0; c < 4; ++c)
        _mm512_storeu_ps(out + (h * G + g) * D + 16 * c,
                         _mm512_mul_ps(acc[g][c], _mm512_set1_ps(inv[g])));
  }
  return true;
}
#endif

template <typename T>
void run(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc,
         const at::Tensor& tables, const at::Tensor& lens, double scale, at::Tensor& out) {
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = kc.size(2);
  const int64_t bs = kc.size(1), mb = tables.size(1);
  const float* qp = q.data_ptr<float>();
  const T* kp = kc.data_ptr<T>();
  const T* vp = vc.data_ptr<T>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, tile;
    for (int64_t b = begin; b < end; ++b) {
#if defined(__AVX512F__)
      if constexpr (std::is_same_v<T, at::BFloat16>) {
        if (decode_seq_avx512(qp + b * Hq * D, kp, vp, tp + b * mb, lp[b], bs, kc.stride(0),
                              kc.stride(1), kc.stride(2), Hq, Hkv, D, static_cast<float>(scale),
                              op + b * Hq * D, scores))
          continue;
      }
#endif
      decode_seq<T>(qp + b * Hq * D, kp, vp, tp + b * mb, lp[b], bs, kc.stride(0),
                    kc.stride(1), kc.stride(2), Hq, Hkv, D, static_cast<float>(scale),
                    op + b * Hq * D, scores, tile);
    }
  });
}

}  // namespace

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& block_tables, const at::Tensor& ctx_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat && q.is_contiguous(),
              "q must be a contiguous fp32 [B, Hq, D] tensor");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() &&
              k_cache.strides() == v_cache.strides(), "k/v caches must be [N, bs, Hkv, D] alike");
  TORCH_CHECK(k_cache.stride(3) == 1, "the cache's last (head_dim) dim must be contiguous");
  TORCH_CHECK(k_cache.size(3) == q.size(2) && q.size(1) % k_cache.size(2) == 0,
              "q heads must be a multiple of the cache's kv heads, with the same head_dim");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && block_tables.dim() == 2 &&
              block_tables.is_contiguous() && block_tables.size(0) == q.size(0),
              "block_tables must be contiguous int64 [B, max_blocks]");
  TORCH_CHECK(ctx_lens.scalar_type() == at::kLong && ctx_lens.numel() == q.size(0) &&
              ctx_lens.is_contiguous(), "ctx_lens must be contiguous int64 [B]");
  const int64_t* lp = ctx_lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < q.size(0); ++b)
    TORCH_CHECK(lp[b] >= 1 && lp[b] <= block_tables.size(1) * k_cache.size(1),
                "sequence ", b, " has ", lp[b], " tokens; its block table holds at most ",
                block_tables.size(1) * k_cache.size(1));
  auto out = at::empty_like(q);
  if (k_cache.scalar_type() == at::kBFloat16) {
    run<at::BFloat16>(q, k_cache, v_cache, block_tables, ctx_lens, scale, out);
  } else {
    TORCH_CHECK(k_cache.scalar_type() == at::kFloat, "the cache must be fp32 or bf16");
    run<float>(q, k_cache, v_cache, block_tables, ctx_lens, scale, out);
  }
  return out;
}
