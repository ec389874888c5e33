// bf16 linear (y = x @ W^T + b) for the CPU decode and prefill steps: AVX-512 BF16 where the
// CPU has it, AVX2 + FMA elsewhere (most laptops and servers before Sapphire Rapids / Zen 4).
//
// The weight is packed once, at load, into column blocks of 32 outputs:
//   packed [N/32][K/2][32][2] bf16   (N padded up to 32 with zero rows, K up to even)
// so one k-pair step of one block is 128 contiguous bytes, and a block is one sequential
// stream. Each output is one fp32 accumulator fed over k in increasing order, the same for
// every row, every batch size and every thread split (threads take whole column blocks; K
// is never split), then bias in fp32, then one round to bf16 (nearest even). So a row's
// result never depends on the rows beside it, and a batch of 1 streams the weights at the
// memory's speed.
//   AVX-512 BF16: VDPBF16PS over k-pairs (two zmm of accumulators per block).
//   AVX2: the pair split into its even and odd halves as fp32 (a shift, a mask), two FMAs
//         (bf16 x bf16 products are exact in fp32, so each FMA rounds once, like a sum);
//         x converted to fp32 once per call. Four ymm of accumulators per block and row.
// (Results differ between the two instruction sets in the last bits; on one machine they
// never depend on the batch.)
//   pack_bf16(w [N, K] bf16) -> packed
//   linear_bf16(x [M, K] bf16, packed, N, bias fp32 [N padded to 32] or None) -> y [M, N] bf16
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#define DUET_HAVE_AVX512BF16 1
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define DUET_HAVE_AVX2_FMA 1
#endif

namespace {

constexpr int64_t kBlock = 32;   // outputs per column block

#ifdef DUET_HAVE_AVX512BF16
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
#endif

#ifdef DUET_HAVE_AVX2_FMA
// fp32 -> bf16, round to nearest even, NaN to the quiet NaN torch makes (0x7fc0): 8 lanes
// in, 8 uint16 in the low halves of the 32-bit lanes out
inline __m256i round_bf16(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)),
                                                 lsb), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
}

// 16 bf16 in order from two 8-lane results
inline __m256i pack16(__m256i a, __m256i b) {
  return _mm256_permute4x64_epi64(_mm256_packus_epi32(a, b), 0xD8);
}

// Store MR rows of G groups of 8 outputs (acc + bias, rounded), ncols of them valid.
template <int MR, int G>
inline void store_rows(__m256 (&acc)[MR][G], const float* bias, uint16_t* __restrict y,
                       int64_t sy, int64_t ncols) {
  __m256 b[G];
  for (int c = 0; c < G; ++c) b[c] = bias != nullptr ? _mm256_loadu_ps(bias + 8 * c)
                                                      : _mm256_setzero_ps();
  for (int m = 0; m < MR; ++m) {
    uint16_t tmp[8 * G];
    for (int c = 0; c < G; c += 2) {
      const __m256i v = pack16(round_bf16(_mm256_add_ps(acc[m][c], b[c])),
                               round_bf16(_mm256_add_ps(acc[m][c + 1], b[c + 1])));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(tmp + 8 * c), v);
    }
    std::memcpy(y + m * sy, tmp, std::min<int64_t>(ncols, 8 * G) * sizeof(uint16_t));
  }
}

// MR rows of x (fp32, converted once) against G groups of 8 outputs of one column block,
// starting at group g0 (G = 4: the whole block in one pass, for a few rows; G = 2: half of
// it, so 6 rows' accumulators, the weights and a broadcast fit the 16 ymm registers). Each
// output's arithmetic is the same in every variant: acc = fma(w[k], x[k], acc), k in order.
template <int MR, int G>
inline void block_rows(const float* __restrict x, int64_t sx, const uint16_t* __restrict wb,
                       int64_t KP, int g0, const float* bias, uint16_t* __restrict y, int64_t sy,
                       int64_t ncols) {
  __m256 acc[MR][G];
  for (int m = 0; m < MR; ++m)
    for (int c = 0; c < G; ++c) acc[m][c] = _mm256_setzero_ps();
  const __m256i hi_mask = _mm256_set1_epi32(static_cast<int32_t>(0xffff0000u));
  for (int64_t kp = 0; kp < KP; ++kp) {
    const uint16_t* w = wb + kp * 64 + 16 * g0;
    _mm_prefetch(reinterpret_cast<const char*>(w + 1024), _MM_HINT_T0);
    if (G == 4) _mm_prefetch(reinterpret_cast<const char*>(w + 1024 + 32), _MM_HINT_T0);
    __m256 we[G];
    for (int c = 0; c < G; ++c)   // each 32-bit lane a (k even, k odd) pair of one output
      we[c] = _mm256_castsi256_ps(_mm256_slli_epi32(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 16 * c)), 16));
    for (int m = 0; m < MR; ++m) {
      const __m256 xe = _mm256_broadcast_ss(x + m * sx + 2 * kp);
      for (int c = 0; c < G; ++c) acc[m][c] = _mm256_fmadd_ps(we[c], xe, acc[m][c]);
    }
    for (int c = 0; c < G; ++c)
      we[c] = _mm256_castsi256_ps(_mm256_and_si256(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 16 * c)), hi_mask));
    for (int m = 0; m < MR; ++m) {
      const __m256 xo = _mm256_broadcast_ss(x + m * sx + 2 * kp + 1);
      for (int c = 0; c < G; ++c) acc[m][c] = _mm256_fmadd_ps(we[c], xo, acc[m][c]);
    }
  }
  __m256 done[MR][G];   // a copy: acc itself must never escape, or GCC keeps it in memory
  for (int m = 0; m < MR; ++m)
    for (int c = 0; c < G; ++c) done[m][c] = acc[m][c];
  store_rows<MR, G>(done, bias == nullptr ? nullptr : bias + 8 * g0, y + 8 * g0, sy,
                    ncols - 8 * g0);
}

// Six rows against 16 outputs (groups g0, g0+1 of one column block), the accumulators as
// twelve named registers: GCC keeps an array of them in memory, storing it every step.
// Rows past `rows` read row 0 again and are not stored. Same arithmetic as block_rows.
inline void half_block_6(const float* __restrict x, int64_t sx, const uint16_t* __restrict wb,
                         int64_t KP, int g0, int rows, const float* bias, uint16_t* __restrict y,
                         int64_t sy, int64_t ncols) {
  const float* r[6];
  for (int m = 0; m < 6; ++m) r[m] = x + (m < rows ? m : 0) * sx;
  __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00,
         a30 = a00, a31 = a00, a40 = a00, a41 = a00, a50 = a00, a51 = a00;
  const __m256i hi_mask = _mm256_set1_epi32(static_cast<int32_t>(0xffff0000u));
  const uint16_t* w = wb + 16 * g0;
  for (int64_t kp = 0; kp < KP; ++kp, w += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(w + 1024), _MM_HINT_T0);
    const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
    const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 16));
    __m256 w0 = _mm256_castsi256_ps(_mm256_slli_epi32(v0, 16));
    __m256 w1 = _mm256_castsi256_ps(_mm256_slli_epi32(v1, 16));
    const int64_t e = 2 * kp;
#define DUET_ROW(m, A0, A1)                                 \
    {                                                         \
      const __m256 xb = _mm256_broadcast_ss(r[m] + e);        \
      A0 = _mm256_fmadd_ps(w0, xb, A0);                       \
      A1 = _mm256_fmadd_ps(w1, xb, A1);                       \
    }
    DUET_ROW(0, a00, a01) DUET_ROW(1, a10, a11) DUET_ROW(2, a20, a21)
    DUET_ROW(3, a30, a31) DUET_ROW(4, a40, a41) DUET_ROW(5, a50, a51)
    w0 = _mm256_castsi256_ps(_mm256_and_si256(v0, hi_mask));
    w1 = _mm256_castsi256_ps(_mm256_and_si256(v1, hi_mask));
#undef DUET_ROW
#define DUET_ROW(m, A0, A1)                                 \
    {                                                         \
      const __m256 xb = _mm256_broadcast_ss(r[m] + e + 1);    \
      A0 = _mm256_fmadd_ps(w0, xb, A0);                       \
      A1 = _mm256_fmadd_ps(w1, xb, A1);                       \
    }
    DUET_ROW(0, a00, a01) DUET_ROW(1, a10, a11) DUET_ROW(2, a20, a21)
    DUET_ROW(3, a30, a31) DUET_ROW(4, a40, a41) DUET_ROW(5, a50, a51)
#undef DUET_ROW
  }
  __m256 done[6][2] = {{a00, a01}, {a10, a11}, {a20, a21}, {a30, a31}, {a40, a41}, {a50, a51}};
  const float* b = bias == nullptr ? nullptr : bias + 8 * g0;
  uint16_t* out = y + 8 * g0;
  const int64_t nc = ncols - 8 * g0;
  switch (rows) {   // store_rows wants the row count at compile time
    case 1: store_rows<1, 2>(reinterpret_cast<__m256(&)[1][2]>(done), b, out, sy, nc); break;
    case 2: store_rows<2, 2>(reinterpret_cast<__m256(&)[2][2]>(done), b, out, sy, nc); break;
    case 3: store_rows<3, 2>(reinterpret_cast<__m256(&)[3][2]>(done), b, out, sy, nc); break;
    case 4: store_rows<4, 2>(reinterpret_cast<__m256(&)[4][2]>(done), b, out, sy, nc); break;
    case 5: store_rows<5, 2>(reinterpret_cast<__m256(&)[5][2]>(done), b, out, sy, nc); break;
    default: store_rows<6, 2>(done, b, out, sy, nc);
  }
}

constexpr int64_t kPanelBytes = 192 * 1024;   // fp32 rows of x kept in L2 at a time

// M rows of one column block: tiles of 6 rows in two half-block passes each, and a last
// tile of up to 3 rows (all of a decode step's few rows) in one pass over the whole block
inline void block_all_rows(const float* x, int64_t K, const uint16_t* wb, int64_t KP,
                           const float* bias, uint16_t* y, int64_t N, int64_t M, int64_t nc) {
  using Full = void (*)(const float*, int64_t, const uint16_t*, int64_t, int, const float*,
                        uint16_t*, int64_t, int64_t);
  constexpr Full full[4] = {nullptr, block_rows<1, 4>, block_rows<2, 4>, block_rows<3, 4>};
  const int64_t rem = M % 6 <= 3 ? M % 6 : 0;   // a short last tile: one pass, not two
  for (int g0 = 0; g0 < 4 && 8 * g0 < nc; g0 += 2)
    for (int64_t m = 0; m < M - rem; m += 6)
      half_block_6(x + m * K, K, wb, KP, g0, static_cast<int>(std::min<int64_t>(6, M - m)),
                   bias, y + m * N, N, nc);
  if (rem > 0) full[rem](x + (M - rem) * K, K, wb, KP, 0, bias, y + (M - rem) * N, N, nc);
}
#endif

#if defined(DUET_HAVE_AVX512BF16) || defined(DUET_HAVE_AVX2_FMA)
#define DUET_HAVE_LINEAR 1
#endif
#ifdef DUET_HAVE_AVX512BF16
using BlockFn = void (*)(const uint16_t*, int64_t, const uint16_t*, int64_t, const float*,
                         uint16_t*, int64_t, int64_t);
constexpr BlockFn kRows[9] = {nullptr, block_rows<1>, block_rows<2>, block_rows<3>,
                              block_rows<4>, block_rows<5>, block_rows<6>, block_rows<7>,
                              block_rows<8>};
#endif

}  // namespace

bool linear_bf16_supported() {
#ifdef DUET_HAVE_LINEAR
  return true;
#else
  return false;
#endif
}

std::string linear_bf16_isa() {
#if defined(DUET_HAVE_AVX512BF16)
  return "avx512_bf16";
#elif defined(DUET_HAVE_AVX2_FMA)
  return "avx2_fma";
#else
  return "";
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
#ifdef DUET_HAVE_LINEAR
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
  auto y = at::empty({M, N}, x.options());
  if (M == 0) return y;
#ifdef DUET_HAVE_AVX512BF16
  const auto xc = x.contiguous();
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr());
#else
  const auto xc = x.to(at::kFloat).contiguous();   // exact: every bf16 is an fp32
  const float* xp = xc.data_ptr<float>();
#endif
  const uint16_t* w = reinterpret_cast<const uint16_t*>(packed.data_ptr());
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr());
#ifdef DUET_HAVE_AVX512BF16
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
#else
  // panels of rows that stay in L2 (fp32 x: 48 rows of K=1536 are 288 KB) while a thread
  // runs its column blocks over them; a row's sums are the same whatever the panel
  const int64_t panel = std::max<int64_t>(6, (kPanelBytes / (K * 4)) / 6 * 6);
  at::parallel_for(0, NB, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t m0 = 0; m0 < M; m0 += panel) {
      const int64_t mp = std::min<int64_t>(panel, M - m0);
      for (int64_t b = b0; b < b1; ++b) {
        const float* bb = bp == nullptr ? nullptr : bp + b * kBlock;
        block_all_rows(xp + m0 * K, K, w + b * KP * kBlock * 2, KP, bb,
                       yp + m0 * N + b * kBlock, N, mp, std::min<int64_t>(kBlock, N - b * kBlock));
      }
    }
  });
#endif
  return y;
#else
  TORCH_CHECK(false, "linear_bf16 needs AVX-512 BF16 or AVX2 with FMA, which this build's "
                     "CPU lacks");
#endif
}
