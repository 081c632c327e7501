"""Shared pieces of the benchmark sections: statistics, specs, the environment record."""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def stats(xs: list[float]) -> dict:
    """Median and spread (IQR and min/max) of repeated measurements."""
    xs = sorted(float(x) for x in xs)
    if not xs:
        return {"n": 0}
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return {"median": statistics.median(xs), "q1": q[0], "q3": q[2], "min": xs[0], "max": xs[-1], "n": len(xs)}


def fmt(s: dict, unit: str = "s", digits: int = 3) -> str:
    """'median [q1-q3] (min-max, n)'."""
    if not s or not s.get("n"):
        return "n/a"
    k = 1000.0 if unit == "ms" else 1.0
    f = lambda v: f"{v * k:.0f}" if v * k >= 100 else f"{v * k:.{digits}g}"  # noqa: E731
    return f"{f(s['median'])} [{f(s['q1'])}–{f(s['q3'])}]"


def ratio_stats(num: list[float], den: list[float]) -> dict:
    """Ratios taken pair by pair (same repetition), then summarised."""
    return stats([a / b for a, b in zip(num, den)])


def spec_dict(method: str, *, model: dict, data: dict, lte: dict, train: dict, quant: str = "none",
              engine: str = "fused", **run) -> dict:
    return {"method": method, "model": model, "data": data, "lte": lte, "quant": {"base": quant}, "train": train,
            "run": {"engine": engine, "progress": False, "device": run.pop("device", "auto"), **run}}


def default_spec_dict(overrides: list[str]) -> dict:
    """The default job exactly as the `lte-fed` CLI would build it from conf/ (Hydra compose)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from lte_fed.spec import register_with_hydra

    register_with_hydra()  # the Spec defaults that conf/config.yaml composes on

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose("config", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


def environment() -> dict:
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    env = {
        "device": torch.cuda.get_device_name(0) if dev == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "device_type": dev, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "python": platform.python_version(),
        "loadavg": os.getloadavg(), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    try:
        import flwr

        env["flwr"] = flwr.__version__
    except Exception:  # pragma: no cover
        pass
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                env["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return env


class Timer:
    """Wall time `s` and this process's CPU time `cpu` (all threads) of a block. On a shared
    machine the CPU time is the steadier of the two: it does not count time spent waiting for
    a core (it does count OpenMP threads spinning)."""

    def __enter__(self):
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.s = time.perf_counter() - self.t0
        self.cpu = time.process_time() - self.c0


def sync(device) -> None:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize()
