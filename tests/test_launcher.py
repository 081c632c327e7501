"""The launcher's process hygiene without Flower: as a child subreaper it keeps double-forked
daemons (as Ray starts them) in its tree, and stops exactly its descendants, also those that
ignore SIGTERM, while a same-named process of someone else's keeps running."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

from .helpers import TAG, tagged_processes

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent("""
    import os, subprocess
    from strategies import launcher
    launcher._prctl(launcher.PR_SET_CHILD_SUBREAPER, 1)
    # Two daemons whose parent shell exits at once (a double fork); one ignores SIGTERM.
    subprocess.run(["bash", "-c", "(sleep 300 &); (trap '' TERM; exec sleep 301) & exit 0"], check=True)
    print(len(launcher.descendants(os.getpid())), flush=True)
    launcher.stop_descendants(grace_s=1)
    print(len(launcher.descendants(os.getpid())), flush=True)
""")


def test_stop_descendants_gets_double_forked_daemons_and_nothing_else():
    mine, theirs = uuid.uuid4().hex, uuid.uuid4().hex
    other = subprocess.Popen(["sleep", "300"], env=os.environ | {TAG: theirs})  # same name, not the launcher's
    try:
        r = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, capture_output=True, text=True, timeout=60,
                           env=os.environ | {TAG: mine, "PYTHONPATH": str(ROOT)})
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == ["2", "0"]  # both daemons stayed in its tree, then were stopped
        assert tagged_processes(mine) == []
        assert other.poll() is None and len(tagged_processes(theirs)) == 1
    finally:
        other.kill()
        other.wait()


def test_the_run_config_carries_every_spec_key_flower_accepts(tmp_path):
    """`lte-fed` hands the whole spec to `flwr run`; the SuperLink refuses keys that
    pyproject.toml's [tool.flwr.app.config] does not declare, and the ServerApp reads them back."""
    import tomllib

    from strategies.server_app import spec_from_run_config
    from strategies.simulation import write_run_config

    from .helpers import quick_spec

    # a path beyond U+FFFF (json.dumps wrote it as a surrogate pair, which TOML refuses), quotes,
    # a backslash and control characters
    out = str(tmp_path / 'r\u00fcn "\U0001f600"\\\t\x7f')
    spec = quick_spec("lte", "flower", train={"lr": None}, run={"fault": "nan:1:2", "out": out})
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    written = tomllib.loads(write_run_config(spec, tmp_path / "run.toml").read_text(encoding="utf-8"))
    assert written["run.out"] == out
    assert set(written) == set(declared)
    back = spec_from_run_config(written)
    back.run.client_cpus, back.run.client_gpus = spec.run.client_cpus, spec.run.client_gpus  # --federation-config
    assert back == spec


def test_the_launcher_runs_another_app_and_leaves_nothing_behind(tmp_path):
    """`--app`: the no-op app that measures Flower's own round trip (benchmarks/flower_floor)
    runs its rounds through the launcher; every process it started is gone afterwards."""
    import json

    tag, out = uuid.uuid4().hex, tmp_path / "times.json"
    r = subprocess.run([sys.executable, "-m", "strategies.launcher", "--app", str(ROOT / "benchmarks" / "flower_floor"),
                        "--nodes", "2", "--run-config", f"nodes=2 rounds=3 arrays=2 values=10 out='{out}'",
                        "--log", str(tmp_path / "flower.log")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=os.environ | {TAG: tag})
    assert r.returncode == 0, r.stderr + (tmp_path / "flower.log").read_text()[-3000:]
    times = json.loads(out.read_text())
    assert len(times) == 3 and all(t > 0 for t in times)
    assert tagged_processes(tag) == []


SUITE = textwrap.dedent("""
    import subprocess, time
    import pytest

    @pytest.fixture
    def server():
        p = subprocess.Popen(["sleep", "300"], start_new_session=True, stdout=subprocess.DEVNULL)  # as a SuperLink is started
        yield p
        p.kill()
        p.wait()

    def test_long(server):
        print("started", flush=True)
        time.sleep(120)
""")


def test_a_suite_stopped_by_sigterm_still_stops_what_its_tests_started(tmp_path):
    """tests/conftest.py: SIGTERM to pytest (a harness's `timeout`) runs the fixtures' teardown,
    so a server a test started in its own session is stopped, not left behind."""
    import signal
    import time

    (tmp_path / "test_suite.py").write_text(SUITE)
    tag = uuid.uuid4().hex
    p = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-p", "tests.conftest",
                          str(tmp_path / "test_suite.py")], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                         env=os.environ | {TAG: tag, "PYTHONPATH": str(ROOT)})
    try:
        for line in p.stdout:
            if "started" in line:
                break
        deadline = time.monotonic() + 30
        while len(tagged_processes(tag)) < 2 and time.monotonic() < deadline:  # pytest and its sleep
            time.sleep(0.1)
        assert len(tagged_processes(tag)) == 2, tagged_processes(tag)
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=60)
        assert p.returncode == 2  # pytest's "interrupted"
        assert tagged_processes(tag) == []
    finally:
        p.kill()
        p.wait()
        for line in tagged_processes(tag):  # what a failed run left behind, by PID
            os.kill(int(line.split()[0]), signal.SIGKILL)
