"""Chained block hashes: a full block is named by (parent hash, its token ids)."""
from __future__ import annotations

import hashlib
from array import array

ROOT = b"duet-kv-v1"


def chain_hash(parent: bytes | None, token_ids) -> bytes:
    """A stable 16-byte digest, identical in every process (the KV-store relies on it)."""
    h = hashlib.blake2b(parent or ROOT, digest_size=16)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


def block_hashes(token_ids: list[int], block_size: int, start: int = 0,
                 parent: bytes | None = None) -> list[bytes]:
    """Hashes of every full block of token_ids from block index `start` on."""
    out = []
    for b in range(start, len(token_ids) // block_size):
        parent = chain_hash(parent, token_ids[b * block_size:(b + 1) * block_size])
        out.append(parent)
    return out
