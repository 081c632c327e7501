"""The Flower ServerApp: LTE through LTEStrategy, or the baseline through FedAvgStrategy
(FedAvg on the full model, method=fedavg), on the same data split and in the same round loop.

`flwr run .` reads the run spec from the run config (keys mirror the Hydra keys, e.g.
`lte.heads`, `train.steps`; see [tool.flwr.app.config] in pyproject.toml); the `lte-fed` CLI
runs the same app through `flwr run` (strategies/simulation.py).
"""

from __future__ import annotations

import copy
import logging
import sys

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from lte_fed.job import setup
from lte_fed.rundir import served
from lte_fed.spec import ERROR_PREFIX, Spec, user_errors, validate

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
    with served(spec.run.out, spec.run.resume):  # no second Flower run writes there meanwhile
        job = setup(spec)
        strategy = (FedAvgStrategy if spec.method == "fedavg" else LTEStrategy)(spec, job, spec.run.out)
        if spec.run.resume:
            strategy.resume()
        strategy.start(grid)


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """The spec comes from the run config (`flwr run --run-config`; the `lte-fed` CLI writes
    the whole spec there). A user error ends the run with one line, no traceback: Flower would
    log a raised exception's traceback, and `flwr run` exits 0 for a submitted run either way."""
    _log_progress()
    try:
        run_server(grid, validate(spec_from_run_config(dict(context.run_config))))
    except user_errors() as e:
        print(f"{ERROR_PREFIX}{e}", file=sys.stderr, flush=True)


def _log_progress() -> None:
    """Under `flwr run` nothing configures logging (the CLI's Hydra does): send lte_fed's INFO
    lines (one per round) to stderr, which `flwr run --stream` / `flwr log` show."""
    logger = logging.getLogger("lte_fed")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
