// The C++ CPU kernels' entry points, shared by the bindings and the kernels that call each
// other (decode_stack.cpp runs the others layer by layer).
#pragma once

#include <torch/extension.h>

#include <string>
#include <tuple>

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& block_tables, const at::Tensor& ctx_lens, double scale);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps);
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& w, double eps);
at::Tensor silu_mul(const at::Tensor& x);
void rope_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
bool linear_bf16_supported();
std::string linear_bf16_isa();
at::Tensor pack_bf16(const at::Tensor& w);
at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& packed, int64_t N,
                       const c10::optional<at::Tensor>& bias);
std::tuple<at::Tensor, at::Tensor> huff_encode(const at::Tensor& sym, const at::Tensor& codes,
                                               const at::Tensor& lens, int64_t tile);
at::Tensor huff_decode_bf16(const at::Tensor& words, const at::Tensor& offsets,
                            const at::Tensor& lut, int64_t max_len, const at::Tensor& raw,
                            int64_t n, int64_t tile);
void bind_decode_stack(pybind11::module& m);
