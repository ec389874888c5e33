"""Mixture-of-experts (Mixtral, Qwen3-MoE) and QK-norm (Qwen3) models against transformers
on the same random weights (fp32): logits, and greedy tokens through the engine with
chunked prefill, a batch and a prefix-cache hit."""
import pytest
import torch

from shared.config import EngineConfig
from shared.engine.engine import LLMEngine
from shared.engine.sampling_params import SamplingParams
from shared.models.config import ModelConfig
from shared.models.loader import load_model
from shared.parallel.shape import check_shape
from tests.conftest import assert_idle
from tests.unit.models.test_llama_vs_hf import duet_logits

COMMON = dict(vocab_size=211, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
CASES = {
    "mixtral-top2": ("MixtralConfig", "MixtralForCausalLM",
                     dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)),
    "qwen3-moe-top2-normed": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                              dict(intermediate_size=96, moe_intermediate_size=32, num_experts=8,
                                   num_experts_per_tok=2, norm_topk_prob=True, head_dim=16,
                                   mlp_only_layers=[1])),
    "qwen3-moe-top3-sparse-step2": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                                    dict(intermediate_size=96, moe_intermediate_size=24,
                                         num_experts=6, num_experts_per_tok=3,
                                         norm_topk_prob=False, head_dim=16,
                                         decoder_sparse_step=2)),
    "qwen3-dense-qk-norm": ("Qwen3Config", "Qwen3ForCausalLM",
                            dict(intermediate_size=96, head_dim=16)),
}


def save_tiny(tmp_path, case, seed=0):
    import transformers
    config_cls, model_cls, over = CASES[case]
    torch.manual_seed(seed)
    hf = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**COMMON, **over)).eval()
    with torch.no_grad():   # widen the tiny init (experts are 3-d here) so tokens are not ties
        for name, p in hf.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.15)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    return tmp_path, hf


def hf_greedy(hf, ids, n):
    with torch.no_grad():
        return hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_greedy_tokens_match_transformers(tmp_path, case):
    path, hf = save_tiny(tmp_path, case, seed=len(case))
    model = load_model(path, "float32")
    cfg = model.config
    assert cfg.is_moe == (case != "qwen3-dense-qk-norm")
    if case == "qwen3-moe-top2-normed":
        assert cfg.moe_layers == (0, 2)                 # layer 1 is dense (mlp_only_layers)
    if case == "qwen3-moe-top3-sparse-step2":
        assert cfg.moe_layers == (1,)                   # every 2nd layer routes
    ids = [5, 17, 42, 99, 3, 150, 7, 8, 9, 10, 11, 200, 13, 21, 34, 55, 89, 144, 6]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(duet_logits(model, ids), ref, atol=1e-4, rtol=1e-4)
    # the engine: 8-token prefill chunks, three prompts in one batch, the third sharing the
    # first's 16-token prefix (a prefix-cache hit once the first has run)
    prompts = [ids, [9, 8, 7, 6, 5, 4, 3], ids[:16] + [33, 44, 55]]
    eng = LLMEngine(model, EngineConfig(model=str(path), dtype="float32", num_kv_blocks=64,
                                        max_num_batched_tokens=8))
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    first = eng.generate(prompts[:1], params)[0][0]
    assert first == hf_greedy(hf, ids, 32)
    hits = eng.block_manager.prefix_hits
    outs = eng.generate(prompts, params)
    assert [o[0] for o in outs] == [hf_greedy(hf, p, 32) for p in prompts]
    assert eng.block_manager.prefix_hits - hits >= 2 * 16   # ids again, and prompts[2]
    assert_idle(eng)


def test_routing_is_transformers_routing(tmp_path):
    """The chosen experts and their weights per token, on a Qwen3-MoE layer."""
    path, hf = save_tiny(tmp_path, "qwen3-moe-top2-normed", seed=3)
    model = load_model(path, "float32")
    x = torch.randn(11, 64)
    ids, weights = model.layers[0].mlp.route(x)
    _, want_w, want_ids = hf.model.layers[0].mlp.gate(x)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_w.float())
    torch.testing.assert_close(weights.sum(-1), torch.ones(11))


def test_unbuilt_configs_are_refused_naming_the_field(tmp_path):
    base = dict(COMMON, architectures=["Qwen3MoeForCausalLM"], intermediate_size=96,
                moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2)
    with pytest.raises(ValueError, match="shared_expert_intermediate_size=64 .a shared expert. is "
                                         "not supported"):
        ModelConfig.from_hf(dict(base, shared_expert_intermediate_size=64))
    with pytest.raises(ValueError, match="num_experts_per_tok=9 must be in \\[1, num_experts=8\\]"):
        ModelConfig.from_hf(dict(base, num_experts_per_tok=9))
    with pytest.raises(ValueError, match="architecture 'Qwen2MoeForCausalLM' is not supported"):
        ModelConfig.from_hf(dict(base, architectures=["Qwen2MoeForCausalLM"]))
    cfg = ModelConfig.from_hf(base)
    with pytest.raises(ValueError, match="has 8 experts .expert parallelism is not built yet.; "
                                         "it runs as one process"):
        check_shape(cfg, 2, 1)
    # a sliding window: inside it attention is full, so the context stops there; asking for
    # more is refused
    from shared.models.llama import LlamaForCausalLM as DuetLlama
    window = ModelConfig.from_hf(dict(COMMON, architectures=["MistralForCausalLM"],
                                      intermediate_size=96, sliding_window=64))
    assert window.sliding_window == 64
    with torch.device("meta"):
        assert DuetLlama(window).max_positions == 64
        with pytest.raises(ValueError, match="max_model_len=128 is past this model's "
                                             "sliding_window=64"):
            DuetLlama(window, max_positions=128)
