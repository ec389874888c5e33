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
bool linear_bf16_supported();
at::Tensor pack_bf16(const at::Tensor& w);
at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& packed, int64_t N,
                       const c10::optional<at::Tensor>& bias);

void bind_decode_stack(pybind11::module& m);
std::tuple<at::Tensor, at::Tensor> huff_encode(const at::Tensor& sym, const at::Tensor& codes,
                                               const at::Tensor& lens, int64_t tile);
at::Tensor huff_decode_bf16(const at::Tensor& words, const at::Tensor& offsets,
                            const at::Tensor& lut, int64_t max_len, const at::Tensor& raw,
                            int64_t n, int64_t tile);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "paged decode attention");
  m.def("rms_norm", &rms_norm, "RMSNorm as HF computes it");
  m.def("add_rms_norm", &add_rms_norm, "residual add, then RMSNorm");
  m.def("silu_mul", &silu_mul, "silu(gate) * up");
  m.def("rope_", &rope_, "rotary embedding, in place");
  m.def("linear_bf16_supported", &linear_bf16_supported, "built with AVX-512 BF16");
  m.def("pack_bf16", &pack_bf16, "a bf16 weight [N, K] in linear_bf16's blocked layout");
  m.def("linear_bf16", &linear_bf16, "x @ W^T (+ bias), bf16, batch-invariant",
        py::arg("x"), py::arg("packed"), py::arg("N"), py::arg("bias") = py::none());
  bind_decode_stack(m);
  m.def("huff_encode", &huff_encode, "canonical Huffman, tiled, MSB-first 32-bit words");
  m.def("huff_decode_bf16", &huff_decode_bf16, "symbol stream + raw plane -> bf16 bits");
}
