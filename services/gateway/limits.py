"""Per-API-key concurrency limits: one client's burst gets 429s, not everyone's latency.

The broker's queue is fair between keys (each key's oldest request leaves in turn);
this caps how many requests one key may hold at all, queued or running.
"""
from __future__ import annotations

import threading
from collections import defaultdict


class KeyLimiter:
    """At most `max_concurrent` requests per tenant at once (0: no limit)."""

    def __init__(self, max_concurrent: int = 0):
        if max_concurrent < 0:
            raise ValueError(f"max_concurrent={max_concurrent} must be >= 0 (0: no limit)")
        self.max_concurrent = max_concurrent
        self._held: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()

    def acquire(self, tenant: str) -> "Slot | None":
        """A slot for `tenant`, or None when it already holds max_concurrent."""
        with self._lock:
            if self.max_concurrent and self._held[tenant] >= self.max_concurrent:
                return None
            self._held[tenant] += 1
            return Slot(self, tenant)

    def _release(self, tenant: str) -> None:
        with self._lock:
            self._held[tenant] -= 1
            if self._held[tenant] <= 0:
                del self._held[tenant]

    def held(self, tenant: str) -> int:
        with self._lock:
            return self._held.get(tenant, 0)


class Slot:
    """One request's hold on its tenant's limit; release() is idempotent, so whichever
    end of the request comes first gives it back, once."""

    def __init__(self, limiter: KeyLimiter, tenant: str):
        self.limiter, self.tenant, self._held = limiter, tenant, True

    def release(self) -> None:
        if self._held:
            self._held = False
            self.limiter._release(self.tenant)
