"""Lossless compressed checkpoints: bf16 weights as an entropy-coded exponent stream beside a
raw sign+mantissa byte plane.

A trained model's bf16 exponents carry ~2.6 of their 8 bits; sign and mantissa are close to
incompressible. So each bf16 tensor (of at least MIN_CODED values) is split into
  NAME:duet.mant   uint8 [n]      sign << 7 | the 7 mantissa bits, as they are
  NAME:duet.exp    int32 [words]  the exponents, canonical Huffman codes of at most
                                  MAX_LEN bits, MSB-first, in tiles of TILE values, each a
                                  whole number of 32-bit words (tiles decode in parallel)
  NAME:duet.tiles  int64 [t + 1]  where each tile starts, in words
  NAME:duet.lens   uint8 [256]    each exponent's code length (0: absent), which fixes the
                                  canonical code
Every exponent a tensor holds gets a code (no escapes, no verbatim fallback). Other
tensors (fp16, fp32, ints, small bf16) are stored as they are. The safetensors metadata
holds the format name and version and, per tensor, its dtype, shape and the CRC-32 of its
original bytes, checked after decoding. The coder is C++ (kernels/cpu/huffman.cpp).

    duet model compress SRC_DIR OUT_DIR     (config, tokenizer and other files copied)
    duet model inspect DIR                  (per-tensor share of bf16)
The loader (shared/models/loader.py) reads a compressed directory like any other.
"""
from __future__ import annotations

import heapq
import json
import shutil
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import torch

FORMAT = "duet-bf16-huffman"
VERSION = "1"
TILE = 4096           # values per independently decodable tile
MAX_LEN = 12          # longest code: the decoder's table has 2**MAX_LEN entries
MIN_CODED = 1024      # smaller bf16 tensors (norms, biases) are stored as they are
PARTS = ("mant", "exp", "tiles", "lens")


class CompressedCheckpointError(ValueError):
    """A compressed checkpoint that cannot be decoded as written: the message names the
    tensor and the check that failed."""


def _kernels():
    from kernels import cpu_kernels
    mod = cpu_kernels.load()
    if mod is None:
        raise RuntimeError(f"compressed checkpoints need Duet's C++ CPU kernels, which are not "
                           f"built here ({cpu_kernels._failed})")
    return mod


# -- the code -------------------------------------------------------------------------------
def code_lengths(counts: np.ndarray, max_len: int = MAX_LEN) -> np.ndarray:
    """Huffman code lengths (uint8 [256]) for symbol counts, none longer than max_len
    (package-merge); a lone symbol gets a 1-bit code."""
    present = [(int(c), i) for i, c in enumerate(counts) if c > 0]
    lens = np.zeros(256, dtype=np.uint8)
    if not present:
        return lens
    if len(present) == 1:
        lens[present[0][1]] = 1
        return lens
    if len(present) > (1 << max_len):
        raise ValueError(f"{len(present)} symbols cannot take codes of at most {max_len} bits")
    leaves = sorted((c, (i,)) for c, i in present)
    level = leaves
    for _ in range(max_len - 1):
        packages = [(level[k][0] + level[k + 1][0], level[k][1] + level[k + 1][1])
                    for k in range(0, len(level) - 1, 2)]
        level = list(heapq.merge(leaves, packages, key=lambda x: x[0]))
    used = Counter(s for _, syms in level[:2 * len(leaves) - 2] for s in syms)
    for s, n in used.items():
        lens[s] = n
    return lens


def canonical_codes(lens: np.ndarray) -> np.ndarray:
    """The canonical code (int32 [256]) of each symbol for these lengths."""
    codes = np.zeros(256, dtype=np.int32)
    code, prev = 0, 0
    for length, sym in sorted((int(n), s) for s, n in enumerate(lens) if n > 0):
        code <<= length - prev
        codes[sym] = code
        code += 1
        prev = length
    return codes


def decode_table(lens: np.ndarray, max_len: int) -> torch.Tensor:
    """int32 [2**max_len]: for each max_len-bit window, symbol | length << 8 (0: no code)."""
    if lens.max(initial=0) > max_len:
        raise ValueError(f"a code of {int(lens.max())} bits is longer than {max_len}")
    kraft = sum(2.0 ** -int(n) for n in lens if n > 0)
    if kraft > 1.0 + 1e-12:
        raise ValueError(f"code lengths over-subscribe the code space (Kraft sum {kraft:.4f})")
    codes = canonical_codes(lens)
    table = np.zeros(1 << max_len, dtype=np.int32)
    for s in np.flatnonzero(lens):
        n = int(lens[s])
        lo = int(codes[s]) << (max_len - n)
        table[lo:lo + (1 << (max_len - n))] = s | (n << 8)
    return torch.from_numpy(table)


def split_bf16(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(exponent bytes, sign+mantissa bytes) of a bf16 tensor, flat."""
    bits = t.contiguous().view(-1).view(torch.int16).to(torch.int32) & 0xFFFF
    exp = ((bits >> 7) & 0xFF).to(torch.uint8)
    mant = (((bits >> 8) & 0x80) | (bits & 0x7F)).to(torch.uint8)
    return exp, mant


def encode_bf16(t: torch.Tensor, tile: int = TILE, max_len: int = MAX_LEN) -> dict[str, torch.Tensor]:
    """The four parts of one bf16 tensor (the C++ coder; numpy where it is not built)."""
    exp, mant = split_bf16(t)
    counts = np.bincount(exp.numpy(), minlength=256)
    lens = code_lengths(counts, max_len)
    codes = canonical_codes(lens)
    from kernels import cpu_kernels
    mod = cpu_kernels.load()
    if mod is not None:
        words, tiles = mod.huff_encode(exp, torch.from_numpy(codes), torch.from_numpy(lens), tile)
    else:
        words, tiles = _encode_numpy(exp.numpy(), codes, lens, tile, max_len)
    return {"mant": mant, "exp": words, "tiles": tiles, "lens": torch.from_numpy(lens)}


def _encode_numpy(exp: np.ndarray, codes: np.ndarray, lens: np.ndarray, tile: int,
                  max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The C++ coder's output, vectorized in numpy (a machine without a compiler, e.g. a GPU
    host): each symbol's bits land at its position in a bit array, which packbits turns
    into the stream's bytes (the bits in order: the format's big-endian words)."""
    n = exp.size
    ln = lens[exp].astype(np.int64)
    cd = codes[exp].astype(np.int64)
    tiles = -(-n // tile)
    which = np.arange(n, dtype=np.int64) // tile
    bits = np.bincount(which, weights=ln, minlength=tiles).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum((bits + 31) // 32)]).astype(np.int64)
    before = np.cumsum(ln) - ln                    # bits before each symbol, all tiles
    pos = offsets[which] * 32 + before - before[::tile][which]
    stream = np.zeros((int(offsets[-1]) + 2) * 32, dtype=np.uint8)
    for j in range(max_len):
        sel = ln > j
        stream[pos[sel] + j] = (cd[sel] >> (ln[sel] - 1 - j)) & 1
    words = np.packbits(stream).view(np.int32)
    return torch.from_numpy(words.copy()), torch.from_numpy(offsets)


def decode_bf16(parts: dict[str, torch.Tensor], shape, tile: int = TILE,
                max_len: int = MAX_LEN) -> torch.Tensor:
    mod = _kernels()
    lens = parts["lens"].numpy()
    bits = mod.huff_decode_bf16(parts["exp"], parts["tiles"], decode_table(lens, max_len),
                                max_len, parts["mant"], tile)
    return bits.view(torch.bfloat16).view(*shape)


def crc32(t: torch.Tensor) -> int:
    return zlib.crc32(memoryview(t.contiguous().view(-1).view(torch.uint8).numpy()))


# -- checkpoints ----------------------------------------------------------------------------
def compress_file(src: Path, dst: Path, progress=None, cast: torch.dtype | None = None) -> dict:
    """One safetensors file -> its compressed twin; {name: (original bytes, stored bytes)}.
    cast: floating tensors are first cast to it (bfloat16: an fp32 checkpoint served in bf16;
    the served weights are the same as loading the original with --dtype bfloat16)."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    out, meta, sizes = {}, {}, {}
    with safe_open(str(src), framework="pt") as st:
        for name in st.keys():
            if ":duet." in name:
                raise ValueError(f"{src}: tensor {name!r} is already a compressed part")
            t = st.get_tensor(name)
            if cast is not None and t.is_floating_point():
                t = t.to(cast)
            entry = {"dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape),
                     "crc32": crc32(t)}
            if t.dtype == torch.bfloat16 and t.numel() >= MIN_CODED:
                parts = encode_bf16(t)
                for k, v in parts.items():
                    out[f"{name}:duet.{k}"] = v
                entry["coded"] = True
                stored = sum(v.numel() * v.element_size() for v in parts.values())
            else:
                out[name] = t.contiguous()
                entry["coded"] = False
                stored = t.numel() * t.element_size()
            meta[name] = entry
            sizes[name] = (t.numel() * t.element_size(), stored)
            if progress is not None:
                progress(1)
    save_file(out, str(dst), metadata={"duet_format": FORMAT, "duet_version": VERSION,
                                       "duet_tile": str(TILE), "duet_max_len": str(MAX_LEN),
                                       "duet_tensors": json.dumps(meta)})
    return sizes


def compress_dir(src: str | Path, dst: str | Path, progress_factory=None,
                 cast: torch.dtype | None = None) -> dict:
    """Compress every *.safetensors of src into dst and copy everything else; returns
    {name: (original bytes, stored bytes)}."""
    from safetensors import safe_open
    src, dst = Path(src), Path(dst)
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {str(src)!r}")
    if dst.resolve() == src.resolve():
        raise ValueError(f"OUT_DIR {str(dst)!r} is SRC_DIR: compress into another directory")
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy2(f, dst / f.name)
    total = 0
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            total += len(list(st.keys()))
    sizes: dict = {}
    if progress_factory is None:
        for f in files:
            sizes.update(compress_file(f, dst / f.name, cast=cast))
    else:
        with progress_factory(total) as bar:
            for f in files:
                sizes.update(compress_file(f, dst / f.name, bar.update, cast=cast))
    return sizes


def file_metadata(path: Path) -> dict | None:
    """The compressed format's metadata of one safetensors file; None for a plain one."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as st:
        meta = st.metadata() or {}
    if "duet_format" not in meta:
        return None
    if meta["duet_format"] != FORMAT or meta.get("duet_version") != VERSION:
        raise CompressedCheckpointError(
            f"{path}: format {meta.get('duet_format')!r} version {meta.get('duet_version')!r} "
            f"is not one this Duet reads ({FORMAT!r} version {VERSION!r})")
    return meta


def read_compressed(path: Path, meta: dict, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Decode the tensors of one compressed file (all, or `names`), each checked against
    its CRC-32."""
    from safetensors import safe_open
    tile, max_len = int(meta["duet_tile"]), int(meta["duet_max_len"])
    entries = json.loads(meta["duet_tensors"])
    out = {}
    with safe_open(str(path), framework="pt") as st:
        keys = set(st.keys())
        for name, e in entries.items():
            if names is not None and name not in names:
                continue
            if e["coded"]:
                missing = [f"{name}:duet.{p}" for p in PARTS if f"{name}:duet.{p}" not in keys]
                if missing:
                    raise CompressedCheckpointError(f"{path}: tensor {name!r} is missing its "
                                                    f"part(s) {', '.join(missing)}")
                parts = {p: st.get_tensor(f"{name}:duet.{p}") for p in PARTS}
                n = int(np.prod(e["shape"])) if e["shape"] else 1
                if parts["mant"].numel() != n:
                    raise CompressedCheckpointError(
                        f"{path}: tensor {name!r} has {parts['mant'].numel()} mantissas for "
                        f"shape {e['shape']} ({n} values)")
                try:
                    t = decode_bf16(parts, e["shape"], tile, max_len)
                except (RuntimeError, ValueError) as err:
                    raise CompressedCheckpointError(
                        f"{path}: tensor {name!r}: {str(err).splitlines()[0]}") from None
            else:
                if name not in keys:
                    raise CompressedCheckpointError(f"{path}: tensor {name!r} is missing")
                t = st.get_tensor(name)
            if crc32(t) != e["crc32"]:
                raise CompressedCheckpointError(
                    f"{path}: tensor {name!r} fails its checksum (CRC-32 {crc32(t):#010x}, "
                    f"written {e['crc32']:#010x}): the file is corrupt")
            out[name] = t
    return out


def inspect_dir(path: str | Path) -> list[dict]:
    """Per tensor: name, dtype, shape, original and stored bytes, share of the original."""
    from safetensors import safe_open
    rows = []
    for f in sorted(Path(path).glob("*.safetensors")):
        meta = file_metadata(f)
        if meta is None:
            raise CompressedCheckpointError(f"{f} is not a compressed checkpoint file")
        entries = json.loads(meta["duet_tensors"])
        with safe_open(str(f), framework="pt") as st:
            keys = set(st.keys())
            for name, e in entries.items():
                n = int(np.prod(e["shape"])) if e["shape"] else 1
                orig = n * torch.empty(0, dtype=getattr(torch, e["dtype"])).element_size()
                if e["coded"]:
                    stored = 0
                    for p in PARTS:
                        k = f"{name}:duet.{p}"
                        if k in keys:
                            sl = st.get_slice(k)
                            stored += int(np.prod(sl.get_shape())) * \
                                {"U8": 1, "I32": 4, "I64": 8}[sl.get_dtype()]
                else:
                    stored = orig
                rows.append({"name": name, "dtype": e["dtype"], "shape": e["shape"],
                             "coded": e["coded"], "bytes": orig, "stored": stored,
                             "share": stored / orig if orig else 1.0})
    return rows


def exponent_entropy_share(t: torch.Tensor) -> float:
    """The order-0 bound: (8 raw bits + the exponents' entropy) / 16, for a bf16 tensor."""
    exp, _ = split_bf16(t)
    p = np.bincount(exp.numpy(), minlength=256).astype(np.float64)
    p = p[p > 0] / p.sum()
    return (8.0 - float((p * np.log2(p)).sum())) / 16.0
