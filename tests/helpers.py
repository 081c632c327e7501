"""Small shared helpers for tests: a quick spec on synthetic data, and weight comparison."""

from __future__ import annotations

from pathlib import Path

import torch

from lte_fed.rundir import RunDir
from lte_fed.spec import Spec


def quick_spec(method: str = "lte", engine: str = "fused", **groups) -> Spec:
    """A few steps of a tiny job on synthetic 8x8 data; `groups` override {"lte": {...}, ...}."""
    d = {
        "method": method,
        "model": {"name": "vit_digits"},
        "data": {"name": "synthetic", "synthetic_size": 256},
        "lte": {"heads": 2, "rank": 4, "alpha": 32.0, "merge_every": 3},
        "quant": {"base": "none"},
        "train": {"batch_size": 16, "steps": 6, "warmup": 2, "eval_batch": 256},
        "run": {"engine": engine, "progress": False, "device": "cpu"},
    }
    for group, values in groups.items():
        if isinstance(values, dict):
            d.setdefault(group, {}).update(values)
        else:
            d[group] = values
    return Spec.from_dict(d)


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def model_of(run_dir: str | Path) -> dict[str, torch.Tensor]:
    return RunDir(run_dir).load_model()


# Every process a run starts inherits its environment, Ray's daemons included: a unique value
# of TAG in a run's environment finds everything of that run, and nothing of anyone else's.
TAG = "LTE_FED_TEST_TAG"


def tagged_processes(tag: str) -> list[str]:
    """Live processes whose environment holds TAG=tag, as 'PID cmdline'."""
    needle = f"{TAG}={tag}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone meanwhile, or not ours to read
        if state != "Z":  # an exited process not reaped yet runs nothing
            found.append(f"{entry.name} {cmd[:200]}")
    return found


def interruptible() -> None:
    """Popen's preexec_fn for a child the test will Ctrl-C: SIGINT back to its default action.
    A test suite started in the background (`make test &`, nohup) inherits SIGINT ignored, and
    Python then never turns it into KeyboardInterrupt — the run would just go on."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
