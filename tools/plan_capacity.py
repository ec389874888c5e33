"""Paper plan: weight memory, KV bytes per token and KV capacity of a frontier model on a
GPU group, computed from its published config (nothing here runs a model).

    python tools/plan_capacity.py            # the tables in docs/frontier_deployments.md
    python tools/plan_capacity.py --json F   # the same numbers as JSON

Counts are parameters from the configs' shapes; bytes use the checkpoint's storage
(bf16 = 2 B; INT4 with one bf16 scale per 32 values = 4.5 bits); GiB = 2**30 B. The
compressed rows apply Duet's measured bf16 codec ratio (results/bench_compression.json)
to bf16 tensors only: the codec codes bf16 exponents and does not apply to packed INT4.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field

GIB = 2 ** 30
BF16 = 2.0
INT4_G32 = 0.5 + 2.0 / 32          # bytes per value: a nibble plus a bf16 scale per 32
CODEC_RATIO = 0.67                  # Duet's bf16 codec, measured: 0.663-0.678 of bf16
OVERHEAD_GIB = {"H100": 4.0, "H200": 6.0}   # activations, CUDA graphs, NCCL/all-to-all buffers
CARD_GIB = {"H100": 79.6, "H200": 139.0}     # what torch reports as usable on each card


@dataclass
class Part:
    """A class of weights: its parameter count, bytes per value, and how a group holds it
    ('shard': split over the group, 'replicate': a copy on every GPU)."""
    name: str
    params: float
    bytes_per: float
    placement: str = "shard"
    codec: bool = True       # bf16: Duet's codec applies


@dataclass
class Model:
    name: str
    parts: list[Part]
    kv_bytes_per_token_layer: list[float]   # per layer, the whole model's (all KV heads)
    kv_head_sharded: bool                   # GQA heads split over TP; MLA's latent is not
    window: list[int | None] = field(default_factory=list)   # per layer: tokens kept (None: all)

    def kv_bytes(self, context: int, tp: int, cp: int = 1) -> float:
        """KV bytes one sequence of `context` tokens needs on one GPU of a TP group (cp: the
        sequence's tokens spread over cp ranks, context-parallel decode)."""
        total = 0.0
        for i, per in enumerate(self.kv_bytes_per_token_layer):
            win = self.window[i] if self.window else None
            tokens = min(context, win) if win else context
            total += per * tokens
        share = tp if self.kv_head_sharded else cp
        return total / share


def kimi_k25() -> Model:
    """Kimi K2.5's text model (DeepSeek-V3 shape): 61 layers (the first dense), hidden 7168,
    64 heads, MLA (q_lora 1536, kv_lora 512, rope 64, nope 128, v 128), 384 routed experts
    of 2048 (top 8) + 1 shared, vocab 163840; routed experts shipped as INT4 (group 32)."""
    h, layers, moe_layers, heads = 7168, 61, 60, 64
    attn = (h * 1536 + 1536 * heads * (128 + 64) + h * (512 + 64)
            + 512 * heads * (128 + 128) + heads * 128 * h)
    expert = 3 * h * 2048
    return Model("Kimi K2.5 (text)", [
        Part("routed experts (INT4 g32)", moe_layers * 384 * expert, INT4_G32, codec=False),
        Part("attention (MLA)", layers * attn, BF16),
        Part("shared experts", moe_layers * expert, BF16),
        Part("dense MLP (layer 0)", 3 * h * 18432, BF16),
        Part("router", moe_layers * h * 384, BF16),
        Part("embedding + lm_head", 2 * 163840 * h, BF16),
    ], kv_bytes_per_token_layer=[(512 + 64) * BF16] * layers, kv_head_sharded=False)


def llama4_scout() -> Model:
    """Llama 4 Scout's text model: 48 layers, hidden 5120, 40 heads, 8 KV heads of 128,
    16 experts of 8192 (top 1) + a shared expert of 8192 in every layer, vocab 202048;
    3 of 4 layers chunked attention (8192), every 4th a global NoPE layer; bf16."""
    h, layers, kv, hd = 5120, 48, 8, 128
    attn = h * 40 * hd + 2 * h * kv * hd + 40 * hd * h
    expert = 3 * h * 8192
    window = [None if (i + 1) % 4 == 0 else 8192 for i in range(layers)]
    return Model("Llama 4 Scout (text)", [
        Part("routed experts", layers * 16 * expert, BF16),
        Part("attention", layers * attn, BF16),
        Part("shared experts", layers * expert, BF16),
        Part("router", layers * h * 16, BF16),
        Part("embedding + lm_head", 2 * 202048 * h, BF16),
    ], kv_bytes_per_token_layer=[2 * kv * hd * BF16] * layers, kv_head_sharded=True,
        window=window)


def weights_per_gpu(model: Model, gpus: int, compressed: bool,
                    replicate: tuple[str, ...] = ()) -> float:
    """Bytes of weights on one GPU: every part sharded over the group (TP for dense parts,
    EP for experts) except the named ones, which each GPU holds whole."""
    total = 0.0
    for p in model.parts:
        b = p.params * p.bytes_per * (CODEC_RATIO if compressed and p.codec else 1.0)
        total += b if p.name in replicate else b / gpus
    return total


def plan(model: Model, card: str, gpus: int, contexts=(8192, 131072),
         replicate: tuple[str, ...] = (), cp: int = 1) -> list[dict]:
    rows = []
    for compressed in (False, True):
        w = weights_per_gpu(model, gpus, compressed, replicate)
        kv_room = CARD_GIB[card] * GIB - OVERHEAD_GIB[card] * GIB - w
        row = {"model": model.name, "card": card, "gpus": gpus,
               "weights": "compressed" if compressed else "as shipped",
               "replicated": list(replicate), "cp": cp,
               "weights_gib_per_gpu": round(w / GIB, 1),
               "kv_gib_per_gpu": round(max(kv_room, 0) / GIB, 1)}
        for c in contexts:
            per_seq = model.kv_bytes(c, gpus, cp)
            row[f"seqs_at_{c // 1024}k"] = int(max(kv_room, 0) // per_seq)
            row[f"kv_gib_per_seq_gpu_{c // 1024}k"] = round(per_seq / GIB, 2)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the rows here too")
    args = ap.parse_args()
    kimi, scout = kimi_k25(), llama4_scout()
    out = {"params": {}, "kv_bytes_per_token": {}, "rows": []}
    for m in (kimi, scout):
        out["params"][m.name] = {p.name: round(p.params / 1e9, 2) for p in m.parts}
        out["kv_bytes_per_token"][m.name] = sum(m.kv_bytes_per_token_layer)
        print(f"{m.name}: {sum(p.params for p in m.parts) / 1e9:.1f} B parameters, "
              f"{sum(p.params * p.bytes_per for p in m.parts) / GIB:.1f} GiB as shipped; "
              f"KV {sum(m.kv_bytes_per_token_layer):,.0f} B/token (all layers, all heads)")
        for p in m.parts:
            print(f"    {p.name:28s} {p.params / 1e9:8.2f} B  {p.params * p.bytes_per / GIB:7.1f} GiB")
    out["rows"] += plan(kimi, "H100", 8)
    out["rows"] += plan(kimi, "H100", 8, cp=8)
    dp = weights_per_gpu(kimi, 8, False, replicate=("attention (MLA)",))
    out["kimi_dp_attention_weights_gib_per_gpu"] = round(dp / GIB, 1)
    print(f"Kimi K2.5 on 8 x H100 with attention data-parallel (MLA weights on every GPU): "
          f"{dp / GIB:.1f} GiB of weights per GPU of {CARD_GIB['H100']}")
    out["rows"] += plan(scout, "H200", 2)
    keys = ["model", "card", "gpus", "weights", "cp", "weights_gib_per_gpu",
            "kv_gib_per_gpu", "seqs_at_8k", "seqs_at_128k"]
    print()
    print("| " + " | ".join(keys) + " |")
    print("|" + " --- |" * len(keys))
    for r in out["rows"]:
        print("| " + " | ".join(str(r[k]) if k != "replicated" else (", ".join(r[k]) or "-")
                                 for k in keys) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
