"""One rank's part of a Llama-family model, read straight from its shard of the
safetensors files (memory-mapped slices: a rank never reads another rank's weights).

Tensor parallel: column-parallel fused qkv and gate_up (each rank computes its heads and
its MLP columns), row-parallel o_proj and down_proj (partial sums, all-reduced), a
vocab-parallel embedding (each rank looks up its rows, all-reduced) and lm_head (each rank
scores its rows; the logits are gathered). Pipeline parallel: each stage holds a
contiguous range of layers; the first stage embeds, the last normalizes and scores.
"""
from __future__ import annotations

import ctypes
import dataclasses
import json
from pathlib import Path

import numpy as np

import torch
from torch import nn
import torch.nn.functional as F

from shared.models.config import ModelConfig
from shared.models.llama import DecoderLayer, RMSNorm
from shared.models.loader import _IGNORED_SUFFIXES, expected_shapes, parse_dtype
from shared.models.rope import build_cos_sin
from shared.parallel.shape import Shard


class ShardedLlama(nn.Module):
    """The layers, heads, columns and vocabulary rows one rank holds. `config` is the
    whole model's (the engine sizes prompts and vocabularies by it); `local` is this
    rank's (its head and column counts)."""

    def __init__(self, cfg: ModelConfig, shard: Shard, max_positions: int | None = None):
        super().__init__()
        self.config, self.shard = cfg, shard
        q0, q1 = shard.q_heads
        k0, k1 = shard.kv_heads
        c0, c1 = shard.mlp_cols
        self.local = dataclasses.replace(cfg, num_heads=q1 - q0, num_kv_heads=k1 - k0,
                                         intermediate_size=c1 - c0)
        l0, l1 = shard.layers
        self.layer_range = (l0, l1)
        self.vocab_rows = shard.vocab_rows
        if shard.first_stage:
            self.embed_tokens = nn.Embedding(shard.vocab_shard, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(self.local, i) for i in range(l0, l1))
        if shard.last_stage:
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.lm_head = nn.Linear(cfg.hidden_size, shard.vocab_shard, bias=False)
        self.max_positions = max_positions or cfg.max_position_embeddings
        self.register_buffer("rope_cos", None, persistent=False)
        self.register_buffer("rope_sin", None, persistent=False)
        self.reduce = None   # set by the group: in-place sum over the stage's TP ranks

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].input_layernorm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.layers[0].input_layernorm.weight.device

    def init_rope(self, device) -> None:
        cos, sin = build_cos_sin(self.config, self.max_positions)
        self.register_buffer("rope_cos", cos.to(device), persistent=False)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)

    def set_reduce(self, reduce) -> None:
        """reduce(tensor) sums a tensor over the stage's TP ranks in place (None: TP=1)."""
        self.reduce = reduce
        for layer in self.layers:
            layer.self_attn.reduce = reduce
            layer.mlp.reduce = reduce

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        v0, v1 = self.vocab_rows
        if self.reduce is None:
            return self.embed_tokens(input_ids)
        here = (input_ids >= v0) & (input_ids < v1)
        x = self.embed_tokens((input_ids - v0).clamp(0, self.embed_tokens.num_embeddings - 1))
        x = x * here[:, None].to(x.dtype)
        self.reduce(x)
        return x

    def run_layers(self, x, residual, positions: torch.Tensor, attn):
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        for layer in self.layers:
            x, residual = layer(x, residual, cos, sin, attn)
        return x, residual

    def final_norm(self, x, residual) -> torch.Tensor:
        if residual is None:   # a stage of zero layers never happens (pp <= layers)
            return self.norm(x)
        return self.norm.add_forward(x, residual)[0]

    def logits_shard(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> this rank's vocabulary rows' logits [N, vocab_shard] fp32
        (rows past the vocabulary, padding of the last shard, are zero weights)."""
        return self.lm_head(hidden).float()

    def forward(self, input_ids, positions, attn):
        """One rank of TP=T, PP=1: tokens -> final hidden rows (for tests and tools)."""
        x, residual = self.run_layers(self.embed(input_ids), None, positions, attn)
        return self.final_norm(x, residual)


_DTYPES = {"F32": (np.float32, torch.float32), "F16": (np.float16, torch.float16),
           "BF16": (np.uint16, torch.bfloat16)}   # numpy has no bf16: read its bits


def _header(f: Path) -> tuple[dict, int]:
    """A safetensors file's header (name -> dtype, shape, data_offsets) and where its data
    starts."""
    with open(f, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        head = json.loads(fh.read(n))
    head.pop("__metadata__", None)
    return head, 8 + n


class _Reader:
    """Slices of named tensors, each read through a memory map of just that tensor's bytes
    that is unmapped once the slice is copied out: a rank's memory holds its shard and
    nothing of the rest (rows: only their bytes are touched; columns: each row's part)."""

    def __init__(self, path: Path, cfg: ModelConfig):
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in model directory {str(path)!r}")
        from shared import compress
        self.where: dict[str, tuple[Path, dict, int]] = {}
        self.compressed: dict[str, tuple[Path, dict]] = {}   # name -> (file, its metadata)
        for f in files:
            cmeta = compress.file_metadata(f)
            if cmeta is not None:   # compressed: each tensor decoded whole, then sliced
                for name, e in json.loads(cmeta["duet_tensors"]).items():
                    if not name.endswith(_IGNORED_SUFFIXES):
                        self.where[name] = (f, {"shape": e["shape"], "dtype": {
                            "bfloat16": "BF16", "float32": "F32", "float16": "F16"}.get(
                                e["dtype"], e["dtype"])}, 0)
                        self.compressed[name] = (f, cmeta)
                continue
            head, data = _header(f)
            for name, meta in head.items():
                if not name.endswith(_IGNORED_SUFFIXES):
                    self.where[name] = (f, meta, data)
        want = expected_shapes(cfg)
        if cfg.tie_word_embeddings:
            self.where.pop("lm_head.weight", None)
        missing = sorted(set(want) - set(self.where))
        if missing:
            raise ValueError(f"checkpoint {str(path)!r} does not match its config.json: "
                             f"missing tensors: {', '.join(missing[:8])}")
        for name, shape in want.items():
            meta = self.where[name][1]
            if tuple(meta["shape"]) != shape:
                raise ValueError(f"checkpoint {str(path)!r}: {name} is {tuple(meta['shape'])}, "
                                 f"its config.json says {shape}")
            if meta["dtype"] not in _DTYPES:
                raise ValueError(f"checkpoint {str(path)!r}: {name} has dtype {meta['dtype']}; "
                                 f"sharded loading reads {', '.join(_DTYPES)}")

    def _read(self, name: str, rows: tuple[int, int] | None, cols: tuple[int, int] | None):
        if name in self.compressed:
            from shared import compress
            f, cmeta = self.compressed[name]
            t = compress.read_compressed(f, cmeta, [name])[name]
            if rows is not None:
                t = t[rows[0]:rows[1]]
            if cols is not None:
                t = t[:, cols[0]:cols[1]]
            return t.clone()
        f, meta, data = self.where[name]
        np_dtype, torch_dtype = _DTYPES[meta["dtype"]]
        shape = list(meta["shape"])
        r0, r1 = rows or (0, shape[0])
        row_items = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        item = np.dtype(np_dtype).itemsize
        start = data + meta["data_offsets"][0] + r0 * row_items * item
        if r1 <= r0:
            return torch.empty([0] + shape[1:], dtype=torch_dtype)
        mm = np.memmap(f, dtype=np_dtype, mode="r", offset=start, shape=(r1 - r0, *shape[1:]))
        try:
            part = mm if cols is None else mm[:, cols[0]:cols[1]]
            out = torch.from_numpy(np.array(part))   # one copy out of the mapping
        finally:
            mm._mmap.close()
            del mm
        return out.view(torch_dtype) if torch_dtype == torch.bfloat16 else out

    def rows(self, name: str, start: int | None = None, end: int | None = None) -> torch.Tensor:
        return self._read(name, None if start is None else (start, end), None)

    def cols(self, name: str, start: int, end: int) -> torch.Tensor:
        return self._read(name, None, (start, end))


def load_sharded(path: str | Path, shard: Shard, dtype: str | torch.dtype = "float32",
                 device: str | torch.device = "cpu",
                 max_positions: int | None = None) -> ShardedLlama:
    """This rank's ShardedLlama, reading only its slices of the checkpoint."""
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    path = Path(path)
    cfg = ModelConfig.from_dir(path)
    if (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) != \
            (shard.num_layers, shard.num_heads, shard.num_kv_heads):
        raise ValueError(f"the shard was planned for another model than {str(path)!r}")
    r = _Reader(path, cfg)
    d = cfg.head_dim
    q0, q1 = shard.q_heads
    k0, k1 = shard.kv_heads
    c0, c1 = shard.mlp_cols
    v0, v1 = shard.vocab_rows
    state: dict[str, torch.Tensor] = {}

    def vocab(name: str) -> torch.Tensor:
        w = r.rows(name, v0, v1)
        if w.shape[0] < shard.vocab_shard:   # the last shard's padding rows: zeros
            w = torch.cat([w, w.new_zeros(shard.vocab_shard - w.shape[0], w.shape[1])])
        return w

    if shard.first_stage:
        state["embed_tokens.weight"] = vocab("model.embed_tokens.weight")
    if shard.last_stage:
        state["norm.weight"] = r.rows("model.norm.weight")
        state["lm_head.weight"] = (vocab("model.embed_tokens.weight") if cfg.tie_word_embeddings
                                   else vocab("lm_head.weight"))
    l0, l1 = shard.layers
    for i in range(l0, l1):
        p, q = f"model.layers.{i}.", f"layers.{i - l0}."
        a = p + "self_attn."
        state[q + "self_attn.qkv_proj.weight"] = torch.cat([
            r.rows(a + "q_proj.weight", q0 * d, q1 * d), r.rows(a + "k_proj.weight", k0 * d, k1 * d),
            r.rows(a + "v_proj.weight", k0 * d, k1 * d)])
        if cfg.attention_bias:
            state[q + "self_attn.qkv_proj.bias"] = torch.cat([
                r.rows(a + "q_proj.bias", q0 * d, q1 * d), r.rows(a + "k_proj.bias", k0 * d, k1 * d),
                r.rows(a + "v_proj.bias", k0 * d, k1 * d)])
        state[q + "self_attn.o_proj.weight"] = r.cols(a + "o_proj.weight", q0 * d, q1 * d)
        state[q + "mlp.gate_up_proj.weight"] = torch.cat([
            r.rows(p + "mlp.gate_proj.weight", c0, c1), r.rows(p + "mlp.up_proj.weight", c0, c1)])
        state[q + "mlp.down_proj.weight"] = r.cols(p + "mlp.down_proj.weight", c0, c1)
        state[q + "input_layernorm.weight"] = r.rows(p + "input_layernorm.weight")
        state[q + "post_attention_layernorm.weight"] = r.rows(p + "post_attention_layernorm.weight")
    with torch.device("meta"):
        model = ShardedLlama(cfg, shard, max_positions)
    state = {k: v.to(device=device, dtype=dtype).contiguous() for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    del state
    model.init_rope(device)
    _trim_heap()
    return model.eval().requires_grad_(False)


def _trim_heap() -> None:
    """Give the loader's freed temporaries (concatenations, copies) back to the OS: glibc
    keeps large freed blocks in its heap otherwise, and a rank's RSS should be its shard."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
