"""Lossless compressed checkpoints: bf16 weights as an entropy-coded stream of exponents (with
the top two mantissa bits) beside a raw plane of the other six bits.

A trained model's bf16 exponents carry ~2.6 of their 8 bits; sign and mantissa are close to
incompressible, but not quite: the mantissa's top bits are skewed (values spread
log-uniformly within an octave), so coding them with the exponent saves ~0.07 bits a value
over coding the exponent alone. Each bf16 tensor (of at least MIN_CODED values) becomes
  NAME:duet.raw    uint8 [3 n/4]  sign and the 5 low mantissa bits of each value, 6 bits,
                                  four values in three bytes, MSB-first
  NAME:duet.exp    int32 [words]  the symbols (exponent << 2 | top two mantissa bits),
                                  canonical Huffman codes of at most MAX_LEN bits, MSB-first,
                                  in tiles of TILE values, each a whole number of big-endian
                                  32-bit words (tiles decode in parallel), two zero words after
  NAME:duet.tiles  int64 [t + 1]  where each tile starts, in words
  NAME:duet.lens   uint8 [1024]   each symbol's code length (0: absent), which fixes the
                                  canonical code
Every symbol a tensor holds gets a code (no escapes, no verbatim fallback). Other
tensors (fp16, fp32, ints, small bf16) are stored as they are. The safetensors metadata
holds the format name and version and, per tensor, its dtype, shape and the CRC-32 of its
original bytes, checked after decoding. The coder is C++ (duet_kernels/cpu/huffman.cpp).

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
PARTS = ("raw", "exp", "tiles", "lens")
SYMBOLS = 1024        # exponent (8 bits) and the top two mantissa bits


class CompressedCheckpointError(ValueError):
    """A compressed checkpoint that cannot be decoded as written: the message names the
    tensor and the check that failed."""


def _kernels():
    from duet_kernels import cpu_kernels
    mod = cpu_kernels.load()
    if mod is None:
        raise RuntimeError(f"compressed checkpoints need Duet's C++ CPU kernels, which are not "
                           f"built here ({cpu_kernels._failed})")
    return mod


# -- the code -------------------------------------------------------------------------------
def code_lengths(counts: np.ndarray, max_len: int = MAX_LEN) -> np.ndarray:
    """Huffman code lengths (uint8, one per symbol) for symbol counts, none longer than
    max_len (package-merge); a lone symbol gets a 1-bit code."""
    present = [(int(c), i) for i, c in enumerate(counts) if c > 0]
    lens = np.zeros(len(counts), dtype=np.uint8)
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
    """The canonical code (int32, one per symbol) of each symbol for these lengths."""
    codes = np.zeros(len(lens), dtype=np.int32)
    code, prev = 0, 0
    for length, sym in sorted((int(n), s) for s, n in enumerate(lens) if n > 0):
        code <<= length - prev
        codes[sym] = code
        code += 1
        prev = length
    return codes


def decode_table(lens: np.ndarray, max_len: int) -> torch.Tensor:
    """int32 [2**max_len]: for each max_len-bit window, symbol | length << 16 (0: no code)."""
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
        table[lo:lo + (1 << (max_len - n))] = s | (n << 16)
    return torch.from_numpy(table)


def split_bf16(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(symbols int16 [n]: exponent << 2 | top two mantissa bits, the raw plane uint8
    [3 ceil(n/4)]: sign and low five mantissa bits, 6 bits a value) of a bf16 tensor."""
    bits = t.contiguous().view(-1).view(torch.int16).to(torch.int32) & 0xFFFF
    sym = ((bits >> 5) & 0x3FF).to(torch.int16)
    r = (((bits >> 10) & 0x20) | (bits & 0x1F)).numpy().astype(np.uint32)
    r = np.concatenate([r, np.zeros(-len(r) % 4, dtype=np.uint32)]).reshape(-1, 4)
    x = (r[:, 0] << 18) | (r[:, 1] << 12) | (r[:, 2] << 6) | r[:, 3]
    raw = np.stack([(x >> 16) & 0xFF, (x >> 8) & 0xFF, x & 0xFF], axis=1).astype(np.uint8)
    return sym, torch.from_numpy(raw.reshape(-1))


def exponents(t: torch.Tensor) -> np.ndarray:
    return ((t.contiguous().view(-1).view(torch.int16).numpy().astype(np.int32) >> 7) & 0xFF)


def encode_bf16(t: torch.Tensor, tile: int = TILE, max_len: int = MAX_LEN) -> dict[str, torch.Tensor]:
    """The four parts of one bf16 tensor (the C++ coder; numpy where it is not built)."""
    sym, raw = split_bf16(t)
    counts = np.bincount(sym.numpy().astype(np.int64), minlength=SYMBOLS)
    lens = code_lengths(counts, max_len)
    codes = canonical_codes(lens)
    from duet_kernels import cpu_kernels
    mod = cpu_kernels.load()
    if mod is not None:
        words, tiles = mod.huff_encode(sym, torch.from_numpy(codes), torch.from_numpy(lens), tile)
    else:
        words, tiles = _encode_numpy(sym.numpy().astype(np.int64), codes, lens, tile, max_len)
    return {"raw": raw, "exp": words, "tiles": tiles, "lens": torch.from_numpy(lens)}


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
    n = int(np.prod(shape)) if len(shape) else 1
    bits = mod.huff_decode_bf16(parts["exp"], parts["tiles"], decode_table(lens, max_len),
                                max_len, parts["raw"], n, tile)
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
                if parts["raw"].numel() != (n + 3) // 4 * 3 or parts["lens"].numel() != SYMBOLS:
                    raise CompressedCheckpointError(
                        f"{path}: tensor {name!r} has a raw plane of {parts['raw'].numel()} "
                        f"bytes and {parts['lens'].numel()} code lengths for shape "
                        f"{e['shape']} ({n} values: {(n + 3) // 4 * 3} bytes, {SYMBOLS} lengths)")
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
    """The order-0 bound of coding the exponents alone: (8 raw bits + the exponents'
    entropy) / 16, for a bf16 tensor (coding the top mantissa bits with them goes below)."""
    p = np.bincount(exponents(t), minlength=256).astype(np.float64)
    p = p[p > 0] / p.sum()
    return (8.0 - float((p * np.log2(p)).sum())) / 16.0
