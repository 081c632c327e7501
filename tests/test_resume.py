"""A run interrupted with Ctrl-C, then resumed into a NEW directory, ends with the weights of an
uninterrupted run and a metrics.jsonl holding every round — for the fused engine, the Flower
engine and FedAvg, through the real `lte-fed` command. Also: what a resume refuses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lte_fed.rundir import RunDir

from .helpers import interruptible, max_abs_diff, model_of

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.timeout(900)


def job(engine: str, method: str, steps: int) -> list[str]:
    return [f"method={method}", f"run.engine={engine}", "data=synthetic", "data.synthetic_size=256", "lte.heads=2",
            "lte.rank=4", "lte.alpha=32.0", "lte.merge_every=2", "train.batch_size=16", f"train.steps={steps}",
            "train.warmup=2", "run.device=cpu", "run.progress=false"]


def lte_fed(args: list[str], out: Path, log: Path) -> subprocess.Popen:
    with open(log, "w") as f:  # a session of its own: Ctrl-C goes to its process group, as a terminal's would
        return subprocess.Popen([str(BIN / "lte-fed"), *args, f"run.out={out}"], stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                preexec_fn=interruptible)


def rounds_logged(out: Path) -> int:
    path = out / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def ctrl_c_after(proc: subprocess.Popen, out: Path, rounds: int, log: Path) -> str:
    """SIGINT once `rounds` rounds are logged: wherever that falls (before or after that round's
    checkpoint), resuming must end where the uninterrupted run ends."""
    deadline = time.monotonic() + 600
    while rounds_logged(out) < rounds:
        assert proc.poll() is None, f"the run ended before round {rounds}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=120)
    return log.read_text(errors="replace")


@pytest.mark.parametrize("engine, method, steps, cut_at", [
    ("fused", "lte", 120, 3),
    ("flower", "lte", 12, 2),
    ("flower", "fedavg", 12, 2),
])
def test_ctrl_c_then_resume_elsewhere_ends_as_an_uninterrupted_run(tmp_path, engine, method, steps, cut_at):
    args = job(engine, method, steps)
    whole = lte_fed(args, tmp_path / "whole", tmp_path / "whole.log")
    assert whole.wait(timeout=800) == 0, (tmp_path / "whole.log").read_text()[-3000:]

    cut = lte_fed(args, tmp_path / "cut", tmp_path / "cut.log")
    text = ctrl_c_after(cut, tmp_path / "cut", cut_at, tmp_path / "cut.log")
    assert cut.returncode != 0, text[-3000:]
    assert "Traceback" not in text and "run.resume=" in text, text[-3000:]
    assert len(RunDir(tmp_path / "cut").read_metrics()) < steps // 2, "the interrupt came too late to test anything"

    resumed = lte_fed([*args, f"run.resume={tmp_path / 'cut'}"], tmp_path / "new", tmp_path / "new.log")
    assert resumed.wait(timeout=800) == 0, (tmp_path / "new.log").read_text()[-3000:]
    rows = RunDir(tmp_path / "new").read_metrics()
    assert [r["round"] for r in rows] == list(range(1, steps // 2 + 1))
    reference = RunDir(tmp_path / "whole").read_metrics()
    assert [r["test_loss"] for r in rows] == pytest.approx([r["test_loss"] for r in reference], abs=1e-6)
    assert [r["merged_heads"] for r in rows if "merged_heads" in r] == [r["merged_heads"] for r in reference if "merged_heads" in r]
    assert max_abs_diff(model_of(tmp_path / "whole"), model_of(tmp_path / "new")) < 1e-6
    summary = json.loads((tmp_path / "new" / "summary.json").read_text())
    assert summary["totals"]["sync_steps"] == steps // 2


def test_resuming_a_finished_run_into_a_new_directory_reports_it(tmp_path):
    import fcntl

    args = job("fused", "lte", 4)
    assert lte_fed(args, tmp_path / "a", tmp_path / "a.log").wait(timeout=300) == 0
    # while a live run still holds a (its lock), resuming it elsewhere is refused: on Flower the
    # two would share its run id, and with it the nodes' state files
    with open(tmp_path / "a" / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        busy = subprocess.run([str(BIN / "lte-fed"), *args, f"run.resume={tmp_path / 'a'}",
                               f"run.out={tmp_path / 'c'}"], capture_output=True, text=True, timeout=300)
    assert busy.returncode == 2 and "is still running" in busy.stderr, busy.stderr[-3000:]
    again = lte_fed([*args, f"run.resume={tmp_path / 'a'}"], tmp_path / "b", tmp_path / "b.log")
    assert again.wait(timeout=300) == 0, (tmp_path / "b.log").read_text()[-3000:]
    assert RunDir(tmp_path / "b").read_metrics() == RunDir(tmp_path / "a").read_metrics()
    assert max_abs_diff(model_of(tmp_path / "a"), model_of(tmp_path / "b")) == 0.0
    # b holds the checkpoint it continued from: b itself can be resumed
    assert (tmp_path / "b" / "checkpoint.safetensors").read_bytes() == (tmp_path / "a" / "checkpoint.safetensors").read_bytes()


@pytest.mark.parametrize("change, key", [("lte.rank=8", "lte.rank"), ("run.seed=1", "run.seed"),
                                         ("method=full", "method")])
def test_resume_refuses_another_job_in_one_line(tmp_path, change, key):
    args = job("fused", "lte", 4)
    assert lte_fed(args, tmp_path / "a", tmp_path / "a.log").wait(timeout=300) == 0
    p = subprocess.run([str(BIN / "lte-fed"), *args, change, f"run.resume={tmp_path / 'a'}", f"run.out={tmp_path / 'b'}"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert f"run.resume: {key}" in p.stderr


def test_a_new_run_into_a_dir_holding_a_run_is_refused_and_the_old_run_kept(tmp_path):
    """Without run.resume, a run dir that holds a run's history is not appended to; resuming it in
    place is what continues it."""
    args = job("fused", "lte", 4)
    assert lte_fed(args, tmp_path / "a", tmp_path / "a.log").wait(timeout=300) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir() if p.is_file()}
    p = subprocess.run([str(BIN / "lte-fed"), *job("fused", "lte", 2), f"run.out={tmp_path / 'a'}"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert f"run.out: {tmp_path / 'a'} already holds a run" in p.stderr and "run.resume=" in p.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir() if p.is_file()} == before
    again = lte_fed([*args, f"run.resume={tmp_path / 'a'}"], tmp_path / "a", tmp_path / "a2.log")
    assert again.wait(timeout=300) == 0, (tmp_path / "a2.log").read_text()[-3000:]
    assert [r["round"] for r in RunDir(tmp_path / "a").read_metrics()] == [1, 2]


def test_a_run_dir_in_use_is_refused_to_a_second_run(tmp_path):
    from lte_fed.rundir import claimed
    from lte_fed.spec import SpecError

    with claimed(tmp_path / "a", None):
        with pytest.raises(SpecError, match="is in use by another run"):
            with claimed(tmp_path / "a", None):
                pass
        (tmp_path / "a" / "metrics.jsonl").write_text('{"round": 1}\n')
    with pytest.raises(SpecError, match="already holds a run"):  # free again, but it holds a run now
        with claimed(tmp_path / "a", None):
            pass
    with claimed(tmp_path / "a", str(tmp_path / "a")):  # resumed in place
        pass


def test_a_run_dir_a_flower_server_holds_is_refused_to_a_second_flower_run_and_to_lte_fed(tmp_path):
    """Two `flwr run`s into one run.out interleaved their rounds in one history; a Flower run
    that outlived its killed `lte-fed` ran alongside the resume started in its dir."""
    from lte_fed.rundir import claimed, in_use, served
    from lte_fed.spec import SpecError

    with served(tmp_path / "a", None):  # a ServerApp running into a
        assert in_use(tmp_path / "a", ".server.lock") and not in_use(tmp_path / "a")
        with pytest.raises(SpecError, match="in use by another Flower run"):
            with served(tmp_path / "a", None):
                pass
        with pytest.raises(SpecError, match="in use by a Flower run that still runs"):
            with claimed(tmp_path / "a", str(tmp_path / "a")):
                pass
    with claimed(tmp_path / "a", None), served(tmp_path / "a", None):  # what `lte-fed` and its ServerApp hold
        assert in_use(tmp_path / "a") and in_use(tmp_path / "a", ".server.lock")
    assert not in_use(tmp_path / "a") and not in_use(tmp_path / "a", ".server.lock")


def test_a_run_out_that_cannot_be_a_folder_is_named(tmp_path):
    from lte_fed.rundir import claimed
    from lte_fed.spec import SpecError

    (tmp_path / "afile").write_text("x")
    for out, why in [(tmp_path / "afile", "is a file, not a folder"), (tmp_path / "afile" / "sub", "Not a directory")]:
        with pytest.raises(SpecError, match=f"^run.out: .*{why}"):
            with claimed(out, None):
                pass
    assert (tmp_path / "afile").read_text() == "x"


def test_a_refused_run_leaves_no_dir_behind(tmp_path):
    from lte_fed.rundir import claimed
    from lte_fed.spec import SpecError

    with pytest.raises(SpecError, match="refused late"):
        with claimed(tmp_path / "new", None) as path:
            (path / ".hydra").mkdir()
            (path / ".hydra" / "config.yaml").write_text("method: lte")
            raise SpecError("run.resume: refused late")
    assert not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()  # a dir the user made is theirs, and one with a result stays
    for name in ("mine", "ran"):
        with pytest.raises(SpecError):
            with claimed(tmp_path / name, None) as path:
                if name == "ran":
                    (path / "metrics.jsonl").write_text('{"round": 1}\n')
                raise SpecError("x")
        assert (tmp_path / name).exists()


def test_a_checkpoint_is_never_unpickled(tmp_path):
    """A checkpoint file that is a pickle (or anything but our safetensors) is refused, unread."""
    import pickle

    (tmp_path / "a").mkdir()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (tmp_path / "a" / "checkpoint.safetensors").write_bytes(pickle.dumps(Evil()))
    p = subprocess.run([str(BIN / "lte-fed"), *job("fused", "lte", 4), f"run.resume={tmp_path / 'a'}",
                        f"run.out={tmp_path / 'b'}"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "not a readable lte-fed checkpoint" in p.stderr, p.stderr
    assert not marker.exists()


def test_the_same_model_is_saved_as_the_same_bytes(tmp_path):
    """sha256 of model.safetensors is a fair check that two runs agree (its metadata's order in
    the header used to change from save to save)."""
    state = {"w": torch.arange(6.0).view(2, 3), "b": torch.ones(2)}
    for i in range(8):
        RunDir(tmp_path / str(i)).save_model(state, metadata={"model": "vit_digits", "method": "lte"})
    assert len({(tmp_path / str(i) / "model.safetensors").read_bytes() for i in range(8)}) == 1


def test_metrics_are_strict_json(tmp_path):
    """A NaN (FedAvg's train loss in a round nobody answered, a diverged head) is written as null."""
    rd = RunDir(tmp_path)
    rd.append_metrics({"round": 1, "step": 1, "samples": 1, "train_loss": float("nan"), "test_loss": 1.0,
                       "test_acc": 1.0, "bytes_up": 0, "bytes_down": 0, "wall_s": 0.0})
    line = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in line and json.loads(line, parse_constant=lambda c: pytest.fail(c))["train_loss"] is None


def _rewrite_checkpoint(run: Path, tensors=lambda t: t, meta=lambda m: m) -> None:
    """Rewrite `run`'s checkpoint through `tensors` and `meta` (functions of the stored ones)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = run / "checkpoint.safetensors"
    with safe_open(str(path), framework="pt") as f:
        stored, header = {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["lte-fed"])
    save_file(tensors(stored), str(path), metadata={"lte-fed": json.dumps(meta(header))})


def _first(t: dict, prefix: str, suffix: str = "") -> str:
    return next(k for k in sorted(t) if k.startswith(prefix) and k.endswith(suffix))


DAMAGES = {
    "a model tensor missing": dict(tensors=lambda t: {k: v for k, v in t.items() if k != _first(t, "model.")}),
    "a model tensor of another shape": dict(tensors=lambda t: t | {_first(t, "model."): torch.zeros(3, 5)}),
    "an optimizer moment of another shape": dict(tensors=lambda t: t | {_first(t, "opt.", "exp_avg"): torch.zeros(7)}),
    "a negative step": dict(meta=lambda m: m | {"step": -4}),
    "a step as text": dict(meta=lambda m: m | {"step": "4"}),
    "no round": dict(meta=lambda m: {k: v for k, v in m.items() if k != "round"}),
    "metadata a list": dict(meta=lambda m: [m]),
    "a step its round cannot have reached": dict(meta=lambda m: m | {"step": 1000}),
    # read silently these would train on: a fresh AdamW, moments rounded to fp16, NaN
    "no optimizer state": dict(tensors=lambda t: {k: v for k, v in t.items() if not k.startswith("opt.")}),
    "one optimizer moment missing": dict(tensors=lambda t: {k: v for k, v in t.items() if k != _first(t, "opt.", "exp_avg_sq")}),
    "tensors in fp16": dict(tensors=lambda t: {k: v.half() if v.is_floating_point() else v for k, v in t.items()}),
    "an optimizer moment in fp16": dict(tensors=lambda t: t | {(k := _first(t, "opt.", "exp_avg")): t[k].half()}),
    "a model tensor of NaN": dict(tensors=lambda t: t | {(k := _first(t, "model.", "lora_A")): torch.full_like(t[k], float("nan"))}),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_readable_but_damaged_checkpoint_is_refused_in_one_error(tmp_path, damage):
    from lte_fed.engine import run_fused
    from lte_fed.spec import SpecError

    from .helpers import quick_spec

    run_fused(quick_spec(), tmp_path / "a")
    _rewrite_checkpoint(tmp_path / "a", **DAMAGES[damage])
    with pytest.raises(SpecError, match=r"^run\.resume: .*checkpoint"):
        run_fused(quick_spec(run={"resume": str(tmp_path / "a")}), tmp_path / "b")


def test_a_metrics_line_torn_by_a_kill_is_dropped_on_resume_and_a_damaged_one_named(tmp_path):
    from lte_fed.engine import FusedRun, run_fused
    from lte_fed.spec import SpecError

    from .helpers import quick_spec

    spec = quick_spec(train={"steps": 9})
    FusedRun(spec, tmp_path / "a").run(stop_after_rounds=2)
    with open(tmp_path / "a" / "metrics.jsonl", "a") as f:
        f.write('{"round": 3, "step": 9, "sam')  # killed mid-append, before round 3's checkpoint
    assert [r["round"] for r in RunDir(tmp_path / "a").read_metrics()] == [1, 2]
    run_fused(quick_spec(train={"steps": 9}, run={"resume": str(tmp_path / "a")}), tmp_path / "a")
    assert [r["round"] for r in RunDir(tmp_path / "a").read_metrics()] == [1, 2, 3]
    for bad in ("null", "[1, 2]", '{"round": 1, "st'):
        (tmp_path / "b.jsonl").write_text(f'{{"round": 1}}\n{bad}\n{{"round": 3}}\n')
        rd = RunDir(tmp_path)
        (tmp_path / "metrics.jsonl").write_bytes((tmp_path / "b.jsonl").read_bytes())
        with pytest.raises(SpecError, match="metrics.jsonl line 2"):
            rd.read_metrics()


HISTORY_DAMAGES = {  # each would have made the resumed run's totals (sync steps, bytes) wrong
    "round 2's row cut short": lambda text: text[:text.rindex('{"round": 2') + 20],
    "the history gone": lambda text: "",
    "round 1 twice": lambda text: text.splitlines(keepends=True)[0] + text,
    "a row without bytes_up": lambda text: text.replace('"bytes_up"', '"bytes_upp"', 1),
    "an accuracy as text": lambda text: text.replace('"test_acc": ', '"test_acc": "high", "was": ', 1),
    "binary junk": lambda text: text + "\udcff\udcfe",
}


@pytest.mark.parametrize("damage", HISTORY_DAMAGES)
def test_a_damaged_history_is_refused_on_resume_and_the_source_left_as_it_was(tmp_path, damage):
    from lte_fed.engine import FusedRun, run_fused
    from lte_fed.spec import SpecError

    from .helpers import quick_spec

    FusedRun(quick_spec(train={"steps": 9}), tmp_path / "a").run(stop_after_rounds=2)
    metrics = tmp_path / "a" / "metrics.jsonl"
    metrics.write_bytes(HISTORY_DAMAGES[damage](metrics.read_text()).encode("utf-8", "surrogateescape"))
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir() if p.is_file()}
    with pytest.raises(SpecError, match=r"metrics\.jsonl"):
        run_fused(quick_spec(train={"steps": 9}, run={"resume": str(tmp_path / "a")}), tmp_path / "b")
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir() if p.is_file()} == before


def test_a_nan_in_the_history_is_carried_as_null(tmp_path):
    from lte_fed.engine import FusedRun, run_fused

    from .helpers import quick_spec

    FusedRun(quick_spec(train={"steps": 9}), tmp_path / "a").run(stop_after_rounds=2)
    metrics = tmp_path / "a" / "metrics.jsonl"
    metrics.write_text(metrics.read_text().replace('"train_loss": ', '"train_loss": NaN, "was": ', 1))
    run_fused(quick_spec(train={"steps": 9}, run={"resume": str(tmp_path / "a")}), tmp_path / "b")
    text = (tmp_path / "b" / "metrics.jsonl").read_text()
    assert "NaN" not in text and json.loads(text.splitlines()[0])["train_loss"] is None


def test_a_flower_resume_that_cannot_fit_is_refused_before_flower_starts(tmp_path):
    from lte_fed.engine import run_fused
    from lte_fed.spec import SpecError
    from strategies.simulation import run_flower

    from .helpers import quick_spec

    run_fused(quick_spec(), tmp_path / "a")
    with pytest.raises(SpecError, match="run.engine='flower' differs from the checkpoint's 'fused'"):
        run_flower(quick_spec(engine="flower", run={"resume": str(tmp_path / "a")}), tmp_path / "b")
    assert not (tmp_path / "b" / "flower.log").exists()  # refused up front, not ~20 s into a Flower run


def test_a_flower_resume_reads_the_checkpoints_node_count(tmp_path):
    """run_flower resumes on the checkpoint's node count when run.nodes is left to the machine
    (a resume with another run.client_cpus was refused as "run.nodes differs")."""
    from lte_fed.engine import run_fused
    from strategies.simulation import _checkpoint_nodes

    from .helpers import quick_spec

    run_fused(quick_spec("lte", "fused", run={"nodes": 2}), tmp_path / "a")
    assert _checkpoint_nodes(str(tmp_path / "a")) == 2
    assert _checkpoint_nodes(str(tmp_path / "nowhere")) is None  # precheck_resume says why
