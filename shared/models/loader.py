"""Load an HF-style checkpoint directory (config.json + *.safetensors) into LlamaForCausalLM."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from shared.models.config import ModelConfig
from shared.models.llama import LlamaForCausalLM

# Keys some exporters write that carry nothing the model needs.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape for this config."""
    h, d = cfg.hidden_size, cfg.head_dim
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (cfg.num_heads * d, h),
            p + "self_attn.k_proj.weight": (cfg.num_kv_heads * d, h),
            p + "self_attn.v_proj.weight": (cfg.num_kv_heads * d, h),
            p + "self_attn.o_proj.weight": (h, cfg.num_heads * d),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        })
        if cfg.is_moe_layer(i):
            shapes.update(_expert_shapes(cfg, p))
        else:
            shapes.update({p + "mlp.gate_proj.weight": (cfg.intermediate_size, h),
                           p + "mlp.up_proj.weight": (cfg.intermediate_size, h),
                           p + "mlp.down_proj.weight": (h, cfg.intermediate_size)})
        if cfg.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (d,)
            shapes[p + "self_attn.k_norm.weight"] = (d,)
        if cfg.attention_bias:
            shapes[p + "self_attn.q_proj.bias"] = (cfg.num_heads * d,)
            shapes[p + "self_attn.k_proj.bias"] = (cfg.num_kv_heads * d,)
            shapes[p + "self_attn.v_proj.bias"] = (cfg.num_kv_heads * d,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


def _expert_names(cfg: ModelConfig, p: str) -> tuple[str, list[tuple[str, str, str]]]:
    """A MoE layer's router name and each expert's (gate, up, down) names, as the Hub
    checkpoints of its architecture spell them."""
    if cfg.architecture == "MixtralForCausalLM":
        m = p + "block_sparse_moe."
        return m + "gate.weight", [(f"{m}experts.{j}.w1.weight", f"{m}experts.{j}.w3.weight",
                                    f"{m}experts.{j}.w2.weight") for j in range(cfg.num_experts)]
    m = p + "mlp."
    return m + "gate.weight", [(f"{m}experts.{j}.gate_proj.weight",
                                f"{m}experts.{j}.up_proj.weight",
                                f"{m}experts.{j}.down_proj.weight") for j in range(cfg.num_experts)]


def _expert_shapes(cfg: ModelConfig, p: str) -> dict[str, tuple[int, ...]]:
    h, i = cfg.hidden_size, cfg.moe_intermediate_size
    router, experts = _expert_names(cfg, p)
    shapes = {router: (cfg.num_experts, h)}
    for gate, up, down in experts:
        shapes.update({gate: (i, h), up: (i, h), down: (h, i)})
    return shapes


def read_checkpoint(path: Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Read every tensor (memory-mapped) and check names and shapes against the config."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in model directory {str(path)!r}")
    from shared import compress
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        meta = compress.file_metadata(f)
        if meta is not None:   # a compressed checkpoint (duet model compress): decoded here
            tensors.update((k, v) for k, v in compress.read_compressed(f, meta).items()
                           if not k.endswith(_IGNORED_SUFFIXES))
            continue
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                if not name.endswith(_IGNORED_SUFFIXES):
                    tensors[name] = st.get_tensor(name)
    want = expected_shapes(cfg)
    if cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # some exporters write the tied copy anyway
    missing = sorted(set(want) - set(tensors))
    extra = sorted(set(tensors) - set(want))
    bad = [f"{n}: checkpoint {tuple(tensors[n].shape)} vs expected {want[n]}"
           for n in sorted(set(want) & set(tensors)) if tuple(tensors[n].shape) != want[n]]
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing[:8])}"
                        + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""))
    if extra:
        problems.append(f"unexpected tensors: {', '.join(extra[:8])}"
                        + (f" (+{len(extra) - 8} more)" if len(extra) > 8 else ""))
    if bad:
        problems.append("mis-shaped tensors: " + "; ".join(bad[:8]))
    if problems:
        raise ValueError(f"checkpoint {str(path)!r} does not match its config.json: "
                         + " | ".join(problems))
    return tensors


def fuse_state_dict(cfg: ModelConfig, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF names -> Duet module names, fusing q/k/v and gate/up projections."""
    out = {"embed_tokens.weight": t["model.embed_tokens.weight"], "norm.weight": t["model.norm.weight"]}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = t["lm_head.weight"]
    for i in range(cfg.num_layers):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        a = p + "self_attn."
        out[q + "self_attn.qkv_proj.weight"] = torch.cat(
            [t[a + "q_proj.weight"], t[a + "k_proj.weight"], t[a + "v_proj.weight"]])
        if cfg.attention_bias:
            out[q + "self_attn.qkv_proj.bias"] = torch.cat(
                [t[a + "q_proj.bias"], t[a + "k_proj.bias"], t[a + "v_proj.bias"]])
        out[q + "self_attn.o_proj.weight"] = t[a + "o_proj.weight"]
        if cfg.qk_norm:
            out[q + "self_attn.q_norm.weight"] = t[a + "q_norm.weight"]
            out[q + "self_attn.k_norm.weight"] = t[a + "k_norm.weight"]
        if cfg.is_moe_layer(i):   # experts stacked: [E, 2I, H] (gate | up) and [E, H, I]
            router, experts = _expert_names(cfg, p)
            out[q + "mlp.router.weight"] = t[router]
            out[q + "mlp.w_gate_up"] = torch.stack([torch.cat([t[g], t[u]]) for g, u, _ in experts])
            out[q + "mlp.w_down"] = torch.stack([t[d] for _, _, d in experts])
        else:
            out[q + "mlp.gate_up_proj.weight"] = torch.cat(
                [t[p + "mlp.gate_proj.weight"], t[p + "mlp.up_proj.weight"]])
            out[q + "mlp.down_proj.weight"] = t[p + "mlp.down_proj.weight"]
        out[q + "input_layernorm.weight"] = t[p + "input_layernorm.weight"]
        out[q + "post_attention_layernorm.weight"] = t[p + "post_attention_layernorm.weight"]
    return out


def build_model(cfg: ModelConfig, hf_tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                device: str | torch.device = "cpu",
                max_positions: int | None = None) -> LlamaForCausalLM:
    """Instantiate without random init (meta device) and assign the given HF tensors."""
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, max_positions)
    state = {k: v.to(device=device, dtype=dtype).contiguous()
             for k, v in fuse_state_dict(cfg, hf_tensors).items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.init_rope(device)
    return model.eval().requires_grad_(False)


def load_model(path: str | Path, dtype: str | torch.dtype = "float32",
               device: str | torch.device = "cpu",
               max_positions: int | None = None) -> LlamaForCausalLM:
    """Load an HF-style directory. Errors name any missing, extra or mis-shaped tensor."""
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    path = Path(path)
    cfg = ModelConfig.from_dir(path)
    return build_model(cfg, read_checkpoint(path, cfg), dtype, device, max_positions)


def generation_eos_ids(path: str | Path, cfg: ModelConfig) -> tuple[int, ...]:
    """EOS ids from generation_config.json when present (it may list several), else config."""
    gen = Path(path) / "generation_config.json"
    ids = set(cfg.eos_token_ids)
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        if eos is not None:
            ids.update(eos if isinstance(eos, list) else [eos])
    return tuple(sorted(ids))
