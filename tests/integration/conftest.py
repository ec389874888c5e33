"""The disaggregated mesh that several integration modules share (one start per session)."""
from __future__ import annotations

import pytest

from tests.integration.mesh_util import start_mesh


@pytest.fixture(scope="session")
def disagg(smollm2_dir, tmp_path_factory):
    """1 prefill + 1 decode worker, kvstore, tokenizer, gateway and admin console, as
    separate processes. Tests that flip roles or drain workers put them back."""
    mesh = start_mesh(smollm2_dir, tmp_path_factory.mktemp("disagg-logs"), prefill=1, decode=1)
    yield mesh
    mesh.stop()
