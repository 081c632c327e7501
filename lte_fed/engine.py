"""The fused engine: one process, all N heads stacked in one model (run.engine=fused).

Per step, head n takes batch_size / N samples from its shard (drawn by (seed, n, step)); the
base matmul of every Linear runs once for the whole batch and the heads' LoRA terms run
batched. Each head has its own AdamW state (AdamW is elementwise, so one AdamW over the
stacked (N, ...) parameters is N independent ones) and its own gradient-norm clip. Every
`lte.merge_every` steps the heads merge, and the merged plain model is evaluated and logged.

Methods: lte (N heads, merged every T), mhlora (N heads trained jointly, paper eq. 2, never
merged), lora (one head, never merged), lora_merge (one head, merged and B reset every T, as
ReLoRA), full (ordinary training of the plain model).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from torch import nn

from . import costs
from .job import LORA_METHODS, Job, batch_source, describe, lte_config, progress, setup  # noqa: F401 (re-exported)
from .lte import StackedLTE, accounting
from .outer import OuterOptimizer, outer_config
from .uplink import FusedUplink
from .uplink import payload_bytes as uplink_bytes
from .rundir import RunDir, check_tensors_fit, checkpoint_meta, diverged, open_resume, restoring
from .spec import Spec, SpecError, TrainingDiverged, sync_steps
from .train import (autocast, evaluate, head_alignment, load_optimizer_tensors, lr_at, make_optimizer,
                    optimizer_step, optimizer_tensors, prefixed, token_loss, unprefixed)




def payload_bytes(model: StackedLTE) -> tuple[int, int]:
    """What one federated client would move per round: (up, down) in bytes of tensor payload.

    up = its head's factors + replicas; down = the (quantized) base + merged replicas.
    """
    head = model.head_state(0)
    up = sum(t.numel() * t.element_size() for t in head.values())
    replicas = sum(t.numel() * 4 for k, t in head.items() if not k.endswith(("lora_A", "lora_B")))
    base = 0
    for layer in model.lora_layers().values():
        parts = layer.base.parts() if layer.base is not None else {"weight": layer.weight}
        base += sum(t.numel() * t.element_size() for t in parts.values())
    return up, base + replicas


def _plain_payload(model: nn.Module) -> int:
    return sum(p.numel() * 4 for p in model.parameters())


class FusedRun:
    """One fused-engine run; `run()` trains to the end (or resumes) and writes the run dir."""

    def __init__(self, spec: Spec, out: str | Path):
        self.job = setup(spec)
        self.spec, self.dir = spec, RunDir(out)
        s, dev = spec, self.job.device
        if dev.type == "cpu":  # every step frees and re-allocates the same memory: keep it mapped
            costs.keep_freed_memory()
        self.src = batch_source(self.job)
        if s.method == "full":
            self.model = copy.deepcopy(self.job.plain).to(dev)
            self.params = list(self.model.parameters())
            self.bytes_up = self.bytes_down = _plain_payload(self.model)
        elif s.method in LORA_METHODS:
            self.model = StackedLTE(self.job.plain, lte_config(s)).to(dev)
            if s.method == "mhlora":
                self.model.set_mode("sum")
            self.params = self.model.head_params()
            self.bytes_up, self.bytes_down = payload_bytes(self.model)
        else:
            raise SpecError(f"method={s.method!r} runs on Flower only (run.engine=flower)")
        self.opt = make_optimizer(self.params, s.lr, s.train.weight_decay)
        # The outer optimizer (lte.outer; None for avg, the plain merge) and the replicas' values
        # as of the last merge, which it measures their update from.
        self.outer = None if s.method == "full" or outer_config(s).is_avg else OuterOptimizer(outer_config(s))
        self.anchors = self.model.replica_anchors() if self.outer is not None else {}
        # comm.up=fp16/int8: every merge goes through what the server would receive (lte_fed/uplink.py)
        self.uplink = FusedUplink(self.model, s.comm.up) if s.method == "lte" and s.comm.up != "fp32" else None
        if self.uplink is not None:
            self.bytes_up = uplink_bytes(self.uplink.layouts[0], s.comm.up)  # one head's (the fused heads share lte.rank)
        self.eval_model = copy.deepcopy(self.job.plain).to(dev)
        self.step, self.round, self.wall = 0, 0, 0.0

    # --- one step of every head
    def _batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        s, dev = self.spec, self.job.device
        if s.method in ("lte",) and not s.lte.same_batch:
            parts = [self.src.batch(n, self.step, dev) for n in range(s.heads)]
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        x, y = self.src.batch(0, self.step, dev)
        if s.method == "lte":  # same_batch: every head gets the same whole batch
            return x.repeat(s.heads, *[1] * (x.ndim - 1)), y.repeat(s.heads, *[1] * (y.ndim - 1))
        return x, y

    def train_step(self) -> float:
        s = self.spec
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.step, s.lr, s.train.warmup, s.train.steps)
        x, y = self._batch()
        with autocast(self.job.device, s.run.precision):
            logits = self.model(x).float()
        stacked = s.method in LORA_METHODS and s.method != "mhlora"
        heads = s.heads if stacked else 1
        per_head = token_loss(logits, y).view(heads, -1).mean(1)
        # The optimized loss is the sum of the heads' losses, so each head's factors get exactly
        # the gradient a lone worker would. mhlora: every head sees the whole batch, so the sum
        # is N times the loss (the scaling under which LTE with T=1 follows it exactly).
        loss = per_head.sum() * (s.heads if s.method == "mhlora" else 1)
        loss.backward()
        optimizer_step(self.opt, self.params, s.train.clip, heads=1 if s.method == "full" else self.model.n_heads)
        self.step += 1
        return per_head.mean().item()

    # --- a merge (or, for methods that never merge, an evaluation point)
    def end_round(self, losses: list[float], started: float) -> dict:
        s = self.spec
        row = {}
        if s.train.log_alignment and s.method in LORA_METHODS and s.heads > 1:
            row |= self.alignment()
        if s.method in ("lte", "lora_merge"):
            if self.uplink is not None:
                self.uplink.merge(self.model, self.outer, self.anchors)
            else:
                self.model.merge(self.outer, self.anchors)
        self.round += 1
        self.wall += time.perf_counter() - started
        self.eval_model.load_state_dict(self.plain_state())
        metrics = evaluate(self.eval_model, self.job.data, self.job.img_size, self.job.device, s.train.eval_batch)
        row = {"round": self.round, **progress(self.job, self.step),
               "train_loss": sum(losses) / max(1, len(losses)), **metrics,
               "bytes_up": self.bytes_up * s.heads, "bytes_down": self.bytes_down * s.heads,
               "wall_s": round(self.wall, 3), "lr": lr_at(self.step - 1, s.lr, s.train.warmup, s.train.steps), **row}
        self.dir.append_metrics(row)
        if (self.round % s.run.checkpoint_every == 0 or self.step >= s.train.steps) and not diverged(row):
            self.save_checkpoint()  # never over the last finite state with a NaN one
        return row

    def alignment(self) -> dict[str, float]:
        vals = [head_alignment(l.lora_B.detach(), l.lora_A.detach()) for l in self.model.lora_layers().values()]
        return {k: sum(v[k] for v in vals) / len(vals) for k in vals[0]}

    def plain_state(self) -> dict[str, torch.Tensor]:
        """The plain model's state as of now, in the original architecture's names."""
        if self.spec.method == "full":
            return self.model.state_dict()
        return self.model.export_plain_state()

    # --- checkpoints
    def save_checkpoint(self) -> None:
        tensors = prefixed("model", self.model.state_dict()) | prefixed("opt", optimizer_tensors(self.opt))
        if self.outer is not None:
            tensors |= prefixed("outer", self.outer.tensors()) | prefixed("anchor", self.anchors)
        if self.uplink is not None:
            tensors |= prefixed("uplink", self.uplink.tensors())
        self.dir.save_checkpoint(tensors, checkpoint_meta(self.job, step=self.step, round=self.round, wall_s=self.wall))

    def resume(self) -> None:
        """Continue from the checkpoint in `run.resume`, into this run's directory (any)."""
        src, tensors, meta = open_resume(self.job)
        check_tensors_fit(unprefixed("model", tensors), self.model.state_dict(), src, "model")
        with restoring(src):
            self.model.load_state_dict(unprefixed("model", tensors))
            load_optimizer_tensors(self.opt, unprefixed("opt", tensors))
            if self.outer is not None:
                self.outer.load(unprefixed("outer", tensors))
                self.anchors = unprefixed("anchor", tensors)
            if self.uplink is not None:
                self.uplink.load(unprefixed("uplink", tensors))
            self.step, self.round, self.wall = int(meta["step"]), int(meta["round"]), float(meta["wall_s"])
        self.dir.adopt(src, self.round)

    # --- the whole run
    def run(self, stop_after_rounds: int | None = None) -> dict:
        s = self.spec
        if s.run.resume:
            self.resume()
        from tqdm.auto import tqdm

        bar = tqdm(total=s.train.steps, initial=self.step, disable=not s.run.progress, unit="step",
                   desc=f"{s.method} fused", dynamic_ncols=True)
        rounds_now = 0
        while self.step < s.train.steps:
            started, losses = time.perf_counter(), []
            for _ in range(min(s.merge_every, s.train.steps - self.step)):
                losses.append(self.train_step())
                bar.update(1)
            row = self.end_round(losses, started)
            if why := diverged(row):
                bar.close()
                raise TrainingDiverged(f"{why} (metrics: {self.dir.metrics_path})")
            ev = {"val": f"{row['val_loss']:.3f}"} if "val_loss" in row else {"acc": f"{row['test_acc']:.1f}"}
            bar.set_postfix(loss=f"{row['train_loss']:.3f}", **ev,
                            samples_s=f"{row['samples'] / max(row['wall_s'], 1e-9):.0f}")
            rounds_now += 1
            if stop_after_rounds is not None and rounds_now >= stop_after_rounds and self.step < s.train.steps:
                bar.close()
                return {"stopped_at_round": self.round}
        bar.close()
        return self.finish()

    def finish(self) -> dict:
        s = self.spec
        state = self.plain_state()
        self.dir.save_model(state, metadata={"model": s.model.name, "method": s.method})
        rows = self.dir.read_metrics()
        summary = build_summary(s, rows, self.job, params=self.param_counts())
        self.dir.write_summary(summary)
        if self.job.is_text:  # last: the run's results are on disk while it samples
            self.eval_model.load_state_dict(state)
            write_sample(self.dir, self.eval_model, self.job, progress=s.run.progress)
        return summary

    def param_counts(self) -> dict[str, int]:
        if self.spec.method == "full":
            return {"trainable": sum(p.numel() for p in self.model.parameters())}
        return accounting(self.model)


def build_summary(s: Spec, rows: list[dict], job: Job, params: dict | None = None, **extra) -> dict:
    final = rows[-1] if rows else {}
    evals = ("val_loss", "perplexity") if job.is_text else ("test_loss", "test_acc")
    best = {"best_val_loss": min((r["val_loss"] for r in rows), default=None)} if job.is_text else \
        {"best_test_acc": max((r["test_acc"] for r in rows), default=None)}
    tokens = {"tokens": final.get("tokens", 0)} if job.is_text else {}
    return {
        "config": s.to_dict() | {"resolved": {"lr": s.lr, "heads": s.heads, "variant": lte_config(s).variant,
                                             **describe(job)}},
        "final": {k: final.get(k) for k in (*evals, "train_loss")},
        **best,
        "totals": {
            "steps": final.get("step", 0), "samples": final.get("samples", 0), **tokens, "sync_steps": sync_steps(s.method, final),
            "bytes_up": sum(r["bytes_up"] for r in rows), "bytes_down": sum(r["bytes_down"] for r in rows),
            "wall_s": final.get("wall_s", 0.0),
        },
        "params": params or {},
        **extra,
    }


def write_sample(rundir: RunDir, model: nn.Module, job: Job, progress: bool = False) -> None:
    """sample.txt: `run.sample_tokens` tokens the trained plain model generates from the first
    characters of the validation split (temperature 0.8, top 50, seeded by run.seed)."""
    n = job.spec.run.sample_tokens
    if n <= 0:
        return
    from tqdm.auto import tqdm

    from .rng import SAMPLE, torch_generator

    prompt = job.data.val[:min(32, job.data.block_size)].view(1, -1).to(job.device)
    g = torch_generator(job.spec.run.seed, SAMPLE)
    with tqdm(total=n, disable=not progress or n < 1000, unit="token", desc="sample.txt") as bar:
        out = model.generate(prompt, n, temperature=0.8, top_k=50, generator=g, on_token=bar.update)[0].cpu()
    tok = job.data.tokenizer
    text = tok.decode(out[:prompt.shape[1]]) + "<<<" + tok.decode(out[prompt.shape[1]:])
    (rundir.path / "sample.txt").write_text(f"# {n} tokens generated after the prompt (before <<<)\n{text}\n")


def run_fused(spec: Spec, out: str | Path) -> dict:
    return FusedRun(spec, out).run()
