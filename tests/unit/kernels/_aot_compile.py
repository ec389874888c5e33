"""Compile every kernel for an H100 (sm_90) without a GPU; run as a script by test_compile_sm90.

The interpreter never runs Triton's compiler, so type errors, unsupported constructs and
shared-memory overruns would only show on a GPU. Here each `*_triton` wrapper runs on
CPU tensors while its kernel's launch is intercepted and compiled with triton.compile
for GPUTarget("cuda", 90, 32) instead. Needs TRITON_INTERPRET unset (a fresh process).
"""
from __future__ import annotations

import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import duet_kernels
from duet_kernels import activation, attention_decode, attention_prefill, kv_pack, kv_write, rmsnorm, rotary

H100 = GPUTarget("cuda", 90, 32)
MAX_SMEM = 232448  # bytes of shared memory one H100 block may use
_TY = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32", torch.int64: "i64"}
failures: list[str] = []
compiled = 0


class _CompileInstead:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **meta)` compiles, launches nothing."""

    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        def launch(*args, num_warps=4, num_stages=3, **constexprs):
            global compiled
            sig = {}
            for name, a in zip(self.fn.arg_names, args):
                if isinstance(a, torch.Tensor):
                    sig[name] = "*" + _TY[a.dtype]
                elif isinstance(a, bool):
                    sig[name] = "i1"
                elif isinstance(a, int):
                    sig[name] = "i32" if abs(a) < 2 ** 31 else "i64"
                else:
                    sig[name] = "fp32"
            sig.update({name: "constexpr" for name in constexprs})
            label = f"{self.fn.__name__}{constexprs} warps={num_warps} stages={num_stages}"
            try:
                k = triton.compile(ASTSource(self.fn, sig, constexprs), target=H100,
                                   options={"num_warps": num_warps, "num_stages": num_stages})
                if not k.asm.get("cubin"):
                    failures.append(f"{label}: no cubin")
                elif k.metadata.shared > MAX_SMEM:
                    failures.append(f"{label}: {k.metadata.shared} B shared memory > {MAX_SMEM}")
                compiled += 1
            except Exception as e:  # report every failing kernel, not just the first
                failures.append(f"{label}: {type(e).__name__}: {str(e)[:1500]}")
        return launch


def _intercept():
    for mod in (activation, attention_decode, attention_prefill, kv_pack, kv_write, rmsnorm, rotary):
        for name, obj in list(vars(mod).items()):
            if isinstance(obj, triton.runtime.JITFunction) and name.endswith("_kernel"):
                setattr(mod, name, _CompileInstead(obj))


def _all_kernels(dt, Hq, Hkv, D, hidden, inter):
    bs = 16
    q = torch.zeros(4, Hq, D, dtype=dt)
    kc = torch.zeros(32, bs, Hkv, D, dtype=dt)
    bt, ctx = torch.zeros(4, 8, dtype=torch.int32), torch.zeros(4, dtype=torch.int32)
    duet_kernels.paged_decode_attention_triton(q, kc, kc, bt, ctx, 0.1)
    duet_kernels.paged_decode_attention_triton(q, kc, kc, bt, ctx, 0.1, block_n=128, num_warps=8, num_stages=3)
    duet_kernels.prefill_attention_triton(q, kc, kc, bt, torch.zeros(5, dtype=torch.int32), ctx, 0.1)
    duet_kernels.write_kv_triton(q[:, :Hkv], q[:, :Hkv], kc, kc, torch.zeros(4, dtype=torch.int64))
    cache = torch.zeros(2, 2, 4, bs, Hkv, D, dtype=dt)
    store = torch.zeros(4, 3, 2, bs, 2 * Hkv, D, dtype=dt)
    duet_kernels.pack_kv_triton(cache, store, [0], [1], 1, Hkv)
    duet_kernels.unpack_kv_triton(store, cache, [0], [1], 1, Hkv)
    x = torch.zeros(4, hidden, dtype=dt)
    duet_kernels.fused_add_rmsnorm_triton(x, x, torch.zeros(hidden, dtype=dt), 1e-5)
    duet_kernels.fused_add_rmsnorm_triton(x, None, torch.zeros(hidden, dtype=dt), 1e-5)
    duet_kernels.rope_triton(torch.zeros(4, dtype=torch.int64), q, q[:, :Hkv], torch.zeros(64, D))
    duet_kernels.silu_and_mul_triton(torch.zeros(4, 2 * inter, dtype=dt))


def main() -> int:
    _intercept()
    _all_kernels(torch.bfloat16, 9, 3, 64, 576, 1536)  # SmolLM2-135M
    _all_kernels(torch.bfloat16, 32, 8, 128, 4096, 14336)  # Llama-3-8B
    _all_kernels(torch.float32, 4, 4, 96, 8192, 1000)  # fp32, MHA, non-power-of-two head_dim
    _all_kernels(torch.float16, 8, 1, 256, 3072, 8192)  # fp16, large GQA group, head_dim 256
    print(f"compiled {compiled} kernels for sm_90, {len(failures)} failed")
    for f in failures:
        print("FAIL", f)
    return 1 if failures or not compiled else 0


if __name__ == "__main__":
    sys.exit(main())
