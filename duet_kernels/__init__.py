"""Duet's Triton kernels. Each public function runs Triton on CUDA tensors (or under
TRITON_INTERPRET=1) and its torch reference otherwise; `<name>_ref` / `<name>_triton`
pick one explicitly. Modules are named apart from the functions so both stay importable."""
from .activation import silu_and_mul, silu_and_mul_ref, silu_and_mul_triton
from .fused_moe import fused_moe, fused_moe_ref, fused_moe_triton
from .attention_decode import paged_decode_attention, paged_decode_attention_ref, paged_decode_attention_triton
from .attention_prefill import prefill_attention, prefill_attention_ref, prefill_attention_triton
from .kv_pack import pack_kv, pack_kv_ref, pack_kv_triton, unpack_kv, unpack_kv_ref, unpack_kv_triton
from .kv_write import write_kv, write_kv_ref, write_kv_triton
from .rmsnorm import fused_add_rmsnorm, fused_add_rmsnorm_ref, fused_add_rmsnorm_triton
from .rotary import build_cos_sin_cache, rope, rope_ref, rope_triton

__all__ = [
    "paged_decode_attention", "paged_decode_attention_ref", "paged_decode_attention_triton",
    "prefill_attention", "prefill_attention_ref", "prefill_attention_triton",
    "write_kv", "write_kv_ref", "write_kv_triton",
    "pack_kv", "pack_kv_ref", "pack_kv_triton", "unpack_kv", "unpack_kv_ref", "unpack_kv_triton",
    "fused_add_rmsnorm", "fused_add_rmsnorm_ref", "fused_add_rmsnorm_triton",
    "rope", "rope_ref", "rope_triton", "build_cos_sin_cache",
    "silu_and_mul", "silu_and_mul_ref", "silu_and_mul_triton",
    "fused_moe", "fused_moe_ref", "fused_moe_triton",
]
