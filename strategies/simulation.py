"""run.engine=flower from the `lte-fed` CLI: the run goes through `flwr run` (Flower's supported
path) on a private SuperLink in simulation mode, `run.nodes` simulated SuperNodes sharing the
heads (by default as many as the machine runs at once; `simulation_nodes`).

`strategies/launcher.py` owns the Flower processes and stops them; this side hands it the whole
spec as a run-config file, shows a progress bar from the run directory's metrics.jsonl while it
waits, keeps Flower's own logs in <run dir>/flower.log (echoed here with run.verbose=true), and
on Ctrl-C (or any exception) has the launcher stop everything before it lets go.
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from lte_fed.rundir import RunDir, diverged, merged_nothing, precheck_resume
from lte_fed.spec import (ERROR_PREFIX, ReportedError, Spec, SpecError, TrainingDiverged, flower_run_config,
                          parse_fleet, toml_lines, validate)

POLL_S = 0.5


def write_run_config(spec: Spec, path: Path) -> Path:
    path.write_text(toml_lines(flower_run_config(spec)), encoding="utf-8")
    return path


def run_flower(spec: Spec, out: str | Path) -> dict:
    """Run `spec` through `flwr run` in Flower's simulation engine; returns the run's summary."""
    validate(spec)
    cpus, ray_cpus = ray_resources(spec)
    spec = absolute_paths(spec, out)
    nodes, resumed_count = simulation_nodes(spec), spec.run.resume and not spec.run.nodes
    spec.run.nodes = nodes  # the server waits for exactly these; summary.json records them
    if resumed_count and (recorded := _checkpoint_nodes(spec.run.resume)) is not None:
        spec.run.nodes = recorded  # the count worked out for the run (FedAvg's before 2026-12: 0)
        nodes = nodes if spec.method == "fedavg" else recorded or nodes  # FedAvg: one node per worker
    if spec.run.resume:  # what can be checked now, not after Flower has started
        precheck_resume(spec)
    rundir = RunDir(spec.run.out)
    log_path = rundir.path / "flower.log"
    cmd = [sys.executable, "-m", "strategies.launcher", "--nodes", str(nodes),
           "--run-config", str(write_run_config(spec, rundir.path / "run_config.toml")),
           "--cpus", str(cpus), "--gpus", str(float(spec.run.client_gpus)), "--log", str(log_path)]
    if ray_cpus:
        cmd += ["--ray-cpus", str(ray_cpus)]
    # Its own session: a Ctrl-C on the terminal reaches only us, and we stop the run in order.
    started, log_start = time.time(), _size(log_path)  # a run resumed in place appends to the log
    launcher = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[1], start_new_session=True)
    try:
        _wait_with_progress(launcher, spec, rundir, log_path, log_start)
    finally:
        if launcher.poll() is None:  # Ctrl-C, SIGTERM made an exception, or any error: stop it all
            _stop(launcher)
    summary = rundir.path / "summary.json"
    if summary.exists() and summary.stat().st_mtime >= started:  # this run's, not an earlier one's
        rows = rundir.read_metrics()
        if rows and (why := diverged(rows[-1])):
            raise TrainingDiverged(f"{why} (metrics: {rundir.metrics_path})")
        if merged_nothing(rows):  # a run that trained nothing is no result
            reasons = "; ".join(_server_said(log_path, log_start)[:4])
            raise ReportedError(f"no round merged any head ({len(rows)} rounds): the model is untrained"
                                + (f"; the server said: {reasons}" if reasons else "")
                                + f"; the workers' errors are in {log_path}{_last_traceback(log_path)}")
        return rundir.read_summary()
    reported = _reported_error(log_path, log_start)
    if reported:
        raise ReportedError(reported)
    # Flower or Ray failed to start (Ray's object store under a memory limit, say), or the ServerApp
    # died: what its log says is the report; our own stack down to here would add nothing
    raise ReportedError(f"the Flower run ended without a summary in {rundir.path} (exit status "
                        f"{launcher.returncode}): see {log_path}{_last_traceback(log_path)}")


def absolute_paths(spec: Spec, out: str | Path) -> Spec:
    """A copy of `spec` whose paths (run.out, run.resume, data.root) are absolute, read from the
    caller's working directory: the Flower processes run in the app's directory, where a relative
    path would name something else (or nothing). A torchvision dataset's default folder (`data`)
    is the caller's too, as in the fused engine."""
    from lte_fed.data import DEFAULT_ROOT, TORCHVISION_DATASETS

    spec = copy.deepcopy(spec)
    spec.run.out = str(Path(out).resolve())
    if spec.run.resume:
        spec.run.resume = os.path.abspath(spec.run.resume)
    if spec.data.root:
        spec.data.root = os.path.abspath(spec.data.root)
    elif spec.data.name in TORCHVISION_DATASETS:
        spec.data.root = os.path.abspath(DEFAULT_ROOT)
    return spec


def ray_resources(spec: Spec) -> tuple[int, int | None]:
    """(CPUs each simulated node takes, CPUs Ray is told the machine has, None: all it has).
    Flower's federation config takes whole numbers, so run.client_cpus = c < 1 (1/c nodes per
    core, for nodes that mostly wait) becomes one CPU per node on a Ray that counts cores / c."""
    cpus = spec.run.client_cpus
    if isinstance(cpus, (int, float)) and 0 < cpus < 1:
        return 1, max(1, round((os.cpu_count() or 1) / cpus))
    if not (isinstance(cpus, (int, float)) and cpus >= 1 and float(cpus).is_integer()):
        raise SpecError(f"run.client_cpus: Flower's simulation takes a whole number of CPUs per node, "
                        f"or a fraction below 1 (several nodes per core), got {cpus!r}")
    return int(cpus), None


def _checkpoint_nodes(resume: str) -> int | None:
    """The node count the run in `resume` had (None where it cannot be read: `precheck_resume`
    then says why)."""
    try:
        return RunDir.existing(resume).load_checkpoint(with_tensors=False)[1]["spec"]["run"]["nodes"]
    except (SpecError, KeyError, TypeError):
        return None


def simulation_nodes(spec: Spec) -> int:
    """Virtual nodes for `spec`: run.nodes, or as many as Ray runs at once (CPU cores /
    run.client_cpus, or GPUs / run.client_gpus when nodes take GPUs), at most one per head.
    FedAvg: one node per worker."""
    if spec.method == "fedavg":
        return spec.lte.heads
    if spec.run.nodes:
        return spec.run.nodes
    if spec.run.fleet:
        return len(parse_fleet(spec.run.fleet))
    parallel = max(1, int((os.cpu_count() or 1) / spec.run.client_cpus))
    if spec.run.client_gpus > 0:
        import torch

        if torch.cuda.is_available():
            parallel = min(parallel, int(torch.cuda.device_count() / spec.run.client_gpus))
    return max(1, min(spec.heads, parallel))


def _fmt(value, spec: str) -> str:
    """A metric for the bar; a round that merged nothing has no loss (null in metrics.jsonl)."""
    return "-" if value is None else format(value, spec)


def _last_traceback(log_path: Path, lines: int = 25) -> str:
    """The end of the last traceback in Flower's log, so that a crash says what crashed."""
    try:
        text = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    starts = [i for i, line in enumerate(text) if "Traceback (most recent call last)" in line]
    return "" if not starts else "\n" + "\n".join(text[starts[-1]:starts[-1] + lines])


def _stop(launcher: subprocess.Popen) -> None:
    """The launcher stops its process tree on SIGTERM; a second Ctrl-C must not cut that short."""
    main = threading.current_thread() is threading.main_thread()  # only there can we mask signals
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
    try:
        launcher.terminate()
        launcher.wait()
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)


def _wait_with_progress(launcher: subprocess.Popen, spec: Spec, rundir: RunDir, log_path: Path,
                        log_start: int) -> None:
    """Wait for the launcher; meanwhile follow metrics.jsonl (one row per merge) in a bar, or
    with run.verbose=true, Flower's log."""
    from tqdm.auto import tqdm

    verbose = spec.run.verbose
    bar = tqdm(total=spec.train.steps, disable=verbose or not spec.run.progress, unit="step",
               dynamic_ncols=True, desc=f"{spec.method} flower")
    bar.set_postfix_str("starting Flower")
    seen, echoed = 0, log_start
    try:
        while launcher.poll() is None or verbose and echoed < _size(log_path):
            time.sleep(POLL_S)
            if verbose:
                echoed = _echo(log_path, echoed)
                continue
            rows = _complete_rows(rundir.metrics_path)
            if len(rows) > seen:
                row, seen = rows[-1], len(rows)
                bar.update(row["step"] - bar.n)
                bar.set_postfix(loss=_fmt(row.get("train_loss"), ".3f"), acc=_fmt(row.get("test_acc"), ".1f"),
                                samples_s=_fmt(row["samples"] / max(row["wall_s"], 1e-9), ".0f"))
    finally:
        bar.close()


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _read_from(path: Path, start: int) -> bytes:
    if not path.exists():
        return b""
    with open(path, "rb") as f:
        f.seek(start)
        return f.read()


def _echo(path: Path, start: int) -> int:
    """Copy what `path` gained since byte `start` to stderr; returns the new end."""
    chunk = _read_from(path, start)
    sys.stderr.write(chunk.decode(errors="replace"))
    sys.stderr.flush()
    return start + len(chunk)


def _complete_rows(path: Path) -> list[dict]:
    """The rows written so far; a line still being written is left for the next look."""
    if not path.exists():
        return []
    text = path.read_text()
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines() if line.strip()]


def _server_said(log_path: Path, start: int) -> list[str]:
    """The warnings and errors the LTE server logged in this run's part of the log (why a head
    was not merged, a node that holds no head), in order."""
    text = _read_from(log_path, start).decode(errors="replace")
    said = [m.group(1) for m in re.finditer(r"(?:WARNING|ERROR) lte_fed\.server: (.*)", text)]
    return [line for line in said if not line.startswith("no round merged")]  # the verdict, not a reason


def _reported_error(log_path: Path, start: int) -> str | None:
    """The one-line error the ServerApp printed in this run's part of the log, if it did."""
    for line in _read_from(log_path, start).decode(errors="replace").splitlines():
        if ERROR_PREFIX in line:
            return line.split(ERROR_PREFIX, 1)[1].strip()
    return None
