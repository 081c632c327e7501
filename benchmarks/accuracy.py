"""Section 5: accuracy per sample on digits, fused engine, the defaults read from conf/ (and
lte_fed.spec.DEFAULT_LR) at run time: samples LTE needs to reach the final test accuracy of
full training, over several seeds."""

from __future__ import annotations

import tempfile

from .common import default_spec_dict, stats


def samples_to_reach(rows: list[dict], target: float) -> int | None:
    return next((r["samples"] for r in rows if r["test_acc"] >= target), None)


def main(a) -> dict:
    from lte_fed.engine import run_fused
    from lte_fed.rundir import RunDir
    from lte_fed.spec import Spec

    seeds = (0,) if a.quick else (0, 1)
    extra = ["train.steps=40"] if a.quick else []
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            row = {"seed": seed}
            for method in ("full", "lte"):
                out = f"{tmp}/{method}-{seed}"
                spec = Spec.from_dict(default_spec_dict(
                    [f"method={method}", "run.engine=fused", "run.progress=false", f"run.seed={seed}", f"run.out={out}",
                     *extra]))
                summary = run_fused(spec, out)
                rows = RunDir(out).read_metrics()
                row[method] = {"final_acc": summary["final"]["test_acc"], "best_acc": summary["best_test_acc"],
                               "samples": summary["totals"]["samples"], "wall_s": summary["totals"]["wall_s"],
                               "curve": [(r["samples"], r["test_acc"]) for r in rows],
                               "lr": spec.lr, "alpha": spec.lte.alpha, "rank": spec.lte.rank, "heads": spec.heads,
                               "T": spec.merge_every, "quant": spec.quant.base, "steps": spec.train.steps,
                               "batch": spec.train.batch_size, "model": spec.model.name}
            target = row["full"]["final_acc"]
            row["target_acc"] = target
            lte_rows = [{"samples": s, "test_acc": acc} for s, acc in row["lte"]["curve"]]
            full_rows = [{"samples": s, "test_acc": acc} for s, acc in row["full"]["curve"]]
            row["lte_samples_to_target"] = samples_to_reach(lte_rows, target)
            row["full_samples_to_target"] = samples_to_reach(full_rows, target)
            if row["lte_samples_to_target"]:
                row["samples_ratio"] = row["lte_samples_to_target"] / row["full_samples_to_target"]
            runs.append(row)
    ratios = [r["samples_ratio"] for r in runs if r.get("samples_ratio")]
    return {"runs": runs, "samples_ratio": stats(ratios), "reached": f"{len(ratios)}/{len(runs)}",
            "final_acc": {m: stats([r[m]["final_acc"] for r in runs]) for m in ("full", "lte")}}
