"""`lte-fed`: the Hydra app. `lte-fed key=value ...` runs one job; `lte-fed -m a=1,2 b=3,4` sweeps.

A user error (bad config, missing data, a model that cannot be parameterized) ends in one line
`lte-fed: error: ...` and exit code 2, never a traceback from deep inside. Ctrl-C or SIGTERM
stops the job cleanly (exit 130 / 143) and says how to resume it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from lte_fed.rundir import RunDir, RunDirTaken, claimed
from lte_fed.spec import ERROR_PREFIX, DataSpec, Spec, SpecError, config_keys, did_you_mean, register_with_hydra, user_errors

register_with_hydra()  # before @hydra.main composes on it

log = logging.getLogger("lte_fed")

# The reference the default job is compared to when no `full` run is at hand: method=full on
# digits with vit_digits, seed 0 (see README, "Results").
REFERENCE_PATH = Path(__file__).with_name("reference.json")


def run_job(spec: Spec, out: str | Path, record: dict[str, str] | None = None) -> dict:
    """Run one job with the engine the spec names, holding its run dir (`rundir.claimed`: no
    second run writes there meanwhile, and no new run over a finished one); returns its summary.
    `record`: files (relative path -> text) to write there once it is held (Hydra's record of
    the job, written by us and not by Hydra, which would write it into a dir a refused job
    does not hold)."""
    with claimed(out, spec.run.resume) as path:
        for name, text in (record or {}).items():
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            (path / name).write_text(text)
        if spec.run.engine == "fused":
            from lte_fed.engine import run_fused

            return run_fused(spec, out)
        from strategies.simulation import run_flower  # the Flower side: imported only when used

        return run_flower(spec, out)


def report(summary: dict, out: str | Path) -> str:
    """The short table that ends a run: this run next to the full-training reference."""
    table = _report_text(summary, out) if "val_loss" in summary["final"] else _report_images(summary, out)
    counts, rounds = summary.get("merges_per_head", []), summary.get("rounds", 0)
    missed = [f"warning: head {h} was merged in {n} of {rounds} rounds (why: {Path(out) / 'flower.log'})"
              for h, n in enumerate(counts) if n < rounds]
    return "\n".join([table, *missed])


def _report_images(summary: dict, out: str | Path) -> str:
    cfg, fin, tot = summary["config"], summary["final"], summary["totals"]
    lines = [f"run dir: {out}", "", f"| {'run':<28} | test acc | test loss | samples | sync steps | bytes moved |",
             f"|{'-' * 30}|----------|-----------|---------|------------|-------------|"]
    name = _run_name(cfg)
    lines.append(f"| {name:<28} | {_num(fin['test_acc'], '8.2f')} | {_num(fin['test_loss'], '9.4f')} | "
                 f"{tot['samples']:7d} | {tot['sync_steps']:10d} | {_bytes(tot['bytes_up'] + tot['bytes_down']):>11} |")
    ref = reference_for(cfg)
    if ref:
        lines.append(f"| {'full (stored reference)':<28} | {ref['test_acc']:8.2f} | {ref['test_loss']:9.4f} | "
                     f"{ref['samples']:7d} | {ref['steps']:10d} | {'-':>11} |")
        lines.append("")
        gap = None if fin["test_acc"] is None else fin["test_acc"] - ref["test_acc"]
        lines.append(f"accuracy vs full: {_num(gap, '+.2f')} points; "
                     f"samples: {tot['samples'] / max(ref['samples'], 1):.2f}x full's")
    return "\n".join(lines)


def _report_text(summary: dict, out: str | Path) -> str:
    cfg, fin, tot = summary["config"], summary["final"], summary["totals"]
    name = _run_name(cfg)
    return "\n".join([
        f"run dir: {out}", "", f"| {'run':<28} | val loss | perplexity | tokens     | sync steps | bytes moved |",
        f"|{'-' * 30}|----------|------------|------------|------------|-------------|",
        f"| {name:<28} | {_num(fin['val_loss'], '8.4f')} | {_num(fin['perplexity'], '10.3f')} | {tot['tokens']:10d} | "
        f"{tot['sync_steps']:10d} | {_bytes(tot['bytes_up'] + tot['bytes_down']):>11} |"]
        + (["", f"sample of generated text: {Path(out) / 'sample.txt'}"] if cfg["run"]["sample_tokens"] else []))


def _run_name(cfg: dict) -> str:
    """The run's row label: method and engine, and what sizes it (no heads for full training,
    no rank for FedAvg's full-model workers)."""
    sizes = {"full": "", "fedavg": f", N={cfg['resolved']['heads']}"}.get(
        cfg["method"], f", N={cfg['resolved']['heads']}, r={cfg['lte']['rank']}")
    return f"{cfg['method']} ({cfg['run']['engine']}{sizes})"


def reference_for(cfg: dict) -> dict | None:
    """The stored full-training run of this data and model, where this run sees the same
    images and test split (the reference used the default size, patch and test fraction)."""
    if not REFERENCE_PATH.exists() or cfg["method"] == "full":
        return None
    if cfg["model"].get("img_size") or cfg["model"].get("patch_size") or \
            cfg["data"].get("test_fraction") != DataSpec().test_fraction:
        return None
    refs = json.loads(REFERENCE_PATH.read_text())
    return refs.get(f"{cfg['data']['name']}/{cfg['model']['name']}")


def _num(v: float | None, fmt: str) -> str:
    """`v` formatted, or "nan" padded to the same width (a non-finite value is stored as null)."""
    return format(v, fmt) if v is not None else format("nan", f">{fmt.split('.')[0].lstrip('+') or 0}")


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")  # absolute: Hydra reads a relative one as a module


class Stopped(Exception):
    """SIGTERM, raised where the job is, so that it stops as cleanly as on Ctrl-C."""


def _stopped(signum, _frame):
    raise Stopped(signum)


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="config")
def _main(cfg: DictConfig) -> float | None:
    out = None
    signal.signal(signal.SIGTERM, _stopped)
    sweep = HydraConfig.get().mode.name == "MULTIRUN"
    try:
        if sweep and cfg.run.out and "${" not in str(OmegaConf.to_container(cfg.run, resolve=False)["out"]):
            raise SpecError(f"run.out={cfg.run.out} would be every job's dir in this sweep: leave run.out out "
                            "(each job gets <hydra.sweep.dir>/<job number>) or make it per job, e.g. "
                            "'run.out=runs/${hydra:job.num}'")
        out = cfg.run.out or HydraConfig.get().runtime.output_dir
        spec = Spec.from_dict(OmegaConf.to_container(cfg, resolve=True))
        summary = run_job(spec, out, record={".hydra/config.yaml": OmegaConf.to_yaml(cfg),
                                             ".hydra/overrides.yaml": OmegaConf.to_yaml(HydraConfig.get().overrides.task)})
    except (KeyboardInterrupt, Stopped) as e:
        # Both engines checkpoint every merge (run.checkpoint_every): the run resumes from there.
        name = "SIGTERM" if isinstance(e, Stopped) else "Ctrl-C"
        can_resume = out is not None and RunDir(out).checkpoint_path.exists()
        print(f"lte-fed: stopped by {name}; " + (f"resume with run.resume={Path(out).resolve()}" if can_resume
              else "no merge had finished, nothing to resume"), file=sys.stderr)
        sys.exit(128 + (signal.SIGTERM if isinstance(e, Stopped) else signal.SIGINT))
    except (*user_errors(), MemoryError, RuntimeError) as e:
        oom = _out_of_memory(e)
        if not isinstance(e, user_errors()) and not oom:
            if sweep:  # a bug: the job's dir says so too, and Hydra goes on to the next job
                _record_failure(HydraConfig.get().runtime.output_dir, e)
            raise
        print(f"{ERROR_PREFIX}{oom or e}", file=sys.stderr)
        if sweep:
            _record_failure(HydraConfig.get().runtime.output_dir, e)
            return None
        sys.exit(2)
    print(report(summary, out))
    final = summary["final"]
    return final["test_acc"] if "test_acc" in final else final["val_loss"]


def _out_of_memory(e: BaseException) -> str | None:
    """The one-line report of an allocation that failed (host or GPU memory), or None."""
    first = (str(e).strip().splitlines() or [""])[0]
    if not (isinstance(e, MemoryError) or "can't allocate memory" in first or "out of memory" in first.lower()):
        return None
    return (f"out of memory: {first[:300]}; this job does not fit: lower train.batch_size, lte.rank or lte.heads, "
            "use a smaller model or img_size, or check its size first with lte-fed-memory")


FAILED_JOBS: list[str] = []  # a sweep's failed jobs' dirs (Hydra's basic launcher runs jobs in this process)


def _record_failure(out: str, err: BaseException) -> None:
    """In a sweep, a failed job leaves a summary saying why, and the sweep goes on; but never in
    a dir that holds another run's record or that another run holds (a sweep re-run into the
    same dir is refused job by job: the finished runs there keep their summaries)."""
    FAILED_JOBS.append(out)
    path = Path(out)
    if isinstance(err, RunDirTaken):
        return
    try:
        path.mkdir(parents=True, exist_ok=True)
        (path / "summary.json").write_text(json.dumps({"failed": True, "error": f"{type(err).__name__}: {err}"}, indent=2))
    except OSError:  # run.out cannot be a folder (the error says so): the list at the end names it
        pass


PRESET_GROUPS = ("model", "data", "experiment", "ablation")  # conf/'s folders: `model=vit_small`, ...


def main() -> None:
    """Hydra's own errors (an unknown key or preset, an override it cannot parse) end, like ours,
    in one line and exit 2; HYDRA_FULL_ERROR=1 keeps Hydra's full report."""
    asked = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises instead of printing and exiting 1
    try:
        _main()
    except HydraException as e:
        if asked == "1":
            raise
        print(f"{ERROR_PREFIX}{hydra_error(e)}", file=sys.stderr)
        sys.exit(2)
    except ValueError as e:  # Hydra's, for a preset group set to null (model=null): not a HydraException
        if asked == "1" or "Config group override" not in str(e):
            raise
        nulls = [a for a in sys.argv[1:] if a.split("=", 1)[0].lstrip("+~") in PRESET_GROUPS and
                 a.split("=", 1)[-1].lower() in ("null", "none", "~", "")]
        print(f"{ERROR_PREFIX}{' '.join(nulls) or 'a preset group'}: a preset group ({', '.join(PRESET_GROUPS)}) "
              "takes a preset's name, not null", file=sys.stderr)
        sys.exit(2)
    finally:
        if asked is None:
            del os.environ["HYDRA_FULL_ERROR"]
        else:
            os.environ["HYDRA_FULL_ERROR"] = asked
    if FAILED_JOBS:
        print(f"{ERROR_PREFIX}{len(FAILED_JOBS)} job(s) of the sweep failed, each says why above and in its "
              "summary.json (unless its dir holds another run, left as it was): " + ", ".join(FAILED_JOBS), file=sys.stderr)
        sys.exit(2)


def hydra_error(e: BaseException) -> str:
    """Hydra's multi-line error as one line: what is wrong, and the choices where it lists them."""
    cause = e.__cause__
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and "not in struct" in str(cause):
        key = str(getattr(cause, "full_key", "") or "")
        if key in config_keys():  # its group was set to null first (quant=null quant.base=nf4)
            group = key.split(".")[0]
            return f"{key}: its group is null here ({group}=null): a group of keys is not a value"
        return f"{key}: no such config key{did_you_mean(key)}"
    lines = [ln.strip() for ln in str(e).splitlines()]
    if "Config search path:" in lines:  # the search path is Hydra's detail, not the user's
        lines = lines[:lines.index("Config search path:")]
    text, choices = [], []
    for raw, ln in zip(str(e).splitlines(), lines):
        if raw.startswith("\t"):
            choices.append(ln)
        elif ln and not ln.startswith("See https://"):
            text.append(ln.rstrip(":."))
    msg = "; ".join(text) + (f": {', '.join(choices)}" if choices else "")
    if isinstance(cause, Exception) and str(cause).splitlines():
        msg += f" ({str(cause).splitlines()[0]})"
    if isinstance(e, OverrideParseException):  # most often a path Hydra's grammar does not take bare
        msg += ("; quote a value with spaces, brackets or non-ASCII letters, keeping the quotes from the "
                "shell: 'run.out=\"my runs/ünï\"'")
    return msg


if __name__ == "__main__":
    main()
