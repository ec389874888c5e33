"""Real weights: Duet's greedy output on SmolLM2 equals transformers on the same GGUF."""
import pytest
import torch

from shared.engine.sampling_params import SamplingParams
from shared.models.hub import packaged_gguf

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one short sentence."},
     {"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": "Write a haiku about the sea. 🌊"}],
]
PLAIN = ["The quick brown fox", "def fibonacci(n):", "Once upon a time, in a small village,"]


@pytest.fixture(scope="module")
def hf_gguf():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    g = packaged_gguf("smollm2")
    tok = AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name)
    model = AutoModelForCausalLM.from_pretrained(str(g.parent), gguf_file=g.name,
                                                 dtype=torch.float32).eval()
    return tok, model


def hf_greedy(model, ids, n):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                             pad_token_id=2)
    return out[0, len(ids):].tolist()


def test_chat_template_ids_match_transformers(smollm2_engine, hf_gguf):
    tok, _ = hf_gguf
    for msgs in CHATS:
        want = tok.apply_chat_template(msgs, add_generation_prompt=True)
        want = want["input_ids"] if not isinstance(want, list) else want
        assert smollm2_engine.tokenizer.apply_chat_template(msgs) == list(want)
    for text in PLAIN:
        assert smollm2_engine.tokenizer.encode(text) == tok(text)["input_ids"]


def test_greedy_tokens_identical_to_transformers(smollm2_engine, hf_gguf):
    tok, model = hf_gguf
    prompts = [smollm2_engine.tokenizer.apply_chat_template(m) for m in CHATS]
    prompts += [smollm2_engine.tokenizer.encode(t) for t in PLAIN]
    ours = smollm2_engine.generate(prompts, SamplingParams(temperature=0, max_tokens=40))
    for ids, out in zip(prompts, ours):
        want = hf_greedy(model, ids, 40)
        # HF stops at EOS and keeps it; so does Duet (finish_reason "stop").
        assert out[0] == want, smollm2_engine.tokenizer.decode(ids)
