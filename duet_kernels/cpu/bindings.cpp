// The Python module of the CPU kernels (duet_kernels/cpu_kernels.py builds and loads it).
#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "paged decode attention");
  m.def("rms_norm", &rms_norm, "RMSNorm as HF computes it");
  m.def("add_rms_norm", &add_rms_norm, "residual add, then RMSNorm");
  m.def("silu_mul", &silu_mul, "silu(gate) * up");
  m.def("rope_", &rope_, "rotary embedding, in place");
  m.def("linear_bf16_supported", &linear_bf16_supported, "built with AVX-512 BF16 or AVX2+FMA");
  m.def("linear_bf16_isa", &linear_bf16_isa, "avx512_bf16, avx2_fma or empty");
  m.def("pack_bf16", &pack_bf16, "a bf16 weight [N, K] in linear_bf16's blocked layout");
  m.def("linear_bf16", &linear_bf16, "x @ W^T (+ bias), bf16, batch-invariant",
        py::arg("x"), py::arg("packed"), py::arg("N"), py::arg("bias") = py::none());
  bind_decode_stack(m);
  m.def("huff_encode", &huff_encode, "canonical Huffman, tiled, MSB-first 32-bit words");
  m.def("huff_decode_bf16", &huff_decode_bf16, "symbol stream + raw plane -> bf16 bits");
}
