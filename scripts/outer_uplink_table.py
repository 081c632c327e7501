"""The digits table of issue 14: {avg, nesterov} x {fp32, fp16, int8 uplink} x {none, nf4 base}.

Reads run directories named t_<avg|nes>_<up>_<base>_s<seed> (nes: lte.outer=nesterov with the
lr / momentum in the results README) and full_s<seed> under RUNS, writes
results.md / results.csv / accuracy_bytes.png into OUT, and copies each run's metrics.jsonl and
summary.json into OUT/runs/.

    python scripts/outer_uplink_table.py RUNS OUT
"""

from __future__ import annotations

import csv
import json
import shutil
import statistics
import sys
from pathlib import Path


def rows_of(d: Path) -> list[dict]:
    return [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line.strip()]


def first_round(rows: list[dict], threshold: float) -> int | None:
    return next((r["round"] for r in rows if r["test_acc"] >= threshold), None)


def main(runs: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "runs").mkdir(exist_ok=True)
    got: dict[tuple, dict[int, list[dict]]] = {}
    full: dict[int, list[dict]] = {}
    for d in sorted(runs.iterdir()):
        if not (d / "summary.json").exists():
            continue
        parts = d.name.split("_")
        if parts[0] == "t" and len(parts) == 5:
            got.setdefault(tuple(parts[1:4]), {})[int(parts[4][1:])] = rows_of(d)
        elif parts[0] == "full" and len(parts) == 2:
            full[int(parts[1][1:])] = rows_of(d)
        else:
            continue
        dst = out / "runs" / d.name
        dst.mkdir(exist_ok=True)
        for f in ("metrics.jsonl", "summary.json"):
            shutil.copyfile(d / f, dst / f)
    full_final = statistics.mean(r[-1]["test_acc"] for r in full.values()) if full else float("nan")
    avg_ref = got.get(("avg", "fp32", "none"), {})
    avg_final = statistics.mean(r[-1]["test_acc"] for r in avg_ref.values()) if avg_ref else float("nan")
    heads = 2
    table = []
    for (outer, up, base), seeds in sorted(got.items(), key=lambda kv: (kv[0][2], kv[0][0], ["fp32", "fp16", "int8"].index(kv[0][1]))):
        finals = [seeds[s][-1]["test_acc"] for s in sorted(seeds)]
        reach = [first_round(seeds[s], avg_final) for s in sorted(seeds)]
        reach95 = [first_round(seeds[s], 95.0) for s in sorted(seeds)]
        any_rows = next(iter(seeds.values()))
        table.append({
            "outer": outer, "comm.up": up, "quant.base": base, "seeds": len(seeds),
            "final_acc_mean": round(statistics.mean(finals), 2), "final_acc_seeds": " / ".join(f"{a:.2f}" for a in finals),
            "best_acc_mean": round(statistics.mean(max(r["test_acc"] for r in seeds[s]) for s in seeds), 2),
            "merges_to_avg_final": " / ".join(str(x) if x else "-" for x in reach),
            "merges_to_95": " / ".join(str(x) if x else "-" for x in reach95),
            "merges": len(any_rows), "samples": any_rows[-1]["samples"],
            "bytes_up_per_round_per_client": any_rows[-1]["bytes_up"] // heads,
            "bytes_down_per_round_per_client": any_rows[-1]["bytes_down"] // heads,
        })
    with (out / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)
    lines = [f"full training ({len(full)} seed(s)) ends at {full_final:.2f}; `avg` + fp32 + none at {avg_final:.2f} "
             "(the threshold of `merges to avg's final`).", "",
             "| outer | comm.up | quant.base | final acc (mean) | per seed | best (mean) | merges to avg's final | "
             "merges to 95% | merges | samples | up / round / client | down / round / client |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['outer']} | {r['comm.up']} | {r['quant.base']} | {r['final_acc_mean']:.2f} | {r['final_acc_seeds']} | "
                     f"{r['best_acc_mean']:.2f} | {r['merges_to_avg_final']} | {r['merges_to_95']} | {r['merges']} | "
                     f"{r['samples']:,} | {r['bytes_up_per_round_per_client'] / 1e3:.1f} kB | "
                     f"{r['bytes_down_per_round_per_client'] / 1e3:.1f} kB |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(got, full, table, out / "accuracy_bytes.png")


def plot(got, full, table, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {"avg": "-", "nes": "--"}
    colors = {"none": "tab:blue", "nf4": "tab:red"}
    for (outer, up, base), seeds in sorted(got.items()):
        if up != "fp32":
            continue
        n = min(len(r) for r in seeds.values())
        mean = [statistics.mean(seeds[s][i]["test_acc"] for s in seeds) for i in range(n)]
        a1.plot(range(1, n + 1), mean, styles[outer], color=colors[base], label=f"{outer}, base {base}")
    if full:
        n = min(len(r) for r in full.values())
        mean = [statistics.mean(full[s][i]["test_acc"] for s in full) for i in range(n)]
        a1.plot(range(1, n + 1), mean, ":", color="k", label="full (per 10 steps)")
    a1.set_xlabel("merges (T = 10 steps each)")
    a1.set_ylabel("test accuracy (%), mean of 2 seeds")
    a1.set_ylim(60, 100)
    a1.grid(alpha=0.3)
    a1.legend()
    marks = {"fp32": "o", "fp16": "s", "int8": "^"}
    for r in table:
        a2.scatter(r["bytes_up_per_round_per_client"] / 1e3, r["final_acc_mean"], marker=marks[r["comm.up"]],
                   color=colors[r["quant.base"]], facecolors="none" if r["outer"] == "avg" else colors[r["quant.base"]],
                   s=60, label=f"{r['outer']}/{r['comm.up']}/{r['quant.base']}")
    a2.set_xscale("log")
    a2.set_xlabel("bytes up per round per client (kB, tensor payload)")
    a2.set_ylabel("final test accuracy (%), mean of 2 seeds")
    a2.grid(alpha=0.3)
    a2.legend(fontsize=7, ncol=2)
    fig.suptitle("digits, default job, fused engine: outer optimizer x uplink x base")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
