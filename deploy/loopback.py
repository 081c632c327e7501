"""A loopback deployment of lte-fed, started and stopped by PID: `flower-superlink` with TLS and
SuperNode authentication and authenticated `flower-supernode`s, through the scripts in deploy/.
Shared by tests/test_deploy.py and the deployment benchmark (benchmarks/deployment.py).

    creds = make_credentials(tmp / "creds", nodes=3)
    d = Deployment(tmp / "deploy", creds / "certs", creds / "keys", nodes=3)
    d.start(); proc = d.run(run_config, log); ...; leftovers, ports = d.stop()

Everything lives under the given directories: certs, keys, a private FLWR_HOME, the SuperLink
database, node state. Ports are free loopback ports, picked at start. Each script and command
runs in a session of its own, so `stop()` finds every process it left behind by session id.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
BIN = Path(sys.executable).parent  # the venv's bin: flower-superlink, flower-supernode, flwr
NODES = 3


# ----------------------------------------------------------------------- processes and ports
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name: state, ppid, pgrp, session, ..."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def running(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] != "Z"


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def all_pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def in_sessions(sessions: set[int]) -> dict[int, str]:
    """Live (non-zombie) processes whose session is one of `sessions`: everything the scripts
    and commands this test started in a new session spawned, however deep, whoever reaped them."""
    out = {}
    for pid in all_pids():
        st = _stat(pid)
        if st is not None and st[0] != "Z" and int(st[3]) in sessions:
            out[pid] = cmdline(pid)
    return out


def descendants(pid: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for p in all_pids():
        st = _stat(p)
        if st is not None:
            kids.setdefault(int(st[1]), []).append(p)
    out, todo = [], [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.append(k)
            todo.append(k)
    return out


def kill_tree(pid: int, sig: int) -> list[int]:
    """Send `sig` to PID and every descendant (found before anything is signalled)."""
    tree = [pid, *descendants(pid)]
    for p in tree:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass
    return tree


def wait_gone(pids, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := [p for p in pids if running(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def listening(ports) -> set[int]:
    """Which of `ports` have a socket in LISTEN state (IPv4 or IPv6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            port = int(fields[1].rsplit(":", 1)[1], 16)
            if fields[3] == "0A" and port in ports:
                found.add(port)
    return found


# ----------------------------------------------------------------------------- deployment
class Deployment:
    """SuperLink + SuperNodes started by deploy/*.sh with a private STATE / FLWR_HOME / ports.
    Each script and command runs in a session of its own, so `stop()` finds every process it
    left behind (background daemons, flower-superexec, flwr-serverapp, flwr-clientapp) by
    session id, not by name."""

    def __init__(self, root: Path, certs: Path, keys: Path, nodes: int = NODES):
        self.root, self.nodes = root, nodes
        root.mkdir(parents=True, exist_ok=True)  # the scripts run in it
        self.state = root / "state"
        self.port = free_port()
        self.node_ports = [free_port() for _ in range(nodes)]
        self.federation = "lte-test"
        self.env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "VENV_BIN": str(BIN), "STATE": str(self.state), "CERTS": str(certs), "KEYS": str(keys),
            "FLWR_HOME": str(root / "flwr_home"), "SUPERLINK_HOST": "127.0.0.1",
            "SUPERLINK_PORT": str(self.port), "FEDERATION": self.federation, "START_WAIT": "60",
            "PYTHONUNBUFFERED": "1",
        }
        self.sessions: set[int] = set()
        self.children: list[subprocess.Popen] = []

    # -- commands
    def popen(self, args, **kw) -> subprocess.Popen:
        p = subprocess.Popen([str(a) for a in args], env={**self.env, **kw.pop("env", {})}, start_new_session=True,
                             cwd=self.root, **kw)
        self.sessions.add(p.pid)
        self.children.append(p)
        return p

    def script(self, name: str, *args, check: bool = True, env: dict | None = None, timeout: float = 120) -> str:
        p = self.popen(["bash", DEPLOY / name, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       env=env or {})
        out, _ = p.communicate(timeout=timeout)
        if check:
            assert p.returncode == 0, f"{name} {args} failed ({p.returncode}):\n{out}"
        return out

    def pid(self, name: str) -> int:
        pid = int((self.state / "pids" / f"{name}.pid").read_text())
        assert "flower-super" in cmdline(pid), f"PID {pid} of {name} is {cmdline(pid)!r}"
        return pid

    def log(self, name: str) -> str:
        return (self.state / "logs" / f"{name}.log").read_text(errors="replace")

    def start(self) -> None:
        self.script("start_superlink.sh")
        self.script("register_nodes.sh")
        for i in range(self.nodes):
            self.start_node(i)

    def start_node(self, i: int, capacity: str = "") -> None:
        """SuperNode i; `capacity` is node config it adds ("heads=2 rank=8", NODE_CAPACITY). The
        nodes share this machine's cores (node config `threads`, NODE_THREADS), as one device each
        has its own."""
        threads = max(1, (os.cpu_count() or 1) // self.nodes)
        self.script("start_supernode.sh", i, self.nodes, env={"NODE_PORT": str(self.node_ports[i]),
                                                              "NODE_CAPACITY": capacity, "NODE_THREADS": str(threads)})

    def restart_nodes(self, capacity: dict[int, str]) -> None:
        """Stop every SuperNode (SIGTERM deactivates it at once) and start it again, with the
        node config `capacity[i]` adds ("heads=2 rank=8"; none if absent)."""
        for i in range(self.nodes):
            assert not wait_gone(kill_tree(self.pid(f"supernode_{i}"), signal.SIGTERM), 30)
            self.start_node(i, capacity.get(i, ""))

    def run(self, run_config: str, log: Path, app: Path = REPO) -> subprocess.Popen:
        """`flwr run APP FEDERATION --stream` (APP: this repository's app unless given), in the
        background, its output in `log`."""
        with open(log, "w") as f:
            return self.popen([BIN / "flwr", "run", app, self.federation, "--stream", "--run-config", run_config],
                              stdout=f, stderr=subprocess.STDOUT)

    # -- stopping
    def ports(self) -> set[int]:
        return {self.port, *self.node_ports}

    def stop(self) -> tuple[dict[int, str], set[int]]:
        """deploy/stop_all.sh, then a sweep: whatever of ours still runs is killed by PID.
        Returns what the sweep found (should be nothing) and the ports still listening."""
        for p in self.children:
            if p.poll() is None and p.args[0] != "bash":
                kill_tree(p.pid, signal.SIGTERM)
        if (self.state / "pids").is_dir():
            self.script("stop_all.sh", check=False, timeout=60)
        left = wait_gone(list(in_sessions(self.sessions)), 5)
        leftovers = {p: cmdline(p) for p in left}
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for p in in_sessions(self.sessions):
                kill_tree(p, sig)
            wait_gone(list(in_sessions(self.sessions)), 5)
        for p in self.children:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
        deadline = time.monotonic() + 10  # a closed listening socket can take a moment to go
        while (still := listening(self.ports())) and time.monotonic() < deadline:
            time.sleep(0.2)
        return leftovers, still


def make_credentials(root: Path, nodes: int = NODES, strangers: int = 1) -> Path:
    """A CA + server cert (root/certs), `nodes` registered node keys (root/keys) and `strangers`
    keys that are never registered (root/stranger)."""
    cmds = [["make_certs.sh", root / "certs"], ["make_node_keys.sh", root / "keys", nodes]]
    cmds += [["make_node_keys.sh", root / "stranger", strangers]] if strangers else []
    for cmd in cmds:
        subprocess.run(["bash", DEPLOY / cmd[0], *map(str, cmd[1:])], check=True, capture_output=True, timeout=120)
    return root
