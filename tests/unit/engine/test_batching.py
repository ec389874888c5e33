"""Continuous batching, chunked prefill, preemption and prefix caching on real weights."""
from shared.config import EngineConfig
from shared.engine.engine import LLMEngine
from shared.engine.sampling_params import SamplingParams
from tests.conftest import assert_idle

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def prompts(tok):
    texts = ["Hi", "Tell me about the moon and the stars in the night sky over the ocean.",
             "1, 2, 3, 4, 5, 6, 7,", "The history of Rome " * 12, "Paris is",
             "A recipe for bread: flour, water, salt and", "Q: What is 7*6? A:",
             "In the beginning " * 20]
    return [tok.encode(t) for t in texts]


def test_batch_invariance_with_chunked_prefill_and_joins(smollm2_dir, smollm2_engine):
    ps = prompts(smollm2_engine.tokenizer)
    alone = [smollm2_engine.generate([p], GREEDY)[0][0] for p in ps]
    # A small token budget forces chunked prefill mixed with decodes.
    eng = LLMEngine(smollm2_engine.model, EngineConfig(
        model=str(smollm2_dir), dtype="float32", num_kv_blocks=256, max_num_batched_tokens=48),
        smollm2_engine.eos_token_ids)
    got = {i: [] for i in range(len(ps))}
    for i in range(4):
        eng.add_request(str(i), ps[i], GREEDY)
    steps = 0
    while eng.has_unfinished():
        if steps == 3:  # the rest join mid-stream
            for i in range(4, 8):
                eng.add_request(str(i), ps[i], GREEDY)
        for out in eng.step():
            got[int(out.request_id)].extend(out.new_token_ids)
        steps += 1
    assert [got[i] for i in range(8)] == alone
    assert_idle(eng)


def test_preemption_by_recompute_keeps_outputs(smollm2_dir, smollm2_engine):
    ps = prompts(smollm2_engine.tokenizer)[:6]
    alone = [smollm2_engine.generate([p], GREEDY)[0][0] for p in ps]
    eng = LLMEngine(smollm2_engine.model, EngineConfig(
        model=str(smollm2_dir), dtype="float32", num_kv_blocks=12,
        max_num_batched_tokens=64, enable_prefix_caching=False), smollm2_engine.eos_token_ids)
    assert eng.generate(ps, GREEDY) == [[a] for a in alone]
    assert eng.scheduler.num_preemptions > 0
    assert_idle(eng)


def test_prefix_cache_computes_only_uncached_tokens(smollm2_engine):
    eng, tok = smollm2_engine, smollm2_engine.tokenizer
    prefix = tok.encode("You are a careful assistant. " * 12)[:64]
    a = prefix + tok.encode(" Question one: what is the tallest mountain?")
    b = prefix + tok.encode(" Question two: name a large river in Africa.")
    eng.block_manager.reset_prefix_cache()
    cold = eng.generate([b], GREEDY)[0][0]      # reference: b computed from scratch
    eng.block_manager.reset_prefix_cache()
    eng.generate([a], GREEDY)
    before = eng.stats.prompt_tokens_computed
    warm = eng.generate([b], GREEDY)[0][0]
    assert eng.stats.prompt_tokens_computed - before == len(b) - 64
    assert warm == cold
    assert_idle(eng)


def test_abort_everywhere_frees_every_block(smollm2_engine):
    eng, tok = smollm2_engine, smollm2_engine.tokenizer
    p = tok.encode("Count slowly: one, two, three")
    eng.add_request("a", p, GREEDY)
    eng.add_request("b", p * 3, SamplingParams(temperature=0, max_tokens=50, n=3))
    eng.step()
    eng.add_request("c", p, GREEDY)                     # still waiting
    assert eng.block_manager.num_free_blocks < eng.block_manager.num_blocks
    outs = eng.abort("a") + eng.abort("b") + eng.abort("c")
    assert sorted((o.request_id, o.index) for o in outs) == [
        ("a", 0), ("b", 0), ("b", 1), ("b", 2), ("c", 0)]
    assert all(o.finish_reason == "abort" for o in outs)
    assert_idle(eng)
