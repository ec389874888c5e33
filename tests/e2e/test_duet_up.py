"""`duet up` exactly as a user runs it: a real process tree started by the CLI, found by
the debug commands through the mesh file it writes, and stopped by Ctrl-C with nothing
left behind."""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time

import openai
import pytest
from click.testing import CliRunner

from tests.integration.mesh_util import free_port
from tools.cli import main


def _pids_using(run_dir: str) -> list[int]:
    """Processes whose command line names the run dir (every service's sockets live there)."""
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if run_dir.encode() in f.read():
                        out.append(int(pid))
            except OSError:
                pass
    return out


@pytest.fixture
def duet_up(smollm2_dir, tmp_path, monkeypatch):
    home = tmp_path / "home"
    # the CPU kernels this suite built (tests/conftest.py), keyed by their sources' hash:
    # a fresh home would compile them again inside the readiness wait below
    from duet_kernels import cpu_kernels
    home.mkdir()
    (home / "build").symlink_to(cpu_kernels._build_dir().parent, target_is_directory=True)
    monkeypatch.setenv("DUET_HOME", str(home))
    port, admin, supervisor = free_port(), free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tools.cli", "up", "--model", str(smollm2_dir), "--dtype", "float32",
         "--port", str(port), "--admin-port", str(admin), "--supervisor-port", str(supervisor),
         "--kv-blocks", "256",
         "--log-dir", str(tmp_path / "logs")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    # raw reads of the pipe: a buffered reader would hold lines select() never sees
    out, deadline, fd = b"", time.monotonic() + 180, proc.stdout.fileno()
    try:
        while b"Press Ctrl-C" not in out:
            assert proc.poll() is None, "duet up exited:\n" + out.decode(errors="replace")
            assert time.monotonic() < deadline, "not ready in 180 s:\n" + out.decode(errors="replace")
            if select.select([fd], [], [], 1.0)[0]:
                out += os.read(fd, 65536)
        yield proc, out.decode(), home, port, admin
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)   # only if the test failed before Ctrl-C
            proc.wait()


def test_duet_up_debug_tools_and_ctrl_c(duet_up):
    proc, banner, home, port, admin = duet_up
    assert f"http://127.0.0.1:{port}/v1" in banner and f"admin:       http://127.0.0.1:{admin}" in banner
    info = json.loads((home / "mesh.json").read_text())
    assert oct((home / "mesh.json").stat().st_mode & 0o777) == "0o600"
    assert info["pid"] == proc.pid and info["curve_dir"].startswith(info["run_dir"])

    c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
    prompt = "Tell me about the city of Paris. " * 4
    assert c.completions.create(model="smollm2", prompt=prompt, max_tokens=4, temperature=0).choices[0].text

    run = lambda *args: CliRunner().invoke(main, list(args), catch_exceptions=False)  # noqa: E731
    r = run("status")
    assert r.exit_code == 0, r.output
    assert "ready, disaggregated" in r.output and "prefill-0" in r.output and "decode-0" in r.output
    assert "prefill_compute" in r.output and "1 finished" in r.output
    r = run("kv", "status")
    assert r.exit_code == 0 and "total_blocks    256" in r.output and "idle" in r.output, r.output
    r = run("kv", "ledger")
    assert r.exit_code == 0 and "no live leases" in r.output, r.output
    # the prompt's full blocks were committed by prefill: a lookup finds them (and unpins)
    ids = run("tokenizer", "encode", prompt).output.split()
    assert len(ids) > 16 and all(i.isdigit() for i in ids)
    r = run("kv", "lookup", prompt)
    assert r.exit_code == 0 and f"prompt: {len(ids)} tokens; cached prefix: " in r.output, r.output
    cached = int(r.output.split("cached prefix: ")[1].split()[0])
    assert 16 <= cached <= len(ids) and cached % 16 == 0
    assert run("tokenizer", "decode", *ids).output.strip() == prompt.strip()
    r = run("worker", "list")
    assert r.exit_code == 0 and {w["worker_id"] for w in json.loads(r.output)["workers"]} == {
        "prefill-0", "decode-0"}
    assert "no live leases" in run("kv", "ledger").output   # the lookup's pin was released

    # a crashed worker is restarted, counted, and serves again; the mesh never stopped
    def incarnation():
        ws = json.loads(run("worker", "list").output)["workers"]
        return next((w["incarnation"] for w in ws if w["worker_id"] == "decode-0"), None)
    before = incarnation()
    [victim] = [p for p in _pids_using(info["run_dir"]) if b"decode-0" in
                open(f"/proc/{p}/cmdline", "rb").read()]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 90
    while "decode-0 up (1 restarts)" not in (r := run("status")).output:
        assert time.monotonic() < deadline, r.output
        time.sleep(0.5)
    while incarnation() in (before, None):   # the new process registered
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert c.completions.create(model="smollm2", prompt="Back again:", max_tokens=4,
                                temperature=0).choices[0].text

    # Ctrl-C: every service stops, the mesh file goes, nothing is left running
    os.killpg(proc.pid, signal.SIGINT)
    out = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 0, out
    assert "stopping Duet" in out and "decode-0 exited with code -9; restarting" in out
    assert not (home / "mesh.json").exists()
    assert _pids_using(info["run_dir"]) == []
    assert not os.path.exists(info["run_dir"])
    r = run("kv", "status")
    assert r.exit_code != 0 and "no running mesh found" in r.output
