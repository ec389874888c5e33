"""`make soak`: mixed load on a supervised mesh while a chaos loop kills a random worker
every few minutes (DUET_SOAK_MINUTES, default 30; DUET_SOAK_CHAOS_S, default 180)."""
from __future__ import annotations

import json
import os

import pytest

from tests.integration.mesh_util import start_mesh
from tools.soak import print_report, run_soak

pytestmark = pytest.mark.slow


def test_soak_with_chaos(smollm2_dir, tmp_path):
    minutes = float(os.environ.get("DUET_SOAK_MINUTES", "30"))
    chaos_s = float(os.environ.get("DUET_SOAK_CHAOS_S", "180"))
    mesh = start_mesh(smollm2_dir, tmp_path, dtype="auto", prefill=1, decode=2)
    try:
        rep = run_soak(mesh, minutes, chaos_s, clients=6)
    finally:
        mesh.stop()
    print_report(rep)
    out = os.environ.get("DUET_SOAK_JSON")
    if out:
        with open(out, "w") as f:
            json.dump(rep, f, indent=1)
    assert rep["requests"] > 0 and rep["outcomes"].get("ok", 0) > 0
    assert rep["leaked_leases"] == 0
    # outside a fault window nothing fails; inside one, only what the fault explains
    assert rep["errors_outside_faults"] == 0, rep["errors_by_cause"]
    if chaos_s:
        assert len(rep["faults"]) >= int(minutes * 60 // chaos_s) - 1
    for f in rep["faults"]:
        assert f["back_after_s"] < 60, f
    for name, series in rep["rss_mb"].items():
        if rep["restarts"].get(name, 0) == 0 and len(series) >= 8:
            first, last = series[len(series) // 4][1], series[-1][1]
            assert last < first * 1.5 + 100, (name, series)   # no runaway growth
