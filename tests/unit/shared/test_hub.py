"""Hub ids resolve through a Hugging Face cache built here on disk, offline: the real
resolution code (huggingface_hub.snapshot_download), no network."""
from __future__ import annotations

import json
import shutil

import pytest

from shared.config import EngineConfig
from shared.engine.engine import LLMEngine
from shared.engine.sampling_params import SamplingParams
from shared.models.hub import resolve_model
from shared.models.loader import load_model
from tests.conftest import save_tiny_model

MAIN, V1 = "a" * 40, "b" * 40


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A cache holding org/tiny at main (sharded weights) and at tag v1 (one file)."""
    root = tmp_path / "hub"
    repo = root / "models--org--tiny"
    src, model = save_tiny_model(tmp_path / "src")
    for commit, ref in ((MAIN, "main"), (V1, "v1")):
        snap = repo / "snapshots" / commit
        if ref == "main":   # sharded, with an index, as big checkpoints are
            model.save_pretrained(snap, safe_serialization=True, max_shard_size="40KB")
        else:
            shutil.copytree(src, snap)
            cfg = json.loads((snap / "config.json").read_text())
            (snap / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": 1e-6}))
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return repo, src


def test_a_hub_id_resolves_offline_and_a_pinned_revision_is_honoured(hub):
    repo, src = hub
    main = resolve_model("org/tiny")
    assert main == repo / "snapshots" / MAIN
    assert len(list(main.glob("*.safetensors"))) > 1 and (main / "model.safetensors.index.json").is_file()
    assert resolve_model("org/tiny@v1") == repo / "snapshots" / V1
    assert resolve_model(f"org/tiny@{V1}") == repo / "snapshots" / V1
    assert json.loads((resolve_model("org/tiny@v1") / "config.json").read_text())["rms_norm_eps"] == 1e-6
    # the sharded checkpoint gives the single file's tokens
    assert greedy(main) == greedy(src)


def greedy(path) -> list[int]:
    eng = LLMEngine(load_model(path, "float32"),
                    EngineConfig(model=str(path), dtype="float32", num_kv_blocks=32,
                                 max_num_batched_tokens=64), eos_token_ids=(2,))
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    return eng.generate([[1, 5, 9, 4, 7, 30]], sp)[0][0]


def test_missing_repo_revision_and_partial_download_get_clear_errors(hub):
    repo, _ = hub
    with pytest.raises(FileNotFoundError, match=r"model 'org/none' is not in the Hugging Face "
                                                r"cache .* HF_HUB_OFFLINE is set"):
        resolve_model("org/none")
    with pytest.raises(FileNotFoundError, match="org/tiny@v9"):
        resolve_model("org/tiny@v9")
    shard = sorted((repo / "snapshots" / MAIN).glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=r"partial download: 1 of \d+ weight shards missing"):
        resolve_model("org/tiny")
    with pytest.raises(ValueError, match="neither a directory, a built-in .* nor a Hub id"):
        resolve_model("not a model")
