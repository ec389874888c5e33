"""Compressed checkpoints (shared/compress.py): bit-exact round trips, the loader reading
them, and clear errors for every kind of damage."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from shared import compress as C
from tests.conftest import save_tiny_model


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.int16)


def round_trip(t: torch.Tensor) -> torch.Tensor:
    return C.decode_bf16(C.encode_bf16(t), t.shape)


def special_values() -> torch.Tensor:
    raw = [0x0000, 0x8000,                       # +0, -0
           0x0001, 0x807F, 0x0040,               # subnormals
           0x7F80, 0xFF80,                       # +Inf, -Inf
           0x7FC0, 0x7F81, 0xFFFF, 0x7FA5,       # NaNs with payloads
           0x7F7F, 0xFF7F, 0x0080, 0x8080,       # largest and smallest normals
           0x3F80, 0xBF80]                       # +-1
    t = torch.tensor(raw * 300, dtype=torch.int32).to(torch.int16)
    return t.view(torch.bfloat16)


@pytest.mark.parametrize("make", [
    special_values,
    lambda: torch.full((5000,), 0.375, dtype=torch.bfloat16),              # all equal
    lambda: (torch.rand(9000) + 1.0).to(torch.bfloat16),                   # one exponent
    lambda: (torch.randn(257, 129) * 0.02).to(torch.bfloat16),             # ragged last tile
    lambda: (torch.distributions.StudentT(3.0).sample((3 * C.TILE + 17,))
             * torch.logspace(-3, 0, 3 * C.TILE + 17)).to(torch.bfloat16),  # wide exponents
    lambda: torch.randint(-32768, 32767, (2 * C.TILE,), dtype=torch.int32)
    .to(torch.int16).view(torch.bfloat16),                                 # every bit pattern
], ids=["specials", "all-equal", "one-exponent", "gaussian-ragged", "student-t-scaled",
        "random-bits"])
def test_round_trip_is_bit_exact(make):
    torch.manual_seed(1)
    t = make()
    assert torch.equal(bits(round_trip(t)), bits(t))


def test_the_numpy_coder_writes_the_cpp_coders_bytes():
    from duet_kernels import cpu_kernels
    t = (torch.distributions.StudentT(3.0).sample((3 * 700 + 5,)) * 0.01).to(torch.bfloat16)
    sym, _ = C.split_bf16(t)
    lens = C.code_lengths(np.bincount(sym.numpy().astype(np.int64), minlength=C.SYMBOLS))
    codes = C.canonical_codes(lens)
    words, tiles = C._encode_numpy(sym.numpy().astype(np.int64), codes, lens, 700, C.MAX_LEN)
    cw, ct = cpu_kernels.load().huff_encode(sym, torch.from_numpy(codes),
                                             torch.from_numpy(lens), 700)
    assert torch.equal(words, cw) and torch.equal(tiles, ct)


def test_codes_respect_the_length_limit_and_fill_the_code_space():
    fib = [1, 1]
    while len(fib) < 40:
        fib.append(fib[-1] + fib[-2])        # the counts that make Huffman codes longest
    counts = np.zeros(C.SYMBOLS, dtype=np.int64)
    counts[:40] = fib
    lens = C.code_lengths(counts, 12)
    assert lens.max() == 12 and (lens[:40] > 0).all() and (lens[40:] == 0).all()
    assert math.isclose(sum(2.0 ** -int(n) for n in lens if n), 1.0)
    syms = np.repeat(np.arange(40, dtype=np.int32) + 320, np.minimum(fib, 5000))
    t = torch.tensor(syms << 5).to(torch.int16).view(torch.bfloat16)
    assert torch.equal(bits(round_trip(t)), bits(t))


def test_gaussian_weights_compress_to_about_two_thirds():
    torch.manual_seed(0)
    w = (torch.randn(512, 512) * 0.02).to(torch.bfloat16)
    parts = C.encode_bf16(w)
    share = sum(p.numel() * p.element_size() for p in parts.values()) / (w.numel() * 2)
    bound = C.exponent_entropy_share(w)
    assert abs(share - bound) < 0.01 and share < 0.67   # near the exponent-only bound


@pytest.fixture
def tiny_dirs(tmp_path):
    src, _ = save_tiny_model(tmp_path / "src", hidden_size=128, intermediate_size=256,
                             num_attention_heads=4, num_key_value_heads=2)
    sizes = C.compress_dir(src, tmp_path / "packed", cast=torch.bfloat16)
    return src, tmp_path / "packed", sizes


def test_a_compressed_tiny_model_loads_bit_exact_and_generates_the_same(tiny_dirs):
    from shared.config import EngineConfig
    from shared.engine.engine import LLMEngine
    from shared.engine.sampling_params import SamplingParams
    from shared.models.loader import load_model
    src, packed, sizes = tiny_dirs
    assert (packed / "config.json").is_file()
    orig = load_file(str(src / "model.safetensors"))
    with safe_open(str(packed / "model.safetensors"), "pt") as st:
        meta = st.metadata()
    got = C.read_compressed(packed / "model.safetensors", meta)
    assert set(got) == set(orig)
    for k, v in orig.items():
        assert torch.equal(bits(got[k]), bits(v.to(torch.bfloat16))), k
    coded = [k for k, e in json.loads(meta["duet_tensors"]).items() if e["coded"]]
    assert "model.layers.0.mlp.down_proj.weight" in coded
    stored = sum(b for _, b in sizes.values()) / sum(a for a, _ in sizes.values())
    assert stored < 0.8
    a, b = load_model(src, "bfloat16"), load_model(packed, "bfloat16")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    outs = []
    for model, path in ((a, src), (b, packed)):
        eng = LLMEngine(model, EngineConfig(model=str(path), dtype="bfloat16", num_kv_blocks=32,
                                            max_num_batched_tokens=64), eos_token_ids=(2,))
        outs.append(eng.generate([[1, 5, 9, 4, 7, 30], [1, 100, 3]], sp))
    assert outs[0] == outs[1]


def test_a_sharded_rank_reads_its_slice_of_a_compressed_checkpoint(tiny_dirs):
    from shared.models.config import ModelConfig
    from shared.parallel.shape import Shard
    from shared.parallel.sharded import load_sharded
    src, packed, _ = tiny_dirs
    shard = Shard.of(ModelConfig.from_dir(src), tp=2, pp=2, rank=3)
    a = load_sharded(src, shard, "bfloat16").state_dict()
    b = load_sharded(packed, shard, "bfloat16").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def rewrite(path, change_tensors=None, change_meta=None):
    with safe_open(str(path), "pt") as st:
        meta = dict(st.metadata())
    tensors = load_file(str(path))
    if change_tensors:
        change_tensors(tensors)
    if change_meta:
        change_meta(meta)
    save_file(tensors, str(path), metadata=meta)


NAME = "model.layers.1.mlp.gate_proj.weight"


@pytest.mark.parametrize("damage,message", [
    (dict(change_tensors=lambda t: t.__setitem__(f"{NAME}:duet.exp",
                                                  t[f"{NAME}:duet.exp"][:-40].clone())),
     f"tensor '{NAME}': huff_decode: tile \\d+ ends at word \\d+ of a stream of \\d+ words "
     f"\\(truncated or corrupt\\)"),
    (dict(change_tensors=lambda t: t[f"{NAME}:duet.raw"].__setitem__(77, 3)),
     f"tensor '{NAME}' fails its checksum"),
    (dict(change_tensors=lambda t: t.pop(f"{NAME}:duet.lens")),
     f"tensor '{NAME}' is missing its part\\(s\\) {NAME}:duet.lens"),
    (dict(change_tensors=lambda t: t.pop("model.norm.weight")),
     "tensor 'model.norm.weight' is missing"),
    (dict(change_meta=lambda m: m.__setitem__("duet_version", "9")),
     "format 'duet-bf16-huffman' version '9' is not one this Duet reads"),
], ids=["truncated-stream", "flipped-byte", "missing-part", "missing-tensor", "wrong-version"])
def test_damage_gets_an_error_naming_the_tensor_and_the_check(tiny_dirs, damage, message):
    from shared.models.loader import load_model
    _, packed, _ = tiny_dirs
    rewrite(packed / "model.safetensors", **damage)
    with pytest.raises(C.CompressedCheckpointError, match=message):
        load_model(packed, "bfloat16")


def test_a_flipped_exponent_bit_never_loads(tiny_dirs):
    from shared.models.loader import load_model
    _, packed, _ = tiny_dirs

    def flip(t):
        w = t[f"{NAME}:duet.exp"].clone()
        w[5] ^= 1 << 20
        t[f"{NAME}:duet.exp"] = w
    rewrite(packed / "model.safetensors", change_tensors=flip)
    with pytest.raises(C.CompressedCheckpointError, match=f"tensor '{NAME}'"):
        load_model(packed, "bfloat16")


def test_the_cli_compresses_and_inspects(tmp_path):
    from tools.cli import main
    src, _ = save_tiny_model(tmp_path / "src")
    r = CliRunner().invoke(main, ["model", "compress", str(src), str(tmp_path / "out"),
                                  "--dtype", "bfloat16"])
    assert r.exit_code == 0, r.output
    assert "% of bf16) in" in r.output
    r = CliRunner().invoke(main, ["model", "inspect", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert "model.embed_tokens.weight" in r.output and "coded" in r.output
    assert "model.norm.weight" in r.output and "raw" in r.output
    r = CliRunner().invoke(main, ["model", "inspect", str(src)])
    assert r.exit_code != 0 and "is not a compressed checkpoint file" in r.output
    r = CliRunner().invoke(main, ["model", "compress", str(src), str(src)])
    assert r.exit_code != 0 and "is SRC_DIR" in r.output
