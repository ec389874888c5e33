"""Model architecture config, read from an HF-style `config.json`."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

SUPPORTED_ARCHS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                   "Qwen3ForCausalLM", "MixtralForCausalLM", "Qwen3MoeForCausalLM")
MOE_ARCHS = ("MixtralForCausalLM", "Qwen3MoeForCausalLM")
QK_NORM_ARCHS = ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    architecture: str = "LlamaForCausalLM"
    qk_norm: bool = False               # RMSNorm over each head of q and k before RoPE (Qwen3)
    # attention over the last sliding_window tokens only (Mistral v0.1): within that many
    # tokens it is full attention, so the context is capped there (LlamaForCausalLM)
    sliding_window: int | None = None
    # mixture of experts (Mixtral, Qwen3-MoE): the layers in moe_layers route each token to
    # num_experts_per_tok of num_experts experts of moe_intermediate_size; the others are dense
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True         # renormalize the chosen experts' probabilities
    moe_layers: tuple[int, ...] = ()

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model config: {name}={getattr(self, name)} must be > 0")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model config: num_attention_heads={self.num_heads} is not a "
                             f"multiple of num_key_value_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"model config: head_dim={self.head_dim} must be even for RoPE")
        if self.moe_layers and not (1 <= self.num_experts_per_tok <= self.num_experts
                                    and self.moe_intermediate_size > 0):
            raise ValueError(f"model config: num_experts_per_tok={self.num_experts_per_tok} "
                             f"must be in [1, num_experts={self.num_experts}] and "
                             f"moe_intermediate_size={self.moe_intermediate_size} > 0")

    @property
    def is_moe(self) -> bool:
        return bool(self.moe_layers)

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        archs = hf.get("architectures") or ["LlamaForCausalLM"]
        arch = archs[0]
        if arch not in SUPPORTED_ARCHS:
            raise ValueError(f"model config: architecture {arch!r} is not supported; "
                             f"supported: {', '.join(SUPPORTED_ARCHS)}")
        heads = hf["num_attention_heads"]
        # transformers >= 5 nests rope settings in `rope_parameters`; older configs keep
        # `rope_theta` and `rope_scaling` at the top level.
        rope_params = dict(hf.get("rope_parameters") or {})
        theta = rope_params.pop("rope_theta", None) or hf.get("rope_theta", 10000.0)
        scaling = hf.get("rope_scaling") or rope_params or None
        if scaling is not None:
            scaling = dict(scaling)
            kind = scaling.get("rope_type", scaling.get("type", "default"))
            scaling["rope_type"] = kind
            if kind == "default":
                scaling = None
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        _refuse_unbuilt(hf, arch)
        return cls(**_moe_fields(hf, arch),
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", arch == "Qwen2ForCausalLM")),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            architecture=arch,
            qk_norm=arch in QK_NORM_ARCHS,
            sliding_window=_window(hf),
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelConfig":
        cfg_path = Path(path) / "config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"no config.json in model directory {str(path)!r}")
        return cls.from_hf(json.loads(cfg_path.read_text()))

    def is_moe_layer(self, index: int) -> bool:
        return index in self.moe_layers

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V for one token across all layers, per element byte."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim


def _moe_fields(hf: dict, arch: str) -> dict:
    """The mixture-of-experts settings of a Mixtral or Qwen3-MoE config ({} for a dense one)."""
    layers = hf["num_hidden_layers"]
    if arch == "MixtralForCausalLM":   # every layer routes; the experts' size is intermediate_size
        return dict(num_experts=hf["num_local_experts"], num_experts_per_tok=hf["num_experts_per_tok"],
                    moe_intermediate_size=hf["intermediate_size"], norm_topk_prob=True,
                    moe_layers=tuple(range(layers)))
    if arch == "Qwen3MoeForCausalLM":
        step = hf.get("decoder_sparse_step") or 1
        dense = set(hf.get("mlp_only_layers") or [])
        experts = hf.get("num_experts") or hf.get("num_local_experts") or 0   # transformers 5 renamed it
        sparse = tuple(i for i in range(layers) if i not in dense and (i + 1) % step == 0) \
            if experts > 0 else ()
        return dict(num_experts=experts, num_experts_per_tok=hf["num_experts_per_tok"],
                    moe_intermediate_size=hf["moe_intermediate_size"],
                    norm_topk_prob=bool(hf.get("norm_topk_prob", False)), moe_layers=sparse)
    return {}


def _window(hf: dict) -> int | None:
    window = hf.get("sliding_window")
    if not hf.get("use_sliding_window", True) or window is None:
        return None
    return window if window < hf.get("max_position_embeddings", 2048) else None


def _refuse_unbuilt(hf: dict, arch: str) -> None:
    """A config asking for what Duet does not build is refused, naming the field, rather
    than loaded wrong."""
    if arch in MOE_ARCHS and hf.get("shared_expert_intermediate_size"):
        raise ValueError(f"model config: shared_expert_intermediate_size="
                         f"{hf['shared_expert_intermediate_size']} (a shared expert) is not "
                         f"supported for {arch}")
