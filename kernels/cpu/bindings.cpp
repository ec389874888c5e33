// The Python module of the CPU kernels (kernels/cpu_kernels.py builds and loads it).
#include <torch/extension.h>

#include <tuple>

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& block_tables, const at::Tensor& ctx_lens, double scale);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps);
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& w, double eps);
at::Tensor silu_mul(const at::Tensor& x);
void rope_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "paged decode attention");
  m.def("rms_norm", &rms_norm, "RMSNorm as HF computes it");
  m.def("add_rms_norm", &add_rms_norm, "residual add, then RMSNorm");
  m.def("silu_mul", &silu_mul, "silu(gate) * up");
  m.def("rope_", &rope_, "rotary embedding, in place");
}
