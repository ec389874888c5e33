"""A compressed SmolLM2 (duet model compress --dtype bfloat16), served by `duet up`, gives the
tokens the uncompressed checkpoint gives served in bf16."""
from __future__ import annotations

import requests
import torch

from shared import compress
from tools.up import start_mesh

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


def served(model_dir, log_dir) -> list[list[str]]:
    mesh = start_mesh(model_dir, log_dir, colocated=True, dtype="bfloat16")
    try:
        out = []
        name = requests.get(mesh.url + "/v1/models", timeout=10).json()["data"][0]["id"]
        for p in PROMPTS:
            r = requests.post(mesh.url + "/v1/completions", timeout=120, json={
                "model": name, "prompt": p, "max_tokens": 24, "temperature": 0,
                "logprobs": 1})
            assert r.status_code == 200, r.text
            tokens = r.json()["choices"][0]["logprobs"]["tokens"]
            assert len(tokens) == 24
            out.append(tokens)
        return out
    finally:
        mesh.stop()


def test_compressed_smollm2_serves_the_same_tokens(smollm2_dir, tmp_path):
    sizes = compress.compress_dir(smollm2_dir, tmp_path / "smollm2-c", cast=torch.bfloat16)
    share = sum(b for _, b in sizes.values()) / sum(a for a, _ in sizes.values())
    assert share < 0.70                     # of bf16: ~0.667 measured
    assert served(tmp_path / "smollm2-c", tmp_path / "c") == served(smollm2_dir, tmp_path / "o")
