"""Where this process runs, as far as a container tells: its Docker container id, from the
bind mounts Docker makes for /etc/hostname and /etc/hosts (present under host networking
too, where the hostname is the host's)."""
from __future__ import annotations

import re

_ID = re.compile(r"/(?:docker/)?containers/([0-9a-f]{64})/")


def container_id(mountinfo: str = "/proc/self/mountinfo") -> str | None:
    try:
        with open(mountinfo) as f:
            for line in f:
                m = _ID.search(line)
                if m:
                    return m.group(1)
    except OSError:
        pass
    return None


def default_worker_id(role: str) -> str | None:
    """`{role}-{container id[:12]}` inside a container (replicas of one compose service get
    distinct, recognizable ids); None elsewhere."""
    cid = container_id()
    return f"{role}-{cid[:12]}" if cid else None
