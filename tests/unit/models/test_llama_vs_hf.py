"""Duet's Llama forward against transformers on the same random weights (fp32)."""
import dataclasses

import pytest
import torch

from shared.config import EngineConfig
from shared.engine.attention import TorchPagedAttention, build_metadata
from shared.engine.engine import LLMEngine
from shared.engine.kv_cache import LocalKVCache
from shared.engine.sampling_params import SamplingParams
from shared.models.loader import load_model
from tests.conftest import assert_idle, save_tiny_model

CASES = {
    "gqa-untied": {},
    "mha-tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "gqa-llama3-rope": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 64}),
    "gqa-linear-rope": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "mqa-dynamic-rope": dict(num_key_value_heads=1,
                             rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
}


def duet_logits(model, ids):
    """Full-prompt forward through Duet's paged attention with a fresh cache."""
    cfg = model.config
    cache = LocalKVCache(cfg, 8, 16, torch.float32)
    meta = build_metadata([len(ids)], [len(ids)], [list(range(8))], 16)
    attn = TorchPagedAttention(cache, meta, cfg.head_dim ** -0.5)
    with torch.inference_mode():
        h = model(torch.tensor(ids), torch.arange(len(ids)), attn)
        return model.compute_logits(h)


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_greedy_match_transformers(tmp_path, case):
    path, hf = save_tiny_model(tmp_path, seed=len(case), **CASES[case])
    model = load_model(path, "float32")
    ids = [5, 17, 42, 99, 3, 150, 7, 8, 9, 10, 11, 200, 13]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(duet_logits(model, ids), ref, atol=2e-5, rtol=1e-4)

    eng = LLMEngine(model, EngineConfig(model=str(path), dtype="float32", num_kv_blocks=64))
    out = eng.generate([ids], SamplingParams(temperature=0, max_tokens=40))[0][0]
    with torch.no_grad():
        want = hf.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    assert out == want
    assert_idle(eng)


def test_loader_names_missing_extra_and_misshaped_tensors(tmp_path):
    from safetensors.torch import load_file, save_file
    path, _ = save_tiny_model(tmp_path)
    f = path / "model.safetensors"
    t = load_file(f)
    del t["model.layers.1.mlp.up_proj.weight"]
    t["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, 64)
    t["model.layers.9.extra.weight"] = torch.zeros(2)
    save_file(t, f)
    with pytest.raises(ValueError) as e:
        load_model(path)
    msg = str(e.value)
    assert "missing tensors: model.layers.1.mlp.up_proj.weight" in msg
    assert "unexpected tensors: model.layers.9.extra.weight" in msg
    assert "model.layers.0.self_attn.k_proj.weight: checkpoint (3, 64) vs expected (32, 64)" in msg


def test_unsupported_dtype_and_missing_dir(tmp_path):
    with pytest.raises(ValueError, match="dtype 'float8' is not supported"):
        load_model(tmp_path, "float8")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path / "nope")


def test_dynamic_rope_past_the_trained_context_matches_transformers(tmp_path):
    """Dynamic NTK scaling only acts past max_position_embeddings: trained on 32 positions,
    a 13-token prompt generates 40 tokens, so positions 32..52 use rescaled frequencies.
    Duet's per-position table equals transformers' incremental decoding with its cache."""
    from shared.models.rope import build_cos_sin
    path, hf = save_tiny_model(tmp_path, seed=7, num_key_value_heads=1, max_position_embeddings=32,
                               rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    model = load_model(path, "float32", max_positions=64)
    plain, _ = build_cos_sin(model.config, 32)
    assert torch.equal(model.rope_cos[:32], plain)               # inside: the default table
    unscaled, _ = build_cos_sin(dataclasses.replace(model.config, rope_scaling=None), 64)
    assert not torch.allclose(model.rope_cos[40], unscaled[40])  # past it: rescaled
    eng = LLMEngine(model, EngineConfig(model=str(path), dtype="float32", num_kv_blocks=64,
                                        max_model_len=64))
    assert eng.max_model_len == 64
    ids = [5, 17, 42, 99, 3, 150, 7, 8, 9, 10, 11, 200, 13]
    out = eng.generate([ids], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0][0]
    with torch.no_grad():
        want = hf.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    assert out == want
    assert_idle(eng)
    with pytest.raises(ValueError, match="only dynamic RoPE scaling extends it"):
        load_model(save_tiny_model(tmp_path / "plain", max_position_embeddings=32)[0], "float32",
                   max_positions=64)
