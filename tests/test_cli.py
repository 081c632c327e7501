"""`lte-fed`, the Hydra app, as a user runs it: a real subprocess."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from .helpers import TAG, interruptible, tagged_processes

QUICK = ["data.name=synthetic", "data.synthetic_size=256", "lte.heads=2", "lte.rank=4", "lte.merge_every=3",
         "train.batch_size=16", "train.steps=6", "train.warmup=2", "run.progress=false", "run.device=cpu"]


def lte_fed(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=_env())


def lte_fed_started(*args: str, cwd: Path, tag: str) -> subprocess.Popen:
    """`lte-fed` in the background; `tag` marks every process it starts (helpers.TAG)."""
    return subprocess.Popen([sys.executable, "-m", "app.cli", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env() | {TAG: tag}, preexec_fn=interruptible)


def _env():
    import os

    root = Path(__file__).resolve().parents[1]
    return os.environ | {"PYTHONPATH": str(root), "HYDRA_FULL_ERROR": "0"}


def test_a_fused_run_writes_its_directory_and_prints_the_table(tmp_path):
    out = tmp_path / "run"
    r = lte_fed(*QUICK, "run.engine=fused", f"run.out={out}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| lte (fused, N=2, r=4)" in r.stdout and "test acc" in r.stdout
    assert {"metrics.jsonl", "summary.json", "model.safetensors", "checkpoint.safetensors"} <= {p.name for p in out.iterdir()}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["lte"]["heads"] == 2 and summary["totals"]["sync_steps"] == 2


@pytest.mark.parametrize("arg, key", [("lte.rank=0", "lte.rank"), ("train.batch_size=15", "train.batch_size"),
                                      ("model.name=nope", "model.name"), ("data.name=imagefolder", "data.root"),
                                      ("method=fedavg", "run.engine")])
def test_bad_input_ends_in_one_clear_line(tmp_path, arg, key):
    r = lte_fed(*QUICK, "run.engine=fused", arg, f"run.out={tmp_path / 'x'}", cwd=tmp_path)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert f"lte-fed: error: {key}" in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("arg, says", [
    ("lte.rnak=4", "lte.rnak: no such config key (did you mean lte.rank?)"),  # Hydra's struct error
    ("+lte.rnak=4", "lte.rnak (did you mean lte.rank?)"),  # added by the user, refused by the spec
    ("model=vit_large", "Could not find 'model/vit_large'"),  # an unknown preset: the choices follow
    ("data.root", "Error parsing override 'data.root'"),
    ("run.resume=my runs/ünï", "quote a value with spaces, brackets or non-ASCII letters"),
    ("lte=3", "lte: a group of keys"),
    # a group set to null put its keys back at their defaults, without a word; a preset set to
    # null was Hydra's traceback
    (("lte.merge_every=2", "lte=null"), "lte: a group of keys (lte.heads, lte.rank, lte.alpha, ...), not null"),
    (("quant=null", "quant.base=nf4"), "quant.base: its group is null here (quant=null)"),
    ("data=null", "data=null: a preset group (model, data, experiment, ablation) takes a preset's name"),
])
def test_a_config_hydra_cannot_compose_ends_in_one_clear_line(tmp_path, arg, says):
    args = (arg,) if isinstance(arg, str) else arg
    r = lte_fed(*args, "run.engine=fused", f"run.out={tmp_path / 'x'}", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    line = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(line) == 1 and line[0].startswith("lte-fed: error: ") and says in line[0], r.stderr[-2000:]
    if args[0].startswith("model="):
        assert "vit_small" in line[0] and "Config search path" not in line[0]


def test_a_diverged_run_stops_in_one_line_and_keeps_its_last_finite_checkpoint(tmp_path):
    out = tmp_path / "x"
    r = lte_fed(*QUICK, "run.engine=fused", "train.lr=1e30", f"run.out={out}", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "lte-fed: error: training diverged: after round 1 (step 3)" in r.stderr and "train.lr" in r.stderr
    assert not (out / "checkpoint.safetensors").exists() and not (out / "model.safetensors").exists()


def test_missing_dataset_says_how_to_get_it(tmp_path):
    r = lte_fed(*QUICK, "run.engine=fused", "data.name=cifar10", f"data.root={tmp_path / 'nothing'}",
                f"run.out={tmp_path / 'x'}", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "lte-fed: error:" in r.stderr and str(tmp_path / "nothing") in r.stderr


# ---------------------------------------------------------------- run.engine=flower, the default
FLOWER = [a for a in QUICK if not a.startswith(("train.steps", "run.progress"))] + ["run.engine=flower"]


def test_two_flower_runs_at_once_both_finish_and_leave_nothing_running(tmp_path):
    """Each run has its own SuperLink on its own port and stops only its own process tree: the
    short run ending (and cleaning up) does not touch the long one. The output is the default
    job's: a progress bar and the table, no deprecation banner, no traceback."""
    tags = {"short": uuid.uuid4().hex, "long": uuid.uuid4().hex}
    steps = {"short": 3, "long": 30}  # 1 and 10 merges
    runs = {name: lte_fed_started(*FLOWER, f"train.steps={steps[name]}", "run.progress=true",
                                  f"run.out={tmp_path / name}", cwd=tmp_path, tag=tags[name])
            for name in ("short", "long")}
    outputs = {name: p.communicate(timeout=600) for name, p in runs.items()}
    for name, p in runs.items():
        out, err = outputs[name]
        assert p.returncode == 0, err[-3000:]
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(3, steps[name] + 1, 3))
        assert {"summary.json", "model.safetensors", "checkpoint.safetensors", "flower.log"} <= {
            f.name for f in (tmp_path / name).iterdir()}
        assert "| lte (flower, N=2, r=4)" in out
        assert "lte flower" in err and f"{steps[name]}/{steps[name]}" in err, err[-2000:]  # the progress bar
        assert "DEPRECATED" not in out + err and "Traceback" not in out + err, (out + err)[-3000:]
        assert "Starting Flower" in (tmp_path / name / "flower.log").read_text()  # Flower's logs went there
        assert tagged_processes(tags[name]) == [], f"the {name} run left processes running"


def test_an_error_only_the_server_app_sees_is_one_line(tmp_path):
    """A missing dataset passes validation and fails in the ServerApp's set-up, under `flwr run`:
    Flower's own output (flower.log) holds one error line and no traceback, and `lte-fed` relays
    that line and exits 2."""
    out = tmp_path / "run"
    r = lte_fed(*FLOWER, "train.steps=6", "data.name=cifar10", f"data.root={tmp_path / 'nothing'}",
                f"run.out={out}", cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and r.stderr.count("lte-fed: error:") == 1, r.stderr[-3000:]
    assert str(tmp_path / "nothing") in r.stderr.split("lte-fed: error:")[1]
    flower_log = (out / "flower.log").read_text()
    assert "Traceback" not in flower_log and flower_log.count("lte-fed: error:") == 1, flower_log[-3000:]


def test_a_flower_run_that_merged_no_head_fails_and_says_so(tmp_path):
    """Every reply rejected (its one head sends NaN in its one round): no result, exit 2."""
    r = lte_fed(*FLOWER, "lte.heads=1", "train.batch_size=8", "train.steps=3", "run.fault=nan:0:1",
                f"run.out={tmp_path / 'run'}", cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "lte-fed: error: no round merged any head (1 rounds)" in r.stderr, r.stderr[-3000:]
    assert "the server said: round 1: head 0" in r.stderr and "non-finite" in r.stderr, r.stderr[-3000:]


def test_ctrl_c_stops_a_flower_run_and_says_how_to_resume(tmp_path):
    out, tag = tmp_path / "run", uuid.uuid4().hex
    p = lte_fed_started(*FLOWER, "train.steps=600", f"run.out={out}", cwd=tmp_path, tag=tag)
    while p.poll() is None and not (out / "checkpoint.safetensors").exists():  # a merge has finished
        time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 130, err[-3000:]
    assert f"resume with run.resume={out}" in err and "Traceback" not in err, err[-3000:]
    assert tagged_processes(tag) == [], "the stopped run left processes running"
    assert not (out / "summary.json").exists()


def test_a_run_is_compared_with_the_stored_full_run_only_on_the_same_images():
    from app.cli import reference_for
    from lte_fed.spec import Spec

    cfg = Spec.from_dict({"data": {"name": "digits"}, "model": {"name": "vit_digits"}}).to_dict()
    assert reference_for(cfg)["method"] == "full"
    for group, key, value in (("model", "img_size", 7), ("model", "patch_size", 7), ("data", "test_fraction", 0.5)):
        assert reference_for(cfg | {group: cfg[group] | {key: value}}) is None, key
