"""Section deploy: one job three ways — a real loopback deployment (SuperLink + SuperNodes started
and stopped by this benchmark, by PID: deploy/loopback.py), Flower's simulation engine and the
fused engine — with wall time per round and its split, and each client's peak memory measured in
the real `flwr-clientapp` processes (the figures the README and `lte-fed-memory` quote).

The job: ViT-B/32 at 224 px on synthetic images, NF4 base, rank 64, 8 samples per head, T=2,
one head per node. Large enough that training is a visible part of a round.

- floor: `python -c "import torch, flwr.clientapp"` timed in this run (the least any message of
  a deployed ClientApp can cost, since Flower starts a process per message), and the peak RSS of
  `python -c "import clients.client_app"` (the import floor memory is measured above);
- per round: wall time (the server's, configure -> aggregate), the slowest client's training
  time, overhead = wall - training, and the clients' reported split (lte_fed/costs.py);
- memory: each ClientApp process's VmHWM from its reply, minus the import floor, next to
  lte_fed.memory's estimate, for the LTE client and the FedAvg (full AdamW) client.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import ROOT

sys.path.insert(0, str(ROOT))
MiB = 2**20


def job_config(out: Path, *, method: str, nodes: int, rounds: int, quick: bool) -> dict[str, str]:
    img = 64 if quick else 224
    model = "vit_small" if quick else "vit_base"
    return {"method": method, "data.name": "synthetic", "data.synthetic_size": 64, "model.name": model,
            "model.img_size": img, "model.patch_size": 32, "quant.base": "nf4", "lte.heads": nodes,
            "lte.rank": 64, "lte.alpha": 128.0, "lte.merge_every": 2, "train.batch_size": 8 * nodes,
            "train.steps": 2 * rounds, "train.warmup": 1, "train.eval_batch": 64, "run.device": "cpu",
            "run.out": str(out), "run.checkpoint_every": 100}


def run_config(cfg: dict) -> str:
    """--run-config syntax: strings in TOML quotes, numbers bare."""
    return " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in cfg.items())


def floor_seconds(reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch, flwr.clientapp"], check=True, cwd=ROOT)
        out.append(time.perf_counter() - t0)
    return out


def floor_rss_mib(cfg: dict | None = None) -> float:
    """Peak RSS of a process that imports the ClientApp (and, given a job, the libraries its
    worker loads: lte_fed.worker.job_imports) and builds nothing."""
    code = "import clients.client_app\n"
    if cfg is not None:
        code += ("from lte_fed.spec import Spec\nfrom lte_fed.worker import job_imports\n"
                 f"job_imports(Spec.from_dict({_nested(cfg)!r}))\n")
    code += "print([int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
    res = subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True, text=True)
    return int(res.stdout.split()[-1]) / 1024


def _nested(cfg: dict) -> dict:
    out: dict = {}
    for k, v in cfg.items():
        if "." in k:
            a, b = k.split(".", 1)
            out.setdefault(a, {})[b] = v
        else:
            out[k] = v
    return out


def rounds_of(out: Path) -> list[dict]:
    """metrics.jsonl rows with each round's own wall time (wall_s is cumulative)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    prev = 0.0
    for r in rows:
        r["round_s"], prev = r["wall_s"] - prev, r["wall_s"]
    return rows


def idle_rss_mib(out: Path) -> float:
    """The largest peak, over a deployed run's nodes, of the ClientApp process that answered the
    server's QUERY (summary.json `nodes`): a process with no job, Flower's per-message runtime
    plus the app's imports."""
    nodes = json.loads((out / "summary.json").read_text()).get("nodes") or []
    return max((float(n["idle_rss_mib"]) for n in nodes), default=0.0)


FLOOR_APP = ROOT / "benchmarks" / "flower_floor"


def deployed(tmp: Path, nodes: int, jobs: dict[str, dict], floor_rounds: int = 3) -> dict[str, list]:
    """Run each job through one fresh loopback deployment; its rows per job name. Then, on the
    same deployment, Flower's own round: the no-op app (benchmarks/flower_floor) sending and
    returning as many bytes per node as the first job's last round did; its round times under
    "flower"."""
    from deploy.loopback import Deployment, make_credentials

    creds = make_credentials(tmp / "creds", nodes, strangers=0)
    d = Deployment(tmp / "deploy", creds / "certs", creds / "keys", nodes=nodes)
    out = {}
    try:
        d.start()
        for name, cfg in jobs.items():
            _deploy_run(d, tmp, name, run_config(cfg))
            out[name] = rounds_of(Path(cfg["run.out"]))
        last = out[next(iter(jobs))][-1]
        floor = {"rounds": floor_rounds, "nodes": nodes, "out": str(tmp / "flower-floor.json"), "arrays": 1,
                 "values": int(last["bytes_up"]) // nodes // 4, "down_values": int(last["bytes_down"]) // nodes // 4}
        _deploy_run(d, tmp, "flower-floor", run_config(floor), FLOOR_APP)
        out["flower"] = json.loads(Path(floor["out"]).read_text())
    finally:
        leftovers, ports = d.stop()
    if leftovers or ports:
        raise RuntimeError(f"the deployment left processes {leftovers} or ports {ports} behind")
    return out


def _deploy_run(d, tmp: Path, name: str, config: str, app: Path = ROOT) -> None:
    log = tmp / f"{name}.log"
    if d.run(config, log, app).wait(timeout=3600) != 0:
        raise RuntimeError(f"flwr run {name} failed:\n{log.read_text()[-3000:]}")


def cli_run(cfg: dict, engine: str, nodes: int) -> list[dict]:
    """The same job through the `lte-fed` CLI (simulation or fused engine)."""
    args = [f"{k}={v}" for k, v in cfg.items()] + [f"run.engine={engine}", "run.progress=false"]
    if engine == "flower":
        args.append(f"run.nodes={nodes}")
    res = subprocess.run([str(Path(sys.executable).parent / "lte-fed"), *args], cwd=ROOT, capture_output=True,
                         text=True)
    if res.returncode:
        raise RuntimeError(f"lte-fed {engine} failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    return rounds_of(Path(cfg["run.out"]))


def estimates(cfg: dict) -> dict[str, float]:
    from lte_fed.lte import LTEConfig
    from lte_fed.memory import analyse, estimate_full, estimate_lte

    shape = analyse(cfg["model.name"], cfg["model.img_size"], num_classes=10, patch_size=cfg["model.patch_size"])
    per_head = cfg["train.batch_size"] // cfg["lte.heads"]
    lte = estimate_lte(shape, LTEConfig(rank=cfg["lte.rank"], quant=cfg["quant.base"]), per_head)
    full = estimate_full(shape, per_head)
    return {"lte_mib": lte["total"] / MiB, "full_mib": full["total"] / MiB,
            "lte_terms_mib": {k: v / MiB for k, v in lte.items()}, "full_terms_mib": {k: v / MiB for k, v in full.items()}}


def main(a) -> dict:
    nodes, rounds = 2, 2  # round 1 prepares the shard caches; round 2 is the steady state
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        floor = floor_seconds(3)
        lte_cfg = job_config(tmp / "lte", method="lte", nodes=nodes, rounds=rounds, quick=a.quick)
        app_rss = floor_rss_mib()
        floor_rss = floor_rss_mib(lte_cfg)
        fedavg_cfg = job_config(tmp / "fedavg", method="fedavg", nodes=nodes, rounds=1, quick=a.quick) | {
            "run.out": str(tmp / "fedavg")}
        dep = deployed(tmp, nodes, {"lte": lte_cfg, "fedavg": fedavg_cfg})
        idle = idle_rss_mib(Path(lte_cfg["run.out"]))
        sim = cli_run(lte_cfg | {"run.out": str(tmp / "sim")}, "flower", nodes)
        fused = cli_run(lte_cfg | {"run.out": str(tmp / "fused")}, "fused", nodes)
    keep = ("round", "round_s", "train_loss", "client_start_s", "client_imports_s", "client_libs_s", "client_data_s",
            "client_model_s", "client_train_s", "client_reply_s", "client_overhead_s", "client_rss_peak_mib",
            "client_rss_entry_mib", "client_cuda_peak_mib", "client_full_weights")
    trim = lambda rows: [{k: r[k] for k in keep if k in r} for r in rows]  # noqa: E731
    est = estimates(lte_cfg)
    lte_peak = max(r["client_rss_peak_mib"] for r in dep["lte"])
    full_peak = max(r["client_rss_peak_mib"] for r in dep["fedavg"])
    warm = [r for r in dep["lte"] if r["round"] > 1]
    overhead = [r["round_s"] - r["client_train_s"] for r in warm]
    runtime = idle - app_rss  # Flower's own state in a message's process, outside both floors
    return {
        "job": {k: v for k, v in lte_cfg.items() if k != "run.out"}, "nodes": nodes,
        "floor_s": floor, "floor_median_s": statistics.median(floor), "floor_rss_mib": floor_rss,
        "app_import_rss_mib": app_rss,
        "deployment": trim(dep["lte"]), "deployment_fedavg": trim(dep["fedavg"]),
        "simulation": trim(sim), "fused": trim(fused),
        "overhead_s": overhead, "overhead_over_floor": [o / statistics.median(floor) for o in overhead],
        # Flower's own deployed round (no-op app, same bytes, same nodes) and what is left of ours
        "flower_round_s": dep["flower"], "flower_round_median_s": statistics.median(dep["flower"]),
        "overhead_beyond_flower_s": [o - statistics.median(dep["flower"]) for o in overhead],
        "memory": {"lte_peak_mib": lte_peak, "fedavg_peak_mib": full_peak, "floor_mib": floor_rss,
                   "app_import_mib": app_rss,
                   "lte_above_floor_mib": lte_peak - floor_rss, "fedavg_above_floor_mib": full_peak - floor_rss,
                   **est,
                   "lte_vs_estimate": (lte_peak - floor_rss) / est["lte_mib"],
                   "lte_vs_fedavg": (lte_peak - floor_rss) / (full_peak - floor_rss),
                   "idle_process_mib": idle, "flower_runtime_mib": runtime,
                   "lte_job_mib": lte_peak - floor_rss - runtime,
                   "lte_job_vs_estimate": (lte_peak - floor_rss - runtime) / est["lte_mib"]},
    }


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.write_text(json.dumps(main(args), indent=1, default=str))
