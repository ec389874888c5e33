// Every decoder layer of a decode-only step (each sequence one new token), bf16 on the CPU,
// in one call: the same kernels the Python path calls one by one (add_rms_norm, linear_bf16,
// rope_, the K/V write, paged_decode, silu_mul), in the same order and with the same
// roundings, so the hidden states are bit-identical to it. What goes away is ~15 Python
// calls, torch dispatches and temporary views per layer (~4 ms per step on SmolLM2's 30
// layers at batch 1 on this 2-core machine, a fifth of the step).
//
// DecodeStack(layers, heads, kv_heads, head_dim, eps, scale): layers is one tuple per layer
//   (input_norm [H], post_norm [H], qkv packed, qkv bias fp32 padded or None, o packed,
//    gate_up packed, down packed), each packed by pack_bf16.
// forward(x, residual or None, cos, sin, k_caches, v_caches, slot_block, slot_offset,
//         block_tables, ctx_lens) -> (the last layer's addition, the residual stream before it)
#include "kernels.h"

#include <cstring>
#include <tuple>
#include <vector>

namespace {

struct Layer {
  at::Tensor input_norm, post_norm, qkv, o, gate_up, down;
  c10::optional<at::Tensor> qkv_bias;
};

// cache[block, offset, h, :] = src[b, h, :] for each sequence b (caches [N, bs, Hkv, D],
// strided like the store's layout; src [B, Hkv, D] with a contiguous last dim)
void write_kv(const at::Tensor& src, at::Tensor& cache, const int64_t* blocks,
              const int64_t* offsets) {
  const int64_t B = src.size(0), H = src.size(1), D = src.size(2);
  const auto* s = reinterpret_cast<const uint16_t*>(src.data_ptr());
  auto* c = reinterpret_cast<uint16_t*>(cache.data_ptr());
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      std::memcpy(c + blocks[b] * cache.stride(0) + offsets[b] * cache.stride(1) +
                      h * cache.stride(2),
                  s + b * src.stride(0) + h * src.stride(1), D * sizeof(uint16_t));
}

}  // namespace

class DecodeStack {
 public:
  DecodeStack(const std::vector<std::vector<c10::optional<at::Tensor>>>& layers, int64_t heads,
              int64_t kv_heads, int64_t head_dim, double eps, double scale)
      : hq_(heads), hkv_(kv_heads), d_(head_dim), eps_(eps), scale_(scale) {
    for (const auto& t : layers) {
      TORCH_CHECK(t.size() == 7, "a layer is 7 tensors, got ", t.size());
      Layer l;
      l.input_norm = *t[0];
      l.post_norm = *t[1];
      l.qkv = *t[2];
      l.qkv_bias = t[3];
      l.o = *t[4];
      l.gate_up = *t[5];
      l.down = *t[6];
      layers_.push_back(l);
    }
    hidden_ = layers_.empty() ? 0 : layers_[0].input_norm.numel();
    // the intermediate size is down_proj's K, two per k-pair of its packing
    inter_ = layers_.empty() ? 0 : layers_[0].down.size(1) * 2;
  }

  std::tuple<at::Tensor, at::Tensor> forward(
      at::Tensor x, c10::optional<at::Tensor> residual, const at::Tensor& cos,
      const at::Tensor& sin, const std::vector<at::Tensor>& k_caches,
      const std::vector<at::Tensor>& v_caches, const at::Tensor& slot_block,
      const at::Tensor& slot_offset, const at::Tensor& block_tables, const at::Tensor& ctx_lens) {
    const int64_t L = static_cast<int64_t>(layers_.size());
    TORCH_CHECK(static_cast<int64_t>(k_caches.size()) == L &&
                    static_cast<int64_t>(v_caches.size()) == L,
                "one K and one V cache per layer: ", L, " layers, ", k_caches.size(), " caches");
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.size(1) == hidden_,
                "x must be bf16 [B, ", hidden_, "]");
    const int64_t B = x.size(0);
    TORCH_CHECK(slot_block.scalar_type() == at::kLong && slot_block.is_contiguous() &&
                    slot_block.numel() == B && slot_offset.scalar_type() == at::kLong &&
                    slot_offset.is_contiguous() && slot_offset.numel() == B,
                "slot_block/slot_offset must be contiguous int64 [B]");
    const int64_t* sb = slot_block.data_ptr<int64_t>();
    const int64_t* so = slot_offset.data_ptr<int64_t>();
    for (int64_t l = 0; l < L; ++l) {
      TORCH_CHECK(k_caches[l].scalar_type() == at::kBFloat16 && k_caches[l].stride(3) == 1 &&
                      k_caches[l].size(2) == hkv_ && k_caches[l].size(3) == d_ &&
                      v_caches[l].strides() == k_caches[l].strides(),
                  "layer ", l, "'s caches must be bf16 [N, bs, ", hkv_, ", ", d_, "] alike");
      for (int64_t b = 0; b < B; ++b)
        TORCH_CHECK(sb[b] >= 0 && sb[b] < k_caches[l].size(0) && so[b] >= 0 &&
                        so[b] < k_caches[l].size(1),
                    "sequence ", b, "'s slot (", sb[b], ", ", so[b], ") is outside the cache");
    }
    const int64_t nq = hq_ * d_, nkv = hkv_ * d_;
    at::Tensor res = residual.has_value() ? *residual : at::Tensor();
    for (int64_t l = 0; l < L; ++l) {
      const Layer& w = layers_[l];
      at::Tensor h;
      if (res.defined()) {
        std::tie(h, res) = add_rms_norm(x, res, w.input_norm, eps_);
      } else {
        h = rms_norm(x, w.input_norm, eps_);
        res = x;
      }
      at::Tensor qkv = linear_bf16(h, w.qkv, nq + 2 * nkv, w.qkv_bias);
      at::Tensor q = qkv.narrow(1, 0, nq).view({B, hq_, d_});
      at::Tensor k = qkv.narrow(1, nq, nkv).view({B, hkv_, d_});
      at::Tensor v = qkv.narrow(1, nq + nkv, nkv).view({B, hkv_, d_});
      rope_(q, cos, sin);
      rope_(k, cos, sin);
      at::Tensor kc = k_caches[l], vc = v_caches[l];
      write_kv(k, kc, sb, so);
      write_kv(v, vc, sb, so);
      at::Tensor attn = paged_decode(q.to(at::kFloat).contiguous(), kc, vc, block_tables,
                                     ctx_lens, scale_)
                            .to(at::kBFloat16)
                            .view({B, nq});
      x = linear_bf16(attn, w.o, hidden_, c10::nullopt);
      std::tie(h, res) = add_rms_norm(x, res, w.post_norm, eps_);
      at::Tensor act = silu_mul(linear_bf16(h, w.gate_up, 2 * inter_, c10::nullopt));
      x = linear_bf16(act, w.down, hidden_, c10::nullopt);
    }
    return {x, res};
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

 private:
  std::vector<Layer> layers_;
  int64_t hq_, hkv_, d_;
  double eps_, scale_;
  int64_t hidden_ = 0, inter_ = 0;
};

void bind_decode_stack(pybind11::module& m) {
  pybind11::class_<DecodeStack>(m, "DecodeStack")
      .def(pybind11::init<const std::vector<std::vector<c10::optional<at::Tensor>>>&, int64_t,
                          int64_t, int64_t, double, double>())
      .def("forward", &DecodeStack::forward)
      .def_property_readonly("num_layers", &DecodeStack::num_layers);
}
