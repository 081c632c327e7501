"""run.engine=flower from the `lte-fed` CLI: Flower's simulation engine, one virtual node per
head (CPUs, or GPUs shared by fraction with run.client_gpus), and nothing left running after.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

from lte_fed.rundir import RunDir
from lte_fed.spec import Spec, validate

log = logging.getLogger("lte_fed")


def ray_pids() -> set[int]:
    """PIDs of Ray's processes (raylet, GCS, workers and actors) on this machine, from /proc."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "ray::" in cmd or "raylet" in cmd or "gcs_server" in cmd or "ray/_private" in cmd:
            pids.add(int(entry.name))
    return pids


def stop_pids(pids: set[int], grace_s: float = 10.0) -> None:
    """Ray's actors can outlive the simulation by seconds: give them `grace_s` to exit, then
    SIGTERM, then SIGKILL, so a run leaves nothing behind."""
    import signal
    import time

    deadline = time.monotonic() + grace_s
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig is not None:
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 3.0
        while pids and time.monotonic() < deadline:
            pids = {p for p in pids if Path(f"/proc/{p}").exists() and not _zombie(p)}
            time.sleep(0.1)
        if not pids:
            return


def _zombie(pid: int) -> bool:
    """True once `pid` has exited; reaps it when it is our own child."""
    try:
        if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z":
            return False
    except OSError:
        return True
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass  # someone else's child: its parent reaps it
    return True


def run_flower(spec: Spec, out: str | Path, stop_after_rounds: int | None = None) -> dict:
    """Run `spec` in Flower's simulation engine; returns the run's summary."""
    validate(spec)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    import ray
    from flwr.simulation import run_simulation

    from clients.client_app import app as client_app

    from .server_app import make_server_app

    spec = copy.deepcopy(spec)
    spec.run.out = str(Path(out).resolve())
    nodes = spec.lte.heads
    backend = {
        "client_resources": {"num_cpus": spec.run.client_cpus, "num_gpus": spec.run.client_gpus},
        "init_args": {"include_dashboard": False, "log_to_driver": True},
    }
    before = ray_pids()
    try:
        run_simulation(server_app=make_server_app(spec, stop_after_rounds), client_app=client_app,
                       num_supernodes=nodes, backend_config=backend)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        stop_pids(ray_pids() - before)
    rundir = RunDir(spec.run.out)
    if stop_after_rounds is not None:
        return {"stopped_at_round": len(rundir.read_metrics())}
    if not (rundir.path / "summary.json").exists():
        raise RuntimeError(f"the Flower run ended without a summary in {rundir.path}: see the log above")
    return rundir.read_summary()
