"""`lte-fed-report <sweep dir> [--out DIR]`: one table and the figures for a sweep.

Every run under the directory, at any depth, is collected: a run is a directory holding a
`summary.json` (what `lte-fed` writes at the end of a job; a job that failed in a multirun
leaves `{"failed": true, "error": ...}` there). A directory with a Hydra job record
(`.hydra/config.yaml`) or a `metrics.jsonl` but no summary is a job still running or killed,
and is listed as `incomplete`.

Written to --out (default: <sweep dir>/report):

    results.md, results.csv   one row per run: the config keys that vary across the runs,
                              final test loss / accuracy, best accuracy, samples, sync steps,
                              bytes up / down, wall time; failed runs say why
    accuracy.png              test accuracy vs sync steps and vs samples seen, one curve per
                              run (paper figure 7); a `method=full` run is the dashed baseline
    loss.png                  language models: validation loss vs sync steps and vs tokens
                              seen (all heads together), likewise
    alignment.png             mean pairwise |cosine similarity| and Grassmann distance of the
                              heads' B_n A_n over training (paper figure 8 / appendix A.5), from
                              metrics rows that carry head_cosine / head_grassmann
                              (train.log_alignment=true)
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lte_fed.spec import NEVER_MERGE, sync_steps

# Config keys that never describe the experiment (where a run was written, how it showed progress).
IGNORED_KEYS = {"run.out", "run.resume", "run.progress"}
# Short names for figure legends.
SHORT = {"lte.heads": "N", "lte.rank": "r", "lte.merge_every": "T", "lte.alpha": "alpha", "train.lr": "lr",
         "train.batch_size": "B", "train.steps": "steps", "method": "", "run.seed": "seed"}
# Methods for which the lte.* keys mean nothing.
NO_HEADS = {"full"}
# NEVER_MERGE: for the methods that never merge, the keys that say what a merge does mean nothing.
MERGE_KEYS = ("lte.variant", "lte.outer")  # lte.outer and its lte.outer_* settings
# Keys of one kind of job only: in a folder of both kinds, mean nothing for the other kind's runs.
TEXT_ONLY_KEYS = ("model.block_size", "data.tokenizer", "data.val_tokens", "run.sample_tokens")
IMAGE_ONLY_KEYS = ("model.img_size", "model.patch_size", "data.augment", "data.synthetic_size")
IMAGE_COLS = ["test_loss", "test_acc", "best_test_acc"]
TEXT_COLS = ["val_loss", "perplexity", "best_val_loss", "tokens"]  # language models
RESULT_COLS = [*IMAGE_COLS, "samples", "sync_steps", "bytes_up", "bytes_down", "wall_s"]


class ReportError(Exception):
    pass


@dataclass
class Run:
    path: Path
    name: str  # relative to the sweep dir
    status: str  # ok | failed | incomplete
    config: dict[str, Any] = field(default_factory=dict)  # flattened: "lte.heads" -> 8
    summary: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    error: str = ""

    @property
    def method(self) -> str:
        return str(self.config.get("method", ""))

    @functools.cached_property  # asked for every cell of the table: the rows are read once
    def is_text(self) -> bool:
        return "val_loss" in self.summary.get("final", {}) or any("val_loss" in r for r in self.rows)

    def result(self, key: str) -> Any:
        if self.status != "ok":
            return None
        if key in ("test_loss", "test_acc", "val_loss", "perplexity"):
            return self.summary.get("final", {}).get(key)
        if key in ("best_test_acc", "best_val_loss"):
            return self.summary.get(key)
        return self.summary.get("totals", {}).get(key)


# ----------------------------------------------------------------------------------- collect
def _natural(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def _hydra_config(path: Path) -> dict[str, Any]:
    """The job's composed config as Hydra recorded it (for jobs that left no config of their own)."""
    f = path / ".hydra" / "config.yaml"
    if not f.exists():
        return {}
    from omegaconf import DictConfig, OmegaConf

    try:
        cfg = OmegaConf.load(f)
    except Exception:  # noqa: BLE001 -- a damaged record: the run is still listed, without its config
        return {}
    if not isinstance(cfg, DictConfig):
        return {}
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # an interpolation that only resolves inside Hydra
        return OmegaConf.to_container(cfg, resolve=False)


def _read_rows(path: Path) -> list[dict[str, Any]]:
    f = path / "metrics.jsonl"
    if not f.exists():
        return []
    try:
        text = f.read_text(errors="replace")
    except OSError:  # unreadable (permissions): the run is listed without its curve
        return []
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line being written as we read, or a damaged one
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def load_run(path: Path, root: Path) -> Run:
    name = str(path.relative_to(root)) if path != root else "."
    rows = _read_rows(path)
    summary_file = path / "summary.json"
    if not summary_file.exists():
        status, why = _unfinished(path, rows)
        return Run(path, name, status, flatten(_hydra_config(path)), rows=rows, error=why)
    try:
        summary = json.loads(summary_file.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        return Run(path, name, "failed", flatten(_hydra_config(path)), rows=rows, error=f"unreadable summary.json: {e}")
    if isinstance(summary, dict) and summary.get("failed"):  # a sweep's failed job (app/cli.py)
        return Run(path, name, "failed", flatten(_hydra_config(path)), summary, rows,
                   error=str(summary.get("error", "unknown error")))
    if not (isinstance(summary, dict) and all(isinstance(summary.get(k), dict) for k in ("config", "final", "totals"))):
        return Run(path, name, "failed", flatten(_hydra_config(path)), rows=rows,
                   error="summary.json is not an lte-fed summary")
    config = dict(summary.get("config", {}))
    resolved = config.pop("resolved", None)
    if isinstance(resolved, dict) and isinstance(config.get("lte"), dict):
        # what the method made of lte.*: one head for lora / lora_merge, the reset variant for lora_merge
        config["lte"] = config["lte"] | {k: resolved[k] for k in ("heads", "variant") if k in resolved}
    return Run(path, name, "ok", flatten(config), summary, rows)


def _unfinished(path: Path, rows: list[dict[str, Any]]) -> tuple[str, str]:
    """(status, why) of a run dir without summary.json: diverged (its last row says so), still
    running (a live run holds its lock), or stopped before its end (killed: it can be resumed)."""
    from lte_fed.rundir import LOCK, SERVER_LOCK, diverged, in_use

    last = rows[-1] if rows else {}
    if ("val_loss" in last or "test_loss" in last) and (why := diverged(last)):
        return "failed", why
    if in_use(path, LOCK) or in_use(path, SERVER_LOCK):
        return "incomplete", "running (a live run holds its lock)"
    return "incomplete", f"stopped before its end (killed or interrupted): resume with run.resume={path}"


def find_runs(root: Path, exclude: Path | None = None, unreadable: list[str] | None = None) -> list[Run]:
    """Every run under `root` (a folder with summary.json, metrics.jsonl or Hydra's record);
    folders that cannot be listed are appended to `unreadable`."""
    dirs, errors = set(), []
    for folder, _, files in os.walk(root, onerror=lambda e: errors.append(f"{e.filename} ({e.strerror})")):
        here = Path(folder)
        if "summary.json" in files or "metrics.jsonl" in files:
            dirs.add(here)
        if here.name == ".hydra" and "config.yaml" in files:
            dirs.add(here.parent)
    if exclude is not None:
        dirs = {d for d in dirs if exclude not in (d, *d.parents)}
    if unreadable is not None:
        unreadable += errors
    return [load_run(d, root) for d in sorted(dirs, key=_natural)]


def varying_keys(runs: list[Run]) -> list[str]:
    """Config keys whose value differs between runs (method first, then in config order)."""
    keys: list[str] = []
    for r in runs:
        keys += [k for k in r.config if k not in keys and k not in IGNORED_KEYS]
    vary = []
    for k in keys:
        values = {json.dumps(r.config.get(k), sort_keys=True, default=str) for r in runs if r.config}
        if len(values) > 1:
            vary.append(k)
    return sorted(vary, key=lambda k: (k != "method", keys.index(k)))


def means_nothing(run: Run, key: str) -> bool:
    """Whether config `key` has no effect on `run` (an lte.* key of full training, a merge key
    of a method that never merges, a language model's key of an image run and the reverse)."""
    return (run.method in NO_HEADS and key.startswith("lte.")
            or run.method in NEVER_MERGE and key.startswith(MERGE_KEYS)
            or key in (IMAGE_ONLY_KEYS if run.is_text else TEXT_ONLY_KEYS))


def cell(run: Run, key: str) -> Any:
    return "-" if means_nothing(run, key) else run.config.get(key, "")


# ------------------------------------------------------------------------------------ tables
def _fmt(key: str, v: Any) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return str(v)  # a string or list where a number belongs (a hand-edited summary): shown as it is
    if key in ("bytes_up", "bytes_down"):
        return _bytes(v)
    if key in ("test_acc", "best_test_acc"):
        return f"{v:.2f}"
    if key in ("test_loss", "val_loss", "best_val_loss"):
        return f"{v:.4f}"
    if key == "perplexity":
        return f"{v:.3f}"
    if key == "wall_s":
        return f"{v:.1f}"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def result_cols(runs: list[Run]) -> list[str]:
    """The result columns: the image ones, the language ones, or both for a mixed folder."""
    text = any(r.result("val_loss") is not None for r in runs)
    image = any(r.result("test_acc") is not None for r in runs) or not text
    return [*(IMAGE_COLS if image else []), *(TEXT_COLS if text else []), *RESULT_COLS[len(IMAGE_COLS):]]


def table_rows(runs: list[Run], keys: list[str]) -> tuple[list[str], list[list[Any]]]:
    cols = result_cols(runs)
    header = ["run", "status", *keys, *cols, "error"]
    rows = [[r.name, r.status, *(cell(r, k) for k in keys), *(r.result(c) for c in cols), r.error] for r in runs]
    return header, rows


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for row in rows:
            w.writerow(["" if v is None else v for v in row])


def markdown(header: list[str], rows: list[list[Any]]) -> str:
    def esc(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        out.append("| " + " | ".join(esc(_fmt(h, v)) for h, v in zip(header, row)) + " |")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------- figures
def label(run: Run, keys: list[str]) -> str:
    if run.method in NO_HEADS:
        return f"{run.method} (baseline)"
    parts = []
    for k in (k for k in keys if not means_nothing(run, k)):
        v = run.config.get(k)
        short = SHORT.get(k, k)
        parts.append(f"{v}" if short == "" else f"{short}={v:g}" if isinstance(v, float) else f"{short}={v}")
    return " ".join(parts) or run.name




def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _styles(runs: list[Run], plt) -> dict[str, dict[str, Any]]:
    others = [r for r in runs if r.method not in NO_HEADS]
    cmap = plt.get_cmap("tab10" if len(others) <= 10 else "tab20")
    styles = {}
    for i, r in enumerate(others):
        styles[r.name] = {"color": cmap(i % cmap.N), "lw": 1.4}
    for r in runs:
        if r.method in NO_HEADS:
            styles[r.name] = {"color": "black", "ls": "--", "lw": 1.8}
    return styles


def _plottable(row: dict[str, Any], need: tuple[str, ...]) -> bool:
    """Whether a metrics row has every `need` as a number (a diverged value is stored as null)."""
    return all(isinstance(row.get(k), (int, float)) and not isinstance(row.get(k), bool) for k in need)


def _plot_curves(runs: list[Run], path: Path, *, metric: str, progress: str,
                 ylabel: str, progress_label: str, title: str) -> bool:
    """`metric` against sync steps (log) and against `progress` (samples or tokens), one line a run,
    labelled by the keys that vary between the runs it plots."""
    need = ("round", "step", progress, metric)
    runs = [r for r in runs if any(_plottable(x, need) for x in r.rows)]
    if not runs:
        return False
    keys = varying_keys(runs)
    plt = _plt()
    styles = _styles(runs, plt)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    for r in runs:
        rows = [x for x in r.rows if _plottable(x, need)]
        kw = styles[r.name] | {"label": label(r, keys)}
        if r.method not in NEVER_MERGE:  # never synchronized: no place on this axis
            axes[0].plot([sync_steps(r.method, x) for x in rows], [x[metric] for x in rows], **kw)
        axes[1].plot([x[progress] for x in rows], [x[metric] for x in rows], **kw)
    axes[0].set_xlabel("synchronization steps (merges; full: optimizer steps)")
    axes[0].set_xscale("log")
    axes[1].set_xlabel(progress_label)
    axes[0].set_ylabel(ylabel)
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def plot_accuracy(runs: list[Run], path: Path) -> bool:
    return _plot_curves(runs, path, metric="test_acc", progress="samples", ylabel="test accuracy (%)",
                        progress_label="training samples seen (all heads together)",
                        title="Test accuracy vs synchronization steps and samples seen")


def plot_loss(runs: list[Run], path: Path) -> bool:
    """Language models: validation loss vs sync steps and vs tokens seen."""
    return _plot_curves(runs, path, metric="val_loss", progress="tokens",
                        ylabel="validation loss (nats per token)",
                        progress_label="training tokens seen (all heads together)",
                        title="Validation loss vs synchronization steps and tokens seen")


def plot_alignment(runs: list[Run], path: Path) -> bool:
    need = ("samples", "head_cosine", "head_grassmann")
    runs = [r for r in runs if any(_plottable(x, need) for x in r.rows)]
    if not runs:
        return False
    keys = varying_keys(runs)
    plt = _plt()
    styles = _styles(runs, plt)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for r in runs:
        rows = [x for x in r.rows if _plottable(x, need)]
        kw = styles[r.name] | {"label": label(r, keys)}
        axes[0].plot([x["samples"] for x in rows], [x["head_cosine"] for x in rows], **kw)
        axes[1].plot([x["samples"] for x in rows], [x["head_grassmann"] for x in rows], **kw)
    axes[0].set_ylabel("mean pairwise |cosine similarity|")
    axes[1].set_ylabel("mean pairwise Grassmann distance")
    for ax in axes:
        ax.set_xlabel("training samples seen")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.suptitle("Alignment of the LoRA heads' B_n A_n before each merge (averaged over layers)")
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


# -------------------------------------------------------------------------------------- main
def make_report(sweep: str | Path, out: str | Path | None = None) -> dict[str, Path]:
    root = Path(sweep)
    if not root.is_dir():
        raise ReportError(f"{root}: {'not a directory' if root.exists() else 'no such directory'}")
    out = Path(out) if out else root / "report"
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {out}: exists and is not a directory")
    unreadable: list[str] = []
    runs = find_runs(root, exclude=out.resolve() if out.resolve() != root.resolve() else None, unreadable=unreadable)
    if unreadable:
        print(f"lte-fed-report: warning: could not look inside {len(unreadable)} folder(s): {'; '.join(unreadable[:3])}",
              file=sys.stderr)
    if not runs:
        raise ReportError(f"{root}: no runs found (a run is a directory with summary.json)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ReportError(f"--out {out}: cannot create it ({e.strerror})") from None
    keys = varying_keys(runs)
    header, rows = table_rows(runs, keys)
    written = {"csv": out / "results.csv", "md": out / "results.md"}
    write_csv(written["csv"], header, rows)
    written["md"].write_text(markdown(header, rows))
    if plot_accuracy(runs, out / "accuracy.png"):
        written["accuracy"] = out / "accuracy.png"
    if plot_loss(runs, out / "loss.png"):
        written["loss"] = out / "loss.png"
    if plot_alignment(runs, out / "alignment.png"):
        written["alignment"] = out / "alignment.png"
    return written


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="lte-fed-report", description=__doc__.split("\n\n")[0])
    p.add_argument("sweep", help="a sweep directory (hydra.sweep.dir), or any folder holding run directories")
    p.add_argument("--out", help="where the table and figures go (default: <sweep>/report)")
    args = p.parse_args(argv)
    try:
        written = make_report(args.sweep, args.out)
    except ReportError as e:
        print(f"lte-fed-report: error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # writing the table or a figure: a full disk, a folder made read-only meanwhile
        print(f"lte-fed-report: error: {e.filename}: {e.strerror}", file=sys.stderr)
        sys.exit(2)
    print((Path(written["md"])).read_text())
    print(f"table:   {written['md']}\n         {written['csv']}")
    for k in ("accuracy", "loss", "alignment"):
        if k in written:
            print(f"figure:  {written[k]}")
    if "alignment" not in written:
        print("(no head_cosine/head_grassmann in the metrics: run with train.log_alignment=true for alignment.png)")


if __name__ == "__main__":
    main()
