"""The Flower ServerApp: LTE through LTEStrategy, or the full-model baseline through Flower's
own FedAvg (method=fedavg), on the same data split.

`flwr run .` reads the run spec from the run config (keys mirror the Hydra keys, e.g.
`lte.heads`, `train.steps`; see [tool.flwr.app.config] in pyproject.toml). The `lte-fed` CLI
builds the app with `make_server_app(spec)` instead.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from lte_fed import protocol as P
from lte_fed.engine import build_summary, write_sample
from lte_fed.job import progress, setup
from lte_fed.rundir import RunDir
from lte_fed.spec import Spec
from lte_fed.train import evaluate

from .grid_utils import CountingGrid, wait_for_nodes
from .lte_strategy import LTEStrategy

log = logging.getLogger("lte_fed.server")


def spec_from_run_config(run_config: dict) -> Spec:
    """Flat run-config keys ('lte.heads': 4) -> Spec. Empty strings stand for null."""
    nested: dict = {}
    for key, value in run_config.items():
        group, _, name = str(key).partition(".")
        value = None if value == "" else value
        if name:
            nested.setdefault(group, {})[name] = value
        else:
            nested[group] = value
    return Spec.from_dict(nested)


def run_server(grid: Grid, spec: Spec, stop_after_rounds: int | None = None) -> None:
    out = Path(spec.run.out or f"outputs/flwr-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    spec = copy.deepcopy(spec)
    spec.run.out = str(out)
    job = setup(spec)
    if spec.method == "fedavg":
        run_fedavg(grid, spec, job, out)
        return
    strategy = LTEStrategy(spec, job, out, round_timeout=spec.run.round_timeout)
    if spec.run.resume:
        strategy.load_state_dict(RunDir(spec.run.resume).load_checkpoint())
        strategy.dir.keep_metrics_through(strategy.round)
        log.info("resumed from %s at round %d", spec.run.resume, strategy.round)
    strategy.start(grid, stop_after_rounds=stop_after_rounds)


def run_fedavg(grid: Grid, spec: Spec, job, out: Path) -> None:
    """Flower's FedAvg on the plain model: every node trains T local steps on its shard."""
    rundir = RunDir(out)
    counting = CountingGrid(grid)
    N = spec.lte.heads
    wait_for_nodes(grid, N, 3600)
    model = copy.deepcopy(job.plain).to(job.device)
    t0 = time.perf_counter()
    last = {"up": 0, "down": 0}

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None
        model.load_state_dict(arrays.to_torch_state_dict())
        ev = evaluate(model, job.data, job.img_size, job.device, spec.train.eval_batch)
        step = min(server_round * spec.merge_every, spec.train.steps)
        row = {"round": server_round, **progress(job, step),
               "train_loss": float("nan"), **ev, "bytes_up": counting.bytes_up - last["up"],
               "bytes_down": counting.bytes_down - last["down"], "wall_s": round(time.perf_counter() - t0, 3)}
        last.update(up=counting.bytes_up, down=counting.bytes_down)
        rundir.append_metrics(row)
        return MetricRecord(ev)

    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=N, min_available_nodes=N)
    result = strategy.start(
        grid=counting, initial_arrays=ArrayRecord(P.wire(model.state_dict())), num_rounds=spec.rounds,
        train_config=ConfigRecord({"spec": P.spec_to_json(spec.to_dict())}), evaluate_fn=evaluate_fn,
    )
    model.load_state_dict(result.arrays.to_torch_state_dict())
    rundir.save_model(model.state_dict(), metadata={"model": spec.model.name, "method": "fedavg"})
    if job.is_text:
        write_sample(rundir, model, job)
    rundir.write_summary(build_summary(spec, rundir.read_metrics(), job))


def make_server_app(spec: Spec | None = None, stop_after_rounds: int | None = None) -> ServerApp:
    """A ServerApp for `spec` (the CLI's way), or reading the run config when None (`flwr run`)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if spec is None:
            _log_progress()
        run_server(grid, spec if spec is not None else spec_from_run_config(dict(context.run_config)), stop_after_rounds)

    return app


def _log_progress() -> None:
    """Under `flwr run` nothing configures logging (the CLI's Hydra does): send lte_fed's INFO
    lines (one per round) to stderr, which `flwr run --stream` / `flwr log` show."""
    logger = logging.getLogger("lte_fed")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


app = make_server_app()
