"""`flwr run` in Flower's simulation engine on a private SuperLink, and nothing left behind.

    python -m strategies.launcher --nodes 4 --run-config run.toml [--log flower.log]

One launcher process per run. It becomes a child subreaper, so every process started under it
(the SuperLink, its SuperExec, flwr-simulation, Ray's double-forked daemons) stays in its
process tree; it starts its own `flower-superlink` on a free loopback port with a private
FLWR_HOME (so two runs on one machine never meet), runs `flwr run <repo> --stream` against it,
and at the end, or on SIGTERM / SIGINT / its parent's death, stops exactly its descendants:
TERM, then KILL. It never looks processes up by name. Standard library only: it starts in
milliseconds and imports neither torch nor flwr.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the Flower app: pyproject.toml's [tool.flwr.app]
FEDERATION = "lte-fed"
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36


def _prctl(option: int, value: int) -> None:
    """Linux only; elsewhere the launcher still works, minus the guarantees prctl gives."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _die_with_us() -> None:
    """In a child, before it runs: SIGTERM when the launcher dies, even by SIGKILL (which leaves
    no chance to stop the tree): the SuperLink's own children follow it (--parent-pid)."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


# ------------------------------------------------------------------------- the process tree
def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of `pid` from /proc, or None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1])


def descendants(root: int) -> list[int]:
    """Live (non-zombie) processes below `root`, from /proc's parent links."""
    children: dict[int, list[int]] = {}
    states: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))):
            states[int(entry)] = st[0]
            children.setdefault(st[1], []).append(int(entry))
    found, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        if states.get(pid) != "Z":
            found.append(pid)
    return found


def _reap() -> None:
    """Collect every exited child: as subreaper we inherit orphans and must reap them."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass  # gone already, or a PID reused by someone else's process since we listed it


def stop_descendants(grace_s: float = 10.0) -> None:
    """TERM every descendant (again for any that appear meanwhile), KILL what is left after
    `grace_s`, and reap them all."""
    me = os.getpid()
    deadline = time.monotonic() + grace_s
    termed: set[int] = set()
    while (left := descendants(me)) and time.monotonic() < deadline:
        _signal([p for p in left if p not in termed], signal.SIGTERM)
        termed.update(left)
        time.sleep(0.1)
        _reap()
    while left := descendants(me):
        _signal(left, signal.SIGKILL)
        time.sleep(0.1)
        _reap()
    _reap()


# --------------------------------------------------------------------------- the SuperLink
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listens(pid: int, port: int) -> bool:
    """`pid` itself holds the listening socket on `port` (not another run's SuperLink that
    took the port between our probe and our SuperLink's bind)."""
    fds = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                fds.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except OSError:
                pass  # closed meanwhile
        table = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return False
    for row in map(str.split, table):  # local address, state (0A: LISTEN), inode
        if row[3] == "0A" and int(row[1].split(":")[1], 16) == port and f"socket:[{row[9]}]" in fds:
            return True
    return False


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=0.5) as r:
            return r.status == 200
    except OSError:
        return False


def start_superlink(env: dict, log) -> int:
    """A simulation SuperLink on a free port; returns the port. Another process can take the
    port between our probe and the SuperLink's bind: then its SuperLink exits, and we retry."""
    for _ in range(5):
        port = free_port()
        proc = subprocess.Popen(
            ["flower-superlink", "--insecure", "--simulation", "--isolation", "subprocess",
             "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=log, stderr=log, start_new_session=True, preexec_fn=_die_with_us)
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            if _listens(proc.pid, port) and _healthy(port):
                return port
            time.sleep(0.1)
        stop_descendants(grace_s=2)
    raise RuntimeError("flower-superlink did not start (see its log)")


def flower_env(home: Path) -> dict:
    """The environment of every Flower process of this run."""
    home.mkdir(parents=True, exist_ok=True)
    bin_dir = str(Path(sys.executable).parent)  # SuperLink and SuperExec start Flower's tools by name
    return os.environ | {
        "FLWR_HOME": str(home), "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_DEDUP_LOGS": "0",
    }


def run(home: Path, nodes: int, run_config: str | None, cpus: int, gpus: float, log, app: Path = ROOT,
        ray_cpus: int | None = None) -> int:
    """The whole run of the Flower app in `app`; returns `flwr run`'s exit status. The caller
    stops the tree."""
    env = flower_env(home)
    port = start_superlink(env, log)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{FEDERATION}"\n\n'
        f'[superlink.{FEDERATION}]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    federation = f"num-supernodes={nodes} client-resources-num-cpus={cpus} client-resources-num-gpus={gpus}"
    if ray_cpus:  # Ray schedules by this count, not by the cores it finds
        federation += f" init-args-num-cpus={ray_cpus}"
    cmd = ["flwr", "run", str(app), FEDERATION, "--stream", "--federation-config", federation]
    if run_config:
        cmd += ["--run-config", run_config]
    flwr = subprocess.Popen(cmd, env=env, stdout=log, stderr=log, start_new_session=True, preexec_fn=_die_with_us)
    while True:  # wait for `flwr run`, reaping the orphans that come our way meanwhile
        pid, status = os.waitpid(-1, 0)
        if pid == flwr.pid:
            flwr.returncode = os.waitstatus_to_exitcode(status)
            return flwr.returncode


def _stop_on(signum: int, _frame) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m strategies.launcher", description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, required=True, help="simulated SuperNodes")
    p.add_argument("--run-config", help="a TOML file, or 'key=value ...', for `flwr run --run-config`")
    p.add_argument("--cpus", type=int, default=1, help="CPUs per simulated SuperNode")
    p.add_argument("--gpus", type=float, default=0.0, help="fraction of a GPU per simulated SuperNode")
    p.add_argument("--ray-cpus", type=int, help="CPUs Ray counts on this machine (default: its cores)")
    p.add_argument("--log", help="where Flower's output goes (default: this terminal)")
    p.add_argument("--app", type=Path, default=ROOT, help="the Flower app's directory (default: lte-fed's)")
    args = p.parse_args(argv)
    parent = os.getppid()
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)  # our parent died: stop everything we started
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _stop_on)
    if os.getppid() != parent:  # it died before PDEATHSIG was armed
        return 128 + signal.SIGTERM
    log = open(args.log, "ab") if args.log else None
    with tempfile.TemporaryDirectory(prefix="lte-fed-flwr-", ignore_cleanup_errors=True) as tmp:
        try:
            return run(Path(tmp) / "flwr_home", args.nodes, args.run_config, args.cpus, args.gpus, log, args.app, args.ray_cpus)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
            stop_descendants()


if __name__ == "__main__":
    sys.exit(main())
