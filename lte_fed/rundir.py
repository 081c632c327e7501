"""The run directory every engine writes (DESIGN.md §4).

    metrics.jsonl      one object per merge (round, step, samples, train_loss, test_loss,
                       test_acc — or val_loss, perplexity, tokens —, bytes_up, bytes_down, wall_s, ...)
    summary.json       resolved config, final metrics, totals
    model.safetensors  the merged plain model (no LoRA), loadable by the plain model builder
    checkpoint.safetensors  everything needed to resume exactly: tensors in safetensors, the
                       rest (round, spec, flags, run id) as JSON in its metadata
    client-state/      (Flower simulation) each head's local state, by run id and round

Files are written to a temporary name and renamed, so a run killed mid-write never leaves a
truncated model or checkpoint behind. Nothing here is ever unpickled: a run directory written
by someone else can be resumed from safely. JSON never holds a bare NaN (it becomes null).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from .spec import SpecError

log = logging.getLogger("lte_fed")
METRIC_FIELDS = ("round", "step", "samples", "train_loss", "bytes_up", "bytes_down", "wall_s")
# and one of these evaluations: images, or language models (with the tokens seen)
EVAL_FIELDS = (("test_loss", "test_acc"), ("val_loss", "perplexity", "tokens"))


CHECKPOINT = "checkpoint.safetensors"
CLIENT_STATE = "client-state"
LOCK = ".lock"  # held (flock) by the process that runs into the dir, for as long as it runs
SERVER_LOCK = ".server.lock"  # held (flock) by a Flower ServerApp for as long as it runs into the dir
_META_KEY = "lte-fed"

# Spec keys that may differ between a run and its resumption: none changes the math.
# data.root and data.download: where the data lives (a checkpoint checks the data by content, `open_resume`).
RESUME_FREE = {("run", k) for k in ("resume", "out", "progress", "verbose", "device", "round_timeout", "fault",
                                    "checkpoint_every", "client_cpus", "client_gpus", "sample_tokens")} | {
    ("train", "eval_batch"), ("data", "root"), ("data", "download")}


def jsonable(obj: Any) -> Any:
    """`obj` with every non-finite float replaced by None (strict JSON has no NaN)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def check_resumable(saved: dict, now: dict) -> None:
    """Raise SpecError naming the first key where the checkpoint's spec and this one differ in
    a way that would change the run."""
    for group in sorted(set(saved) | set(now)):
        a, b = saved.get(group), now.get(group)
        if not isinstance(b, dict) or not isinstance(a, dict):
            if a != b:
                raise SpecError(f"run.resume: {group}={b!r} differs from the checkpoint's {a!r}")
            continue
        for k in sorted(set(a) | set(b)):
            if (group, k) not in RESUME_FREE and a.get(k) != b.get(k):
                raise SpecError(f"run.resume: {group}.{k}={b.get(k)!r} differs from the checkpoint's {a.get(k)!r}")


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


class RunDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    @classmethod
    def existing(cls, path: str | os.PathLike) -> "RunDir":
        if not Path(path).is_dir():
            raise SpecError(f"run.resume: {path} is not a directory")
        return cls(path)

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def append_metrics(self, row: dict[str, Any]) -> None:
        missing = [k for k in METRIC_FIELDS if k not in row]
        if not any(all(k in row for k in keys) for keys in EVAL_FIELDS):
            missing += [" or ".join("/".join(keys) for keys in EVAL_FIELDS)]
        if missing:
            raise ValueError(f"metrics row lacks {missing}")
        with open(self.metrics_path, "a+b") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n":
                f.write(b"\n")  # a line torn by a killed run stays on its own line, not glued to this one
            f.write((json.dumps(jsonable(row), allow_nan=False) + "\n").encode())

    def read_metrics(self) -> list[dict[str, Any]]:
        """The rows, in order. A last line cut short (the run was killed while appending it,
        before its checkpoint) is left out; any other bad line is an error naming it."""
        if not self.metrics_path.exists():
            return []
        try:
            text = self.metrics_path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise SpecError(f"{self.metrics_path} is not text ({e}): the run's history is damaged") from None
        lines = text.splitlines()
        rows = []
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                if i == len(lines) and not text.endswith("\n"):
                    break  # torn by a kill mid-append
                raise SpecError(f"{self.metrics_path} line {i} is not JSON ({e}): the run's history is damaged") from None
            if not (isinstance(row, dict) and isinstance(row.get("round"), int)):
                raise SpecError(f"{self.metrics_path} line {i} is not a metrics row (an object with an integer "
                                f"round): {line[:80]!r}")
            rows.append(row)
        return rows

    def history_until(self, last_round: int) -> list[dict[str, Any]]:
        """The rows of rounds 1..last_round (a resume's checkpoint round), checked whole
        (`check_history`); rows logged after it are left out."""
        rows = [r for r in self.read_metrics() if r["round"] <= last_round]
        check_history(rows, last_round, self.metrics_path)
        return rows

    def adopt(self, source: "RunDir", last_round: int) -> None:
        """On resume: this run's record is `source`'s as of the checkpoint we resume from — its
        history up to that round (rows logged after it are dropped: they will be logged again),
        checked to be whole, and (into another dir) the checkpoint itself, so that this run can be
        resumed before its own first checkpoint. `source` may be this run dir."""
        rows = source.history_until(last_round)
        text = "".join(json.dumps(jsonable(r), allow_nan=False) + "\n" for r in rows)
        if source.path.resolve() != self.path.resolve():
            _atomic(self.checkpoint_path, lambda p: shutil.copyfile(source.checkpoint_path, p))
        _atomic(self.metrics_path, lambda p: p.write_text(text))

    def write_summary(self, summary: dict[str, Any]) -> None:
        text = json.dumps(jsonable(summary), indent=2, default=str, allow_nan=False)
        _atomic(self.path / "summary.json", lambda p: p.write_text(text))

    def read_summary(self) -> dict[str, Any]:
        return json.loads((self.path / "summary.json").read_text())

    def save_model(self, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
        """model.safetensors, with `metadata` as one JSON string under "lte-fed": safetensors
        writes several keys in an order that changes from process to process, and the same
        run must give the same bytes."""
        from safetensors.torch import save_file

        tensors = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
        header = {_META_KEY: json.dumps(metadata or {}, sort_keys=True)}
        _atomic(self.path / "model.safetensors", lambda p: save_file(tensors, str(p), metadata=header))

    def load_model(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.path / "model.safetensors"))

    @property
    def checkpoint_path(self) -> Path:
        return self.path / CHECKPOINT

    def save_checkpoint(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Tensors to safetensors, `meta` (JSON-able) into its header; one atomic file."""
        from safetensors.torch import save_file

        flat = {k: t.detach().cpu().contiguous().clone() for k, t in tensors.items()}
        header = {_META_KEY: json.dumps(jsonable(meta), allow_nan=False)}
        _atomic(self.checkpoint_path, lambda p: save_file(flat, str(p), metadata=header))

    def load_checkpoint(self, with_tensors: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, meta) of the checkpoint; SpecError (naming run.resume) if there is none or
        it cannot be read. with_tensors=False: its metadata only (the tensors dict is empty)."""
        from safetensors import safe_open

        if not self.checkpoint_path.exists():
            raise SpecError(f"run.resume: no {CHECKPOINT} in {self.path}")
        try:
            with safe_open(str(self.checkpoint_path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})[_META_KEY])
                tensors = {k: f.get_tensor(k) for k in f.keys()} if with_tensors else {}
        except Exception as e:  # noqa: BLE001 -- a damaged or foreign file: say so, in one line
            raise SpecError(f"run.resume: {self.checkpoint_path} is not a readable lte-fed checkpoint "
                            f"({type(e).__name__}: {e})") from None
        counters_ok = isinstance(meta, dict) and all(
            isinstance(meta.get(k), int) and not isinstance(meta[k], bool) and meta[k] >= 0
            for k in ("round", "step") if k in meta or k == "round")
        if not (counters_ok and isinstance(meta.get("wall_s"), (int, float)) and isinstance(meta.get("spec"), dict)):
            raise SpecError(f"run.resume: {self.checkpoint_path}'s metadata is damaged (it needs round and step "
                            "as integers >= 0, wall_s and spec)")
        try:  # the counters agree with the spec's schedule: round r ends at step min(r T, steps)
            every, steps = int(meta["spec"]["lte"]["merge_every"]), int(meta["spec"]["train"]["steps"])
            at = min(meta["round"] * every, steps)
            ok = every > 0 and meta["round"] <= -(-steps // every) and meta.get("step", at) == at
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise SpecError(f"run.resume: {self.checkpoint_path}'s metadata is damaged (round {meta['round']}, step "
                            f"{meta.get('step')} do not fit its spec's lte.merge_every and train.steps)")
        return tensors, meta

    def client_state_dir(self) -> Path:
        return self.path / CLIENT_STATE

    def adopt_client_state(self, source: "RunDir", run_id: str) -> None:
        """On resume (simulation): the heads' local state of `run_id`, written under `source`, is
        copied here, so the clients of the resumed run find it where they look."""
        src, dst = source.client_state_dir() / run_id, self.client_state_dir() / run_id
        if src.resolve() == dst.resolve() or not src.is_dir():
            return
        shutil.copytree(src, dst, dirs_exist_ok=True)


def check_history(rows: list[dict[str, Any]], last_round: int, path: Path) -> None:
    """SpecError unless `rows` are rounds 1..last_round in order, each with every metrics field
    as a number (an evaluation may be null: NaN is stored so): a history with a round lost,
    repeated or damaged would make the resumed run's totals wrong."""
    rounds = [r["round"] for r in rows]
    if rounds != list(range(1, last_round + 1)):
        raise SpecError(f"run.resume: {path} holds rounds {_span(rounds)}, not 1..{last_round} (the checkpoint's "
                        "round) in order: the run's history is damaged")
    for r in rows:
        evals = next((keys for keys in EVAL_FIELDS if all(k in r for k in keys)), ())
        bad = [k for k in METRIC_FIELDS + evals if not _number(r.get(k), nullable=k in evals or k == "train_loss")]
        if bad or not evals:
            raise SpecError(f"run.resume: {path}, round {r['round']}: " + (f"{', '.join(bad)} missing or not a number"
                            if bad else "no evaluation (test_loss/test_acc or val_loss/perplexity/tokens)")
                            + ": the run's history is damaged")


def _number(v: Any, nullable: bool) -> bool:
    return (v is None and nullable) or (isinstance(v, (int, float)) and not isinstance(v, bool))


def _span(rounds: list[int]) -> str:
    return "none" if not rounds else ", ".join(map(str, rounds[:6])) + (" ..." if len(rounds) > 6 else "")


def merged_nothing(rows: list[dict[str, Any]]) -> bool:
    """Whether a run's metrics rows show rounds and not one merged head (an untrained model)."""
    return bool(rows) and not any(r.get("merged_heads") for r in rows)


def diverged(row: dict[str, Any]) -> str | None:
    """Why a metrics row shows a diverged model (its evaluation loss is not finite: NaN is
    stored as null), or None. Both engines stop there: every later step would train on NaN."""
    key = "val_loss" if "val_loss" in row else "test_loss"
    value = row.get(key)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return None
    return (f"training diverged: after round {row.get('round')} (step {row.get('step')}) the merged model's {key} "
            f"is {'nan' if value is None else value}; lower train.lr or lte.alpha, or lengthen train.warmup")


def run_record(path: str | os.PathLike) -> list[str]:
    """The files that make `path` a run's record (its history, checkpoint or model); [] for a
    dir that holds none (new, empty, or left by a run that failed before its first merge)."""
    path = Path(path)
    names = [n for n in ("metrics.jsonl", CHECKPOINT, "model.safetensors") if (path / n).exists()]
    return [n for n in names if n != "metrics.jsonl" or (path / n).stat().st_size > 0]


class RunDirTaken(SpecError):
    """run.out holds another run's record, or another run holds it: the refused job writes
    nothing there (not even its failure)."""


def check_fresh(out: str | os.PathLike, resume: str | None) -> None:
    """SpecError if `out` already holds a run that this one is not continuing in place: a new
    run would append its history to the old one's and overwrite its model (nothing is lost
    by refusing; the user picks another dir or resumes)."""
    found = run_record(out)
    if found and not (resume and Path(resume).resolve() == Path(out).resolve()):
        raise RunDirTaken(f"run.out: {out} already holds a run ({', '.join(found)}); choose another run.out, "
                        f"or continue that run with run.resume={Path(out).resolve()}")


def make_run_dir(out: str | os.PathLike) -> Path:
    """`out` as a folder, made if need be; SpecError naming run.out where it cannot be one."""
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise SpecError(f"run.out: {out} is a file, not a folder; choose another run.out") from None
    except OSError as e:  # a file on the way (NotADirectoryError), no permission, a read-only place
        raise SpecError(f"run.out: cannot create the folder {out} ({e.strerror or e})") from None
    return path


def in_use(path: str | os.PathLike, lock_name: str = LOCK) -> bool:
    """Whether a live run holds `path` (its lock; SERVER_LOCK: a Flower ServerApp does)."""
    import fcntl

    try:
        with open(Path(path) / lock_name, "r") as lock:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except FileNotFoundError:
        return False
    except (BlockingIOError, OSError):
        return True
    return False


# what a run writes into its dir before any result: a run that fails with nothing more leaves no dir
BOOKKEEPING = (LOCK, ".hydra/config.yaml", ".hydra/overrides.yaml", ".hydra")


@contextlib.contextmanager
def _removed_if_left_empty(path: Path, fresh: bool):
    """If the run made `path` and fails (a refused resume, a bad key found late) before writing
    anything but BOOKKEEPING, take the dir away again."""
    try:
        yield
    except BaseException:
        if fresh and all(str(p.relative_to(path)) in BOOKKEEPING for p in path.rglob("*")):
            with contextlib.suppress(OSError):
                for name in BOOKKEEPING:
                    if (path / name).is_dir():
                        (path / name).rmdir()
                    elif (path / name).exists():
                        (path / name).unlink()
                path.rmdir()
        raise


@contextlib.contextmanager
def claimed(out: str | os.PathLike, resume: str | None):
    """Hold `out` for one run: refuse a dir another live run holds (its lock) or one that holds
    a finished or stopped run this one does not resume in place (`check_fresh`)."""
    import fcntl

    fresh = not Path(out).exists()
    path = make_run_dir(out)
    with open(path / LOCK, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # (the dir is the other run's: never taken away from here)
            raise RunDirTaken(f"run.out: {out} is in use by another run (it holds {path / LOCK}); "
                            "wait for it to end or choose another run.out") from None
        with _removed_if_left_empty(path, fresh):
            if in_use(path, SERVER_LOCK):  # its `lte-fed` is gone (killed), its Flower run is not
                raise RunDirTaken(f"run.out: {out} is in use by a Flower run that still runs (its ServerApp holds "
                                f"{path / SERVER_LOCK}) though the command that started it has ended; wait for "
                                "it or stop its flwr-simulation / flower-superlink processes, then resume")
            check_fresh(path, resume)
            yield path  # the lock goes with the file's close


@contextlib.contextmanager
def served(out: str | os.PathLike, resume: str | None):
    """What a Flower ServerApp holds while it runs into `out` (SERVER_LOCK), whoever started it
    (`lte-fed`, which also holds LOCK, or `flwr run` directly): a second Flower run into the same
    dir is refused, and so is an `lte-fed` resume while this one outlives its launcher."""
    import fcntl

    path = make_run_dir(out)
    with open(path / SERVER_LOCK, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirTaken(f"run.out: {out} is in use by another Flower run (its ServerApp holds "
                            f"{path / SERVER_LOCK}); wait for it to end or choose another run.out") from None
        check_fresh(path, resume)
        yield path


def check_tensors_fit(saved: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], src: RunDir, what: str) -> None:
    """SpecError unless the checkpoint's `saved` tensors have exactly `expected`'s names and shapes."""
    if saved.keys() != expected.keys():
        odd = sorted(saved.keys() ^ expected.keys())
        raise SpecError(f"run.resume: the checkpoint in {src.path} holds another {what} (tensors differ: "
                        f"{', '.join(odd[:3])}{' ...' if len(odd) > 3 else ''})")
    for k, t in expected.items():
        if saved[k].shape != t.shape:
            raise SpecError(f"run.resume: the checkpoint in {src.path} holds another {what} ({k} has shape "
                            f"{tuple(saved[k].shape)}, this run's {tuple(t.shape)})")
        if saved[k].dtype != t.dtype:  # loading would cast silently (fp16 loses what fp32 held)
            raise SpecError(f"run.resume: the checkpoint in {src.path} holds another {what} ({k} is "
                            f"{saved[k].dtype}, this run's {t.dtype})")
        if saved[k].is_floating_point() and not torch.isfinite(saved[k]).all():  # a run stops before saving NaN
            raise SpecError(f"run.resume: the checkpoint in {src.path} is damaged ({k} holds NaN or inf)")


@contextlib.contextmanager
def restoring(src: RunDir):
    """Around putting a checkpoint's contents in place: one that reads but does not fit this run
    (an optimizer state or ledger of another shape, a field missing) ends in a SpecError naming it."""
    try:
        yield
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as e:
        raise SpecError(f"run.resume: the checkpoint in {src.path} does not fit this run "
                        f"({type(e).__name__}: {e})") from None


def checkpoint_meta(job, **meta: Any) -> dict[str, Any]:
    """A checkpoint's metadata: `meta` and what `open_resume` checks (the spec, the data's hash)."""
    return {"spec": job.spec.to_dict(), "data_id": job.data_id, "torch_threads": torch.get_num_threads(), **meta}


def precheck_resume(spec) -> None:
    """Before a Flower run starts (its ServerApp checks everything, ~20 s later): the checks of
    `open_resume` and `adopt` that need neither the data nor the tensors."""
    src = RunDir.existing(spec.run.resume)
    _, meta = src.load_checkpoint(with_tensors=False)
    check_resumable(meta["spec"], spec.to_dict())
    src.history_until(meta["round"])


def open_resume(job) -> tuple[RunDir, dict[str, torch.Tensor], dict[str, Any]]:
    """The run dir `job.spec.run.resume` names, its checkpoint, checked against the job: the
    same spec (but for RESUME_FREE keys) and the same data, by content (it may have moved)."""
    src = RunDir.existing(job.spec.run.resume)
    elsewhere = not job.spec.run.out or Path(src.path).resolve() != Path(job.spec.run.out).resolve()
    if elsewhere and (in_use(src.path, LOCK) or in_use(src.path, SERVER_LOCK)):
        # two runs continuing one: on Flower they share its run id, and so the nodes' state files
        raise SpecError(f"run.resume: {src.path} is still running (a live run holds its lock); stop it, or wait "
                        "for it to end, before resuming it elsewhere")
    tensors, meta = src.load_checkpoint()
    check_resumable(meta["spec"], job.spec.to_dict())
    if meta.get("data_id", job.data_id) != job.data_id:  # (checkpoints before data_id: not checked)
        raise SpecError(f"run.resume: the data differs from the data the checkpoint in {src.path} was trained on "
                        f"(data.name={job.spec.data.name}, data.root={job.spec.data.root}): a run resumes on "
                        "the same data only")
    threads = meta.get("torch_threads")
    if job.spec.run.engine == "fused" and threads not in (None, torch.get_num_threads()):
        # a float sum split over another number of threads rounds differently
        log.warning("run.resume: the checkpoint's run trained with %d torch thread(s), this one has %d: it will "
                    "not end bit for bit as the uninterrupted run would (set OMP_NUM_THREADS=%d for that)",
                    threads, torch.get_num_threads(), threads)
    return src, tensors, meta
