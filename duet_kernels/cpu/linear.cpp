// bf16 linear (y = x @ W^T + b) for the CPU decode and prefill steps, on AVX-512 BF16.
//
// The weight is packed once, at load, into column blocks of 32 outputs:
//   packed [N/32][K/2][32][2] bf16   (N padded up to 32 with zero rows, K up to even)
// so one k-pair step of one block is two 64-byte vectors, and a block is one sequential
// stream. Each output is one fp32 accumulator fed by VDPBF16PS over k-pairs in increasing
// order, the same for every row, every batch size and every thread split (threads take
// whole column blocks; K is never split), then bias in fp32, then one round to bf16. So a
// row's result never depends on the rows beside it, and a batch of 1 streams the weights at
// the memory's speed (oneDNN's bf16 GEMM, even prepacked, spends ~40% more at batch 1 on
// the small per-layer matrices of a 135M model).
//   pack_bf16(w [N, K] bf16) -> packed
//   linear_bf16(x [M, K] bf16, packed, N, bias fp32 [N padded to 32] or None) -> y [M, N] bf16
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#define DUET_HAVE_AVX512BF16 1
#endif

namespace {

constexpr int64_t kBlock = 32;   // outputs per column block (two zmm of fp32 accumulators)

#ifdef DUET_HAVE_AVX512BF16
inline float bf16_to_f32(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// MR rows of x against one column block: 2*MR accumulators in registers (MR <= 8 keeps
// them, the two weight vectors and a broadcast within the 32 zmm registers)
template <int MR>
inline void block_rows(const uint16_t* __restrict x, int64_t sx, const uint16_t* __restrict wb,
                       int64_t KP, const float* bias, uint16_t* __restrict y, int64_t sy,
                       int64_t ncols) {
  __m512 acc[MR][2];
  for (int m = 0; m < MR; ++m) {
    acc[m][0] = _mm512_setzero_ps();
    acc[m][1] = _mm512_setzero_ps();
  }
  const int32_t* xi[MR];
  for (int m = 0; m < MR; ++m) xi[m] = reinterpret_cast<const int32_t*>(x + m * sx);
  for (int64_t kp = 0; kp < KP; ++kp) {
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wb + kp * 64);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(wb + kp * 64 + 32);
    _mm_prefetch(reinterpret_cast<const char*>(wb + kp * 64 + 1024), _MM_HINT_T0);
    for (int m = 0; m < MR; ++m) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(xi[m][kp]);
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], w0, xb);
      acc[m][1] = _mm512_dpbf16_ps(acc[m][1], w1, xb);
    }
  }
  __m512 b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps();
  if (bias != nullptr) {
    b0 = _mm512_loadu_ps(bias);
    b1 = _mm512_loadu_ps(bias + 16);
  }
  for (int m = 0; m < MR; ++m) {
    const __m256i lo = (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc[m][0], b0));
    const __m256i hi = (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc[m][1], b1));
    uint16_t* out = y + m * sy;
    if (ncols == kBlock) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), lo);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16), hi);
    } else {
      uint16_t tmp[kBlock];
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(tmp), lo);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(tmp + 16), hi);
      std::memcpy(out, tmp, ncols * sizeof(uint16_t));
    }
  }
}

using BlockFn = void (*)(const uint16_t*, int64_t, const uint16_t*, int64_t, const float*,
                         uint16_t*, int64_t, int64_t);
constexpr BlockFn kRows[9] = {nullptr, block_rows<1>, block_rows<2>, block_rows<3>,
                              block_rows<4>, block_rows<5>, block_rows<6>, block_rows<7>,
                              block_rows<8>};
#endif

}  // namespace

bool linear_bf16_supported() {
#ifdef DUET_HAVE_AVX512BF16
  return true;
#else
  return false;
#endif
}

at::Tensor pack_bf16(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16,
              "pack_bf16 wants a [N, K] bf16 weight, got ", w.sizes(), " ", w.scalar_type());
  const int64_t N = w.size(0), K = w.size(1);
  const int64_t NB = (N + kBlock - 1) / kBlock, KP = (K + 1) / 2;
  auto out = at::zeros({NB, KP, kBlock, 2}, w.options());
  const auto wc = w.contiguous();
  const uint16_t* src = reinterpret_cast<const uint16_t*>(wc.data_ptr());
  uint16_t* dst = reinterpret_cast<uint16_t*>(out.data_ptr());
  at::parallel_for(0, NB, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t j = 0; j < kBlock && b * kBlock + j < N; ++j) {
        const uint16_t* row = src + (b * kBlock + j) * K;
        uint16_t* base = dst + b * KP * kBlock * 2 + j * 2;
        for (int64_t k = 0; k < K; ++k) base[(k / 2) * kBlock * 2 + (k % 2)] = row[k];
      }
  });
  return out;
}

at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& packed, int64_t N,
                       const c10::optional<at::Tensor>& bias) {
#ifdef DUET_HAVE_AVX512BF16
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16,
              "linear_bf16 wants x as [M, K] bf16, got ", x.sizes(), " ", x.scalar_type());
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == kBlock && packed.size(3) == 2 &&
                  packed.is_contiguous(), "linear_bf16: packed is not from pack_bf16");
  const int64_t M = x.size(0), K = x.size(1), NB = packed.size(0), KP = packed.size(1);
  TORCH_CHECK(K % 2 == 0 && KP == K / 2, "linear_bf16: x has K=", K, ", the weight K=", 2 * KP);
  TORCH_CHECK(N > (NB - 1) * kBlock && N <= NB * kBlock, "linear_bf16: N=", N,
              " does not fit ", NB, " blocks");
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() &&
                    bias->numel() == NB * kBlock,
                "linear_bf16: bias must be fp32 padded to ", NB * kBlock, " values, got ",
                bias->numel(), " ", bias->scalar_type());
    bp = bias->data_ptr<float>();
  }
  const auto xc = x.contiguous();
  auto y = at::empty({M, N}, x.options());
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr());
  const uint16_t* w = reinterpret_cast<const uint16_t*>(packed.data_ptr());
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr());
  if (M == 0) return y;
  at::parallel_for(0, NB, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const uint16_t* wb = w + b * KP * kBlock * 2;
      const int64_t nc = std::min<int64_t>(kBlock, N - b * kBlock);
      const float* bb = bp == nullptr ? nullptr : bp + b * kBlock;
      for (int64_t m = 0; m < M; m += 8) {
        const int64_t mr = std::min<int64_t>(8, M - m);
        kRows[mr](xp + m * K, K, wb, KP, bb, yp + m * N + b * kBlock, N, nc);
      }
    }
  });
  return y;
#else
  TORCH_CHECK(false, "linear_bf16 needs AVX-512 BF16, which this build's CPU lacks");
#endif
}
