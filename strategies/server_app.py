"""The Flower ServerApp: LTE through LTEStrategy, or the baseline through FedAvgStrategy
(FedAvg on the full model (method=fedavg), on the same data split and in the same round loop.

`flwr run .` reads the run spec from the run config (keys mirror the Hydra keys, e.g.
`lte.heads`, `train.steps`; see [tool.flwr.app.config] in pyproject.toml). The `lte-fed` CLI
builds the app with `make_server_app(spec)` instead.
"""

from __future__ import annotations

import copy
import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from lte_fed.job import setup
from lte_fed.spec import Spec

from .fedavg_strategy import FedAvgStrategy
from .lte_strategy import LTEStrategy
from .rounds import out_dir

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


def run_server(grid: Grid, spec: Spec) -> None:
    """One run: LTE (LTEStrategy) or the full-model FedAvg baseline, from the start or resumed."""
    spec = copy.deepcopy(spec)
    spec.run.out = str(out_dir(spec))
    job = setup(spec)
    strategy = (FedAvgStrategy if spec.method == "fedavg" else LTEStrategy)(spec, job, spec.run.out)
    if spec.run.resume:
        strategy.resume()
    strategy.start(grid)


def make_server_app(spec: Spec | None = None, stop_after_rounds: int | None = None) -> ServerApp:
    """A ServerApp for `spec` (the CLI's way), or reading the run config when None (`flwr run`)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if spec is None:
            _log_progress()
        run_server(grid, spec if spec is not None else spec_from_run_config(dict(context.run_config)))

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
