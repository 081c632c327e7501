"""Sweeps and reports as a user runs them: a real `lte-fed -m` multirun through the CLI, a job
that fails without stopping the sweep, `lte-fed-report` over the lot; the ablation presets
compose into valid jobs; the Flower server logs the same head alignment as the fused engine."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from app.report import main as report_main

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SWEEP = ["lte.heads=2,4", "lte.rank=2,4", "data.name=synthetic", "data.synthetic_size=256", "train.steps=4",
         "lte.merge_every=2", "train.batch_size=16", "train.warmup=1", "run.engine=fused", "run.progress=false",
         "run.device=cpu", "train.log_alignment=true"]


def lte_fed_multirun(*args: str, sweep_dir: Path) -> subprocess.Popen:
    env = os.environ | {"PYTHONPATH": str(ROOT), "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "app.cli", "-m", *args, f"hydra.sweep.dir={sweep_dir}"],
                            cwd=sweep_dir.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(p: subprocess.Popen) -> tuple[int, str, str]:
    out, err = p.communicate(timeout=300)
    return p.returncode, out, err


def test_a_multirun_with_a_failed_job_reports_every_run(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    good = lte_fed_multirun(*SWEEP, sweep_dir=sweep)
    # A second, one-job sweep into a sub-folder whose job is invalid: it fails, the sweep ends
    # normally, and the report (which looks at any depth) lists it with its reason.
    bad = lte_fed_multirun(*[a for a in SWEEP if not a.startswith("lte.")], "lte.heads=2", "lte.rank=0",
                           sweep_dir=sweep / "bad")
    (rc_good, out_good, err_good), (rc_bad, _, err_bad) = finish(good), finish(bad)
    assert rc_good == 0, err_good[-3000:]
    # A failed job does not stop the sweep; the sweep's exit status says one failed, and where.
    assert rc_bad == 2 and f"1 job(s) of the sweep failed" in err_bad and str(sweep / "bad" / "0") in err_bad, err_bad[-3000:]
    assert "lte-fed: error: lte.rank" in err_bad and "Traceback" not in err_bad
    assert sorted(p.name for p in sweep.iterdir() if p.name.isdigit()) == ["0", "1", "2", "3"]
    assert all((sweep / j / "summary.json").exists() for j in "0123")  # each job its own run dir
    # A job killed mid-run (metrics but no summary) shows up as incomplete; the rest still report.
    (sweep / "killed").mkdir()
    (sweep / "killed" / "metrics.jsonl").write_text(json.dumps({"round": 1, "step": 2, "test_acc": 10.0}) + "\n"
                                                    + '{"round": 2, "step": 4, "samp')  # cut mid-write

    out = tmp_path / "report"
    report_main([str(sweep), "--out", str(out)])
    printed = capsys.readouterr().out
    assert str(out / "results.md") in printed and str(out / "accuracy.png") in printed

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert {"lte.heads", "lte.rank", "test_acc", "test_loss", "samples", "sync_steps", "bytes_up", "bytes_down",
            "wall_s", "status", "error"} <= set(rows[0])
    assert "train.steps" not in rows[0] and "data.name" not in rows[0]  # only the keys that vary
    ok = [r for r in rows if r["status"] == "ok"]
    assert sorted((int(r["lte.heads"]), int(r["lte.rank"])) for r in ok) == [(2, 2), (2, 4), (4, 2), (4, 4)]
    for r in ok:
        assert 0.0 <= float(r["test_acc"]) <= 100.0 and float(r["test_loss"]) > 0
        assert int(r["samples"]) == 4 * 16 and int(r["sync_steps"]) == 2 and int(r["bytes_up"]) > 0
        assert not r["error"]
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["run"] == "bad/0"
    assert failed[0]["lte.rank"] == "0" and "lte.rank" in failed[0]["error"] and "positive" in failed[0]["error"]
    assert [r["run"] for r in rows if r["status"] == "incomplete"] == ["killed"]

    md = (out / "results.md").read_text()
    assert md.count("| ok |") == 4 and "| failed |" in md and "must be a positive integer" in md
    for fig in ("accuracy.png", "alignment.png"):
        assert (out / fig).stat().st_size > 1000, fig
    rows0 = [json.loads(line) for line in (sweep / "0" / "metrics.jsonl").read_text().splitlines()]
    assert all("head_cosine" in r and "head_grassmann" in r for r in rows0)

    # The same sweep again into the same dir (to finish one that crashed, say), with a seed the
    # finished runs did not have: every job is refused, and no finished run's record changes
    # (the refusal used to overwrite each summary.json, and Hydra each .hydra/overrides.yaml).
    before = {p: p.read_bytes() for j in "0123" for p in (sweep / j).rglob("*") if p.is_file() and p.name != "cli.log"}
    rc_again, _, err_again = finish(lte_fed_multirun(*SWEEP, "run.seed=7", sweep_dir=sweep))
    assert rc_again == 2 and "4 job(s) of the sweep failed" in err_again and "already holds a run" in err_again
    assert {p: p.read_bytes() for p in before} == before
    assert "lte.heads=2" in (sweep / "0" / ".hydra" / "overrides.yaml").read_text()  # the job's own, not seed 7


def test_report_of_a_folder_without_runs_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        report_main([str(tmp_path)])
    assert e.value.code == 2 and "lte-fed-report: error:" in capsys.readouterr().err


def test_the_report_lists_damaged_and_diverged_runs_instead_of_failing(tmp_path, capsys):
    """Whatever a run dir holds (a null or foreign metrics line, a summary that is a list or has
    text where numbers go, an unparsable Hydra record, a diverged curve), the report still
    covers every run, and says which ones it could not read."""
    def run(name: str, summary, rows: str = "", hydra: str | None = None):
        d = tmp_path / "sweep" / name
        d.mkdir(parents=True)
        if summary is not None:
            (d / "summary.json").write_text(json.dumps(summary))
        (d / "metrics.jsonl").write_text(rows)
        if hydra is not None:
            (d / ".hydra").mkdir()
            (d / ".hydra" / "config.yaml").write_text(hydra)

    good = {"config": {"method": "lte", "lte": {"rank": 4}}, "final": {"test_acc": 50.0, "test_loss": 1.0},
            "totals": {"samples": 64, "sync_steps": 2, "bytes_up": 10, "bytes_down": 20, "wall_s": 1.0}}
    row = {"round": 1, "step": 2, "samples": 32, "test_acc": 40.0, "test_loss": 1.5}
    run("good", good, "null\n[1]\n" + json.dumps(row) + "\n" + json.dumps(row | {"round": 2, "test_loss": None}) + "\n")
    run("texty", good | {"config": {"method": "lte", "lte": {"rank": 8}}, "final": {"test_acc": "high"}})
    run("a-list", [])
    run("broken-hydra", None, hydra="method: [unclosed\n  : :\n")
    run("empty-summary", {})
    # no summary: a run that diverged (its last row's loss is null), one killed (nobody holds its lock)
    run("diverged", None, json.dumps(row) + "\n" + json.dumps(row | {"round": 2, "test_loss": None}) + "\n")
    run("killed", None, json.dumps(row) + "\n")
    out = tmp_path / "report"
    report_main([str(tmp_path / "sweep"), "--out", str(out)])
    with open(out / "results.csv") as f:
        status = {r["run"]: (r["status"], r["error"]) for r in csv.DictReader(f)}
    assert status["good"][0] == "ok" and status["texty"][0] == "ok"
    assert status["a-list"] == ("failed", "summary.json is not an lte-fed summary")
    assert status["broken-hydra"][0] == "incomplete"
    assert status["empty-summary"] == ("failed", "summary.json is not an lte-fed summary")
    assert status["diverged"][0] == "failed" and "training diverged: after round 2" in status["diverged"][1]
    assert status["killed"][0] == "incomplete" and "resume with run.resume=" in status["killed"][1]
    assert (out / "accuracy.png").exists()
    (tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit) as e:
        report_main([str(tmp_path / "sweep"), "--out", str(tmp_path / "a-file")])
    assert e.value.code == 2 and "is not a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # a folder that cannot be made: one line, not a traceback
        report_main([str(tmp_path / "sweep"), "--out", str(tmp_path / "a-file" / "sub")])
    assert e.value.code == 2 and "cannot create it" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        report_main([str(tmp_path / "a-file")])
    assert e.value.code == 2 and "a-file: not a directory" in capsys.readouterr().err


def test_the_report_blanks_keys_that_do_nothing_for_a_method(tmp_path):
    """A never-merged LoRA head has no merge variant or outer optimizer, full training no heads:
    the table shows "-" there, and the legend does not name them."""
    from app.report import find_runs, label, varying_keys

    totals = {"samples": 64, "sync_steps": 2, "bytes_up": 10, "bytes_down": 20, "wall_s": 1.0}
    for name, method, variant in [("a", "lte", "reset"), ("b", "lte", "exact"), ("c", "lora", "reset"),
                                  ("d", "full", "exact")]:
        d = tmp_path / "sweep" / name
        d.mkdir(parents=True)
        config = {"method": method, "lte": {"variant": variant, "outer": "nesterov", "rank": 4, "heads": 4},
                  "resolved": {"heads": 1 if method in ("lora", "full") else 4}}
        (d / "summary.json").write_text(json.dumps({"config": config, "final": {"test_acc": 50.0}, "totals": totals}))
        (d / "metrics.jsonl").write_text(json.dumps({"round": 1, "step": 2, "samples": 32, "test_acc": 40.0}) + "\n")
    report_main([str(tmp_path / "sweep"), "--out", str(tmp_path / "report")])
    with open(tmp_path / "report" / "results.csv") as f:
        variant = {r["run"]: r["lte.variant"] for r in csv.DictReader(f)}
    assert variant == {"a": "reset", "b": "exact", "c": "-", "d": "-"}
    with open(tmp_path / "report" / "results.csv") as f:  # what the method trained: one LoRA head
        heads = {r["run"]: r.get("lte.heads") for r in csv.DictReader(f)}
    assert heads["c"] == "1" and heads["a"] == "4"
    runs = {r.name: r for r in find_runs(tmp_path / "sweep")}
    keys = varying_keys(list(runs.values()))
    assert "reset" in label(runs["a"], keys) and "exact" in label(runs["b"], keys)
    assert "reset" not in label(runs["c"], keys) and label(runs["c"], keys).startswith("lora")


def test_a_report_over_images_and_text_blanks_each_kinds_own_keys(tmp_path):
    """In a folder of image and language runs, a language model's keys mean nothing for an image
    run (and the reverse): "-" in the table; each figure's legend names what varies between
    the runs it plots, not what varies in the folder."""
    from app.report import find_runs, make_report

    for name, final, kind in [("img_a", {"test_acc": 50.0}, {"model": {"img_size": 8}, "lte": {"rank": 4}}),
                              ("img_b", {"test_acc": 60.0}, {"model": {"img_size": 8}, "lte": {"rank": 8}}),
                              ("txt", {"val_loss": 2.0, "perplexity": 7.4}, {"model": {"block_size": 64}})]:
        d = tmp_path / "sweep" / name
        d.mkdir(parents=True)
        config = {"method": "lte", "lte": {"rank": 4}, "model": {"img_size": None, "block_size": None}} | kind
        metric = "test_acc" if "test_acc" in final else "val_loss"
        (d / "summary.json").write_text(json.dumps({"config": config, "final": final, "totals": {"samples": 64}}))
        (d / "metrics.jsonl").write_text(json.dumps({"round": 1, "step": 2, "samples": 32, "tokens": 64,
                                                     metric: final[metric]}) + "\n")
    written = make_report(tmp_path / "sweep", tmp_path / "report")
    with open(written["csv"]) as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    assert [rows[n]["model.block_size"] for n in ("img_a", "img_b", "txt")] == ["-", "-", "64"]
    assert [rows[n]["model.img_size"] for n in ("img_a", "img_b", "txt")] == ["8", "8", "-"]
    from app.report import label, varying_keys

    images = [r for r in find_runs(tmp_path / "sweep") if not r.is_text]
    assert varying_keys(images) == ["lte.rank"] and label(images[0], varying_keys(images)) == "r=4"


@pytest.mark.parametrize("preset, group, extra", [("ablation_cpu", "ablation/cpu", []),
                                                  ("ablation_gpu", "ablation/gpu", ["data.root=/data/imagenet100"])])
def test_every_cell_of_the_ablation_presets_is_a_valid_job(preset, group, extra):
    from hydra import compose, initialize_config_dir

    from lte_fed.spec import register_with_hydra

    register_with_hydra()
    from omegaconf import OmegaConf

    from lte_fed.spec import Spec, validate

    preset_file = yaml.safe_load((CONF / "experiment" / f"{preset}.yaml").read_text())
    swept = preset_file["hydra"]["sweeper"]["params"][group].split(",")
    assert sorted(swept) == sorted(p.stem for p in (CONF / group).glob("*.yaml")), "every cell is swept"
    seen = set()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        for name in swept:
            cfg = compose("config", overrides=[f"+experiment={preset}", f"{group}={name}", *extra])
            spec = validate(Spec.from_dict(OmegaConf.to_container(cfg, resolve=True)))
            assert spec.run.engine == "fused" and spec.train.log_alignment
            if spec.method == "full":
                continue
            lte = spec.lte
            assert name == f"h{lte.heads}_r{lte.rank}_t{lte.merge_every}"
            assert lte.alpha / lte.rank == (2 if preset == "ablation_cpu" else 64)  # s fixed across ranks
            seen.add((lte.heads, lte.rank, lte.merge_every))
            if preset == "ablation_gpu":
                assert (spec.model.name, spec.train.batch_size, spec.train.lr) == ("vit_small", 4096, 3e-5)
            else:
                assert (spec.model.name, spec.data.name) == ("vit_digits", "digits")
                assert spec.train.batch_size == 32 * lte.heads  # the same batch per head in every cell
    heads, ranks, merges = ((2, 4, 8), (1, 2, 4, 8, 16), (2, 5, 10, 25, 50)) if preset == "ablation_cpu" else \
        ((2, 8, 32), (8, 16, 32, 64, 128), (5, 10, 20, 50, 100))
    top_h, mid_r = heads[-1], (8 if preset == "ablation_cpu" else 64)
    assert {(h, r, 10) for h in heads for r in (ranks[0], mid_r)} <= seen  # heads x rank block
    assert {(top_h, r, 10) for r in ranks} <= seen  # rank block
    assert {(top_h, mid_r, t) for t in merges} <= seen  # merge-interval block


def test_flower_server_logs_the_head_alignment_the_fused_engine_logs(tmp_path):
    """LTEStrategy computes head_cosine / head_grassmann from the heads it received, as the fused
    engine does from its stacked heads, and writes them into that round's metrics row. (No Ray:
    the strategy is driven directly; test_flower.py runs the real simulation.)"""
    from lte_fed.engine import FusedRun
    from lte_fed.rundir import RunDir
    from strategies.lte_strategy import LTEStrategy

    from .helpers import quick_spec

    spec = quick_spec("lte", "fused", lte={"heads": 3, "merge_every": 3}, train={"batch_size": 12, "log_alignment": True})
    fused = FusedRun(spec, tmp_path / "fused")
    for _ in range(3):
        fused.train_step()
    expected = fused.alignment()
    received = {h: fused.model.head_state(h) for h in range(3)}  # what the three clients would send

    strategy = LTEStrategy(spec, fused.job, tmp_path / "flower")
    got = strategy._alignment(received)
    assert got == pytest.approx(expected, rel=1e-5)
    assert 0.0 < got["head_cosine"] < 1.0 and got["head_grassmann"] > 0.0
    strategy.alignment, strategy.round_loss, strategy.bytes_up, strategy.bytes_down = got, 1.0, 1, 1
    strategy.eval_model = fused.job.plain
    strategy.log_round(1, {"merged_heads": 3})
    strategy.log_round(2, {"merged_heads": 3})  # a round whose heads were not measured logs no stale values
    rows = RunDir(tmp_path / "flower").read_metrics()
    assert rows[0]["head_cosine"] == got["head_cosine"] and rows[0]["head_grassmann"] == got["head_grassmann"]
    assert "head_cosine" not in rows[1]


def test_a_job_out_of_memory_and_a_run_out_every_job_would_share_fail_in_one_line(tmp_path):
    """A job whose allocation fails (a rank of 10^8) is a failed row that says so, not a
    traceback that ends the sweep's reporting; a plain run.out would be every job's dir (the
    second job was refused there and the report found nothing), so a sweep refuses it."""
    import resource

    def limited():
        resource.setrlimit(resource.RLIMIT_AS, (6 * 2**30, 6 * 2**30))

    env = os.environ | {"PYTHONPATH": str(ROOT), "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "app.cli", "-m", "run.engine=fused", "model.name=mlp", "train.steps=2",
            "run.progress=false"]
    oom = subprocess.run([*base, "lte.rank=4,100000000", f"hydra.sweep.dir={tmp_path / 'oom'}"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300, preexec_fn=limited)
    assert oom.returncode == 2 and "Traceback" not in oom.stderr, oom.stderr[-3000:]
    assert "lte-fed: error: out of memory:" in oom.stderr and "1 job(s) of the sweep failed" in oom.stderr
    assert json.loads((tmp_path / "oom" / "1" / "summary.json").read_text())["failed"]
    assert "test_acc" in json.loads((tmp_path / "oom" / "0" / "summary.json").read_text())["final"]
    shared = subprocess.run([*base, "lte.heads=1,2", f"run.out={tmp_path / 'one'}",
                             f"hydra.sweep.dir={tmp_path / 'shared'}"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert shared.returncode == 2 and "would be every job's dir" in shared.stderr, shared.stderr[-3000:]
    assert not (tmp_path / "one").exists()
