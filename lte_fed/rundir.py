"""The run directory every engine writes (DESIGN.md §4).

    metrics.jsonl      one object per merge (round, step, samples, train_loss, test_loss,
                       test_acc — or val_loss, perplexity, tokens —, bytes_up, bytes_down, wall_s, ...)
    summary.json       resolved config, final metrics, totals
    model.safetensors  the merged plain model (no LoRA), loadable by the plain model builder
    checkpoint.pt      everything needed to resume exactly

Files are written to a temporary name and renamed, so a run killed mid-write never leaves a
truncated model or checkpoint behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

METRIC_FIELDS = ("round", "step", "samples", "train_loss", "bytes_up", "bytes_down", "wall_s")
# and one of these evaluations: images, or language models (with the tokens seen)
EVAL_FIELDS = (("test_loss", "test_acc"), ("val_loss", "perplexity", "tokens"))


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


class RunDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def append_metrics(self, row: dict[str, Any]) -> None:
        missing = [k for k in METRIC_FIELDS if k not in row]
        if not any(all(k in row for k in keys) for keys in EVAL_FIELDS):
            missing += [" or ".join("/".join(keys) for keys in EVAL_FIELDS)]
        if missing:
            raise ValueError(f"metrics row lacks {missing}")
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def keep_metrics_through(self, last_round: int) -> None:
        """On resume: drop rows logged after the checkpoint we resume from."""
        rows = [r for r in self.read_metrics() if r["round"] <= last_round]
        _atomic(self.metrics_path, lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in rows)))

    def write_summary(self, summary: dict[str, Any]) -> None:
        _atomic(self.path / "summary.json", lambda p: p.write_text(json.dumps(summary, indent=2, default=str)))

    def read_summary(self) -> dict[str, Any]:
        return json.loads((self.path / "summary.json").read_text())

    def save_model(self, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
        from safetensors.torch import save_file

        tensors = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
        _atomic(self.path / "model.safetensors", lambda p: save_file(tensors, str(p), metadata=metadata))

    def load_model(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.path / "model.safetensors"))

    @property
    def checkpoint_path(self) -> Path:
        return self.path / "checkpoint.pt"

    def save_checkpoint(self, obj: dict[str, Any]) -> None:
        _atomic(self.checkpoint_path, lambda p: torch.save(obj, p))

    def load_checkpoint(self) -> dict[str, Any]:
        if not self.checkpoint_path.exists():
            raise FileNotFoundError(f"run.resume: no checkpoint.pt in {self.path}")
        return torch.load(self.checkpoint_path, map_location="cpu", weights_only=False)
