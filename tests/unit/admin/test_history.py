"""The console's chart series from readings: rates, windowed percentiles, blocks in use."""
from __future__ import annotations

from services.admin.sources import History

INF = float("inf")


def test_series_from_readings():
    h = History(sources=None, period_s=2.0)
    w = lambda used, steps: {"used": used, "role": "decode", "prefill_steps": 0,  # noqa: E731
                             "decode_steps": steps}
    h.points.extend([
        {"t": 100.0, "gen": 10, "ttft": [(0.1, 0), (1.0, 1), (INF, 1)],
         "itl": [(0.01, 0), (0.1, 5), (INF, 5)], "running": 0, "queue": 0, "store_used": 3,
         "workers": {"d": w(0, 10)}},
        {"t": 102.0, "gen": 50, "ttft": [(0.1, 4), (1.0, 5), (INF, 5)],   # 4 fast TTFTs
         "itl": [(0.01, 20), (0.1, 25), (INF, 25)], "running": 2, "queue": 1,
         "store_used": 9, "workers": {"d": w(6, 30)}},
        {"t": 104.0, "gen": 50, "ttft": [(0.1, 4), (1.0, 5), (INF, 5)],   # idle interval
         "itl": [(0.01, 20), (0.1, 25), (INF, 25)], "running": 0, "queue": 0,
         "store_used": 3, "workers": {"d": w(0, 30), "p": w(2, 5)}},
    ])
    s = h.series()
    assert s["t"] == [102.0, 104.0]
    assert s["tok_s"] == [20.0, 0.0]
    assert 0 < s["ttft_p50"][0] <= 0.1 and s["ttft_p50"][1] is None   # nothing finished
    assert s["itl_p50"][0] <= 0.01
    assert s["store_used"] == [9, 3] and s["queue"] == [1, 0] and s["running"] == [2, 0]
    assert s["workers"] == {"d": [6, 0], "p": [None, 2]}
    assert s["steps_s"]["d"] == 0.0   # the last interval's rate
