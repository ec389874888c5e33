"""A mixture-of-experts model (a random Qwen3-MoE with SmolLM2's vocabulary and tokenizer)
through real meshes: prefill -> store -> decode gives the colocated worker's text and the
in-process engine's, and the store is idle after."""
from __future__ import annotations

import shutil

import openai
import pytest
import torch

from shared.config import EngineConfig
from shared.engine.engine import LLMEngine
from shared.engine.sampling_params import SamplingParams
from shared.tokenization import Tokenizer
from tests.integration.mesh_util import start_mesh, wait_idle

CHATS = ["What is the capital of France?", "Count to five.", "Name three colours."]


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory, smollm2_dir):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    d = tmp_path_factory.mktemp("tiny-moe")
    torch.manual_seed(11)
    hf = Qwen3MoeForCausalLM(Qwen3MoeConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=512,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2))
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.15)
    hf.save_pretrained(d, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir / f, d / f)
    return d


def _texts(mesh) -> list[str]:
    c = openai.OpenAI(base_url=mesh.url + "/v1", api_key="none", max_retries=0, timeout=120)
    model = c.models.list().data[0].id
    return [c.chat.completions.create(model=model, temperature=0, max_tokens=24,
                                      messages=[{"role": "user", "content": text}],
                                      extra_body={"ignore_eos": True}).choices[0].message.content
            for text in CHATS]


def test_moe_through_disaggregated_and_colocated_meshes_gives_the_engine_text(tiny_moe,
                                                                              tmp_path):
    eng = LLMEngine.from_config(EngineConfig(model=str(tiny_moe), dtype="float32",
                                             num_kv_blocks=64))
    tok = Tokenizer(tiny_moe)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompts = [tok.apply_chat_template([{"role": "user", "content": t}]) for t in CHATS]
    want = [tok.decode(o[0]) for o in eng.generate(prompts, params)]
    assert len(set(want)) == len(want)               # three different answers
    for kw in (dict(prefill=1, decode=1), dict(colocated=True)):
        mesh = start_mesh(tiny_moe, tmp_path / ("disagg" if "prefill" in kw else "coloc"), **kw)
        try:
            assert _texts(mesh) == want, kw
            wait_idle(mesh)
        finally:
            mesh.stop()
