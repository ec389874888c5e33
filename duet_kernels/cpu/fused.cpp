// Fused elementwise ops for the CPU decode/prefill step: each replaces several torch ops
// (and their dispatch) with one pass over the data, rounding exactly where the torch
// reference rounds, so results match it bit for bit except inside reductions.
//   rms_norm(x, w, eps)                 w * (x.float() * rsqrt(mean(x^2) + eps)).to(x.dtype)
//   add_rms_norm(x, residual, w, eps)   residual' = x + residual; (rms_norm(residual'), residual')
//   silu_mul(gate_up)                   silu(gate) * up, gate_up = [gate | up] on the last dim
//   rope_(x, cos, sin)                  in place: x * cos + rotate_half(x) * sin
// Tensors are [T, ...] with a contiguous last dim; dtypes fp32 or bf16 (cos/sin fp32).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

namespace {

inline float f32(float x) { return x; }
inline float f32(at::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
// round to the storage type the way torch does (bf16: round to nearest even)
template <typename T> inline T store(float x);
template <> inline float store<float>(float x) { return x; }
template <> inline at::BFloat16 store<at::BFloat16>(float x) { return at::BFloat16(x); }
// a value rounded through T and back (what a torch op producing T leaves behind)
template <typename T> inline float rnd(float x) { return f32(store<T>(x)); }

template <typename T>
void rms_norm_rows(const T* x, const T* residual, const T* w, T* out, T* res_out, int64_t rows,
                   int64_t H, int64_t sx, int64_t sr, int64_t so, int64_t sro, float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> h(H);
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * sx;
      float ss = 0.f;
      for (int64_t i = 0; i < H; ++i) {
        float v = f32(xr[i]);
        if (residual != nullptr) {
          v = rnd<T>(v + f32(residual[r * sr + i]));
          res_out[r * sro + i] = store<T>(v);
        }
        h[i] = v;
        ss += v * v;
      }
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(H) + eps);
      T* o = out + r * so;
      for (int64_t i = 0; i < H; ++i) o[i] = store<T>(f32(w[i]) * rnd<T>(h[i] * inv));
    }
  });
}

// exp(x) for float, within 2 ulp: Cody-Waite range reduction, a degree-6 polynomial, the
// exponent set by integer arithmetic; branch-free, so `omp simd` loops vectorize it
inline float exp_approx(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);   // n <= 127: a finite scale
  const float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;   // round to nearest
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// bf16 <-> fp32 by bit arithmetic (round to nearest even; finite values), vectorizable
inline float bf16_bits_to_f32(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline uint16_t f32_to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

void silu_mul_f32(const float* x, float* out, int64_t rows, int64_t I, int64_t sx, int64_t so) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* g = x + r * sx;
      const float* u = g + I;
      float* o = out + r * so;
#pragma omp simd
      for (int64_t i = 0; i < I; ++i) o[i] = (g[i] / (1.f + exp_approx(-g[i]))) * u[i];
    }
  });
}

void silu_mul_bf16(const uint16_t* x, uint16_t* out, int64_t rows, int64_t I, int64_t sx,
                   int64_t so) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const uint16_t* g = x + r * sx;
      const uint16_t* u = g + I;
      uint16_t* o = out + r * so;
#pragma omp simd
      for (int64_t i = 0; i < I; ++i) {
        const float gv = bf16_bits_to_f32(g[i]);
        // torch: silu rounded to bf16, then the product rounded
        const float s = bf16_bits_to_f32(f32_to_bf16_bits(gv / (1.f + exp_approx(-gv))));
        o[i] = f32_to_bf16_bits(s * bf16_bits_to_f32(u[i]));
      }
    }
  });
}

template <typename T>
void rope_rows(T* x, const float* cos, const float* sin, int64_t T_, int64_t Hn, int64_t D,
               int64_t s_tok, int64_t s_head, int64_t s_cs) {
  const int64_t half = D / 2;
  at::parallel_for(0, T_, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> v(D);
    for (int64_t t = begin; t < end; ++t) {
      const float* c = cos + t * s_cs;
      const float* s = sin + t * s_cs;
      for (int64_t h = 0; h < Hn; ++h) {
        T* xr = x + t * s_tok + h * s_head;
        for (int64_t d = 0; d < D; ++d) v[d] = f32(xr[d]);
        for (int64_t d = 0; d < D; ++d) {
          // torch: cos/sin cast to x's dtype; x*cos and rot*sin each rounded, then the sum
          const float rot = d < half ? -v[d + half] : v[d - half];
          const float a = rnd<T>(v[d] * rnd<T>(c[d]));
          const float b = rnd<T>(rot * rnd<T>(s[d]));
          xr[d] = store<T>(a + b);
        }
      }
    }
  });
}

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1, name, " must be [rows, H] with a contiguous last dim");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16,
              name, " must be fp32 or bf16");
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  check_rows(x, "x");
  TORCH_CHECK(w.is_contiguous() && w.numel() == x.size(1) && w.scalar_type() == x.scalar_type(),
              "w must be [H] of x's dtype");
  auto out = at::empty_like(x, at::MemoryFormat::Contiguous);
  AT_DISPATCH_SWITCH(x.scalar_type(), "rms_norm",
    AT_DISPATCH_CASE(at::kFloat, [&] {
      rms_norm_rows<float>(x.data_ptr<float>(), nullptr, w.data_ptr<float>(), out.data_ptr<float>(),
                           nullptr, x.size(0), x.size(1), x.stride(0), 0, out.stride(0), 0, eps); })
    AT_DISPATCH_CASE(at::kBFloat16, [&] {
      using T = at::BFloat16;
      rms_norm_rows<T>(x.data_ptr<T>(), nullptr, w.data_ptr<T>(), out.data_ptr<T>(), nullptr,
                       x.size(0), x.size(1), x.stride(0), 0, out.stride(0), 0, eps); }));
  return out;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& w, double eps) {
  check_rows(x, "x");
  check_rows(residual, "residual");
  TORCH_CHECK(x.sizes() == residual.sizes() && x.scalar_type() == residual.scalar_type(),
              "x and residual must match");
  TORCH_CHECK(w.is_contiguous() && w.numel() == x.size(1) && w.scalar_type() == x.scalar_type(),
              "w must be [H] of x's dtype");
  auto out = at::empty_like(x, at::MemoryFormat::Contiguous);
  auto res = at::empty_like(x, at::MemoryFormat::Contiguous);
  AT_DISPATCH_SWITCH(x.scalar_type(), "add_rms_norm",
    AT_DISPATCH_CASE(at::kFloat, [&] {
      rms_norm_rows<float>(x.data_ptr<float>(), residual.data_ptr<float>(), w.data_ptr<float>(),
                           out.data_ptr<float>(), res.data_ptr<float>(), x.size(0), x.size(1),
                           x.stride(0), residual.stride(0), out.stride(0), res.stride(0), eps); })
    AT_DISPATCH_CASE(at::kBFloat16, [&] {
      using T = at::BFloat16;
      rms_norm_rows<T>(x.data_ptr<T>(), residual.data_ptr<T>(), w.data_ptr<T>(),
                       out.data_ptr<T>(), res.data_ptr<T>(), x.size(0), x.size(1), x.stride(0),
                       residual.stride(0), out.stride(0), res.stride(0), eps); }));
  return {out, res};
}

at::Tensor silu_mul(const at::Tensor& x) {
  check_rows(x, "gate_up");
  TORCH_CHECK(x.size(1) % 2 == 0, "gate_up's last dim must be even");
  const int64_t I = x.size(1) / 2;
  auto out = at::empty({x.size(0), I}, x.options());
  if (x.scalar_type() == at::kBFloat16) {
    silu_mul_bf16(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()),
                  reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()), x.size(0), I,
                  x.stride(0), out.stride(0));
  } else {
    silu_mul_f32(x.data_ptr<float>(), out.data_ptr<float>(), x.size(0), I, x.stride(0),
                 out.stride(0));
  }
  return out;
}

void rope_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1, "x must be [T, heads, D] with a contiguous last dim");
  TORCH_CHECK(x.size(2) % 2 == 0, "head_dim must be even");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat &&
              cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.stride(1) == 1 &&
              sin.strides() == cos.strides() && cos.size(0) == x.size(0) && cos.size(1) == x.size(2),
              "cos/sin must be fp32 [T, D] alike");
  AT_DISPATCH_SWITCH(x.scalar_type(), "rope_",
    AT_DISPATCH_CASE(at::kFloat, [&] {
      rope_rows<float>(x.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>(),
                       x.size(0), x.size(1), x.size(2), x.stride(0), x.stride(1), cos.stride(0)); })
    AT_DISPATCH_CASE(at::kBFloat16, [&] {
      using T = at::BFloat16;
      rope_rows<T>(x.data_ptr<T>(), cos.data_ptr<float>(), sin.data_ptr<float>(), x.size(0),
                   x.size(1), x.size(2), x.stride(0), x.stride(1), cos.stride(0)); }));
}
