"""The run specification: every config key of `lte-fed`, typed, with defaults and validation.

These dataclasses are the ONE home of every key and its default. Hydra composes on top of them
(`HYDRA_NODE`, registered below; conf/ holds only presets: models, data sets, experiments), and
Flower's `[tool.flwr.app.config]` table in pyproject.toml is written from them
(scripts/write_flwr_config.py; a test keeps it equal to `flower_run_config()`).

Hydra (conf/) produces a nested dict; `Spec.from_dict` turns it into this tree and `validate`
rejects bad values (wrong type included) before any training starts, with one message naming
the key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import typing
from dataclasses import dataclass, field
from typing import Any

METHODS = ("lte", "mhlora", "lora", "lora_merge", "full", "fedavg")
NEVER_MERGE = ("lora", "mhlora")  # their heads train on and are never merged into the model


def sync_steps(method: str, row: dict) -> int:
    """Synchronizations up to a metrics row: every optimizer step for full training (data-parallel
    training all-reduces every step), none for the methods that never merge, one per merge round
    otherwise."""
    if method == "full":
        return int(row.get("step", 0))
    return 0 if method in NEVER_MERGE else int(row.get("round", 0))
ENGINES = ("flower", "fused")

# Learning rate used when train.lr is null, tuned for the default job (digits, vit_digits):
# with a small scale s = alpha / rank = 2 the LoRA methods train at the full model's rate.
# The paper's regime (alpha 4096-8192, LTE lr 0.05-0.1x full's) is for ViT-S and up.
DEFAULT_LR = {"lte": 3e-3, "mhlora": 3e-3, "lora": 3e-3, "lora_merge": 3e-3, "full": 3e-3, "fedavg": 3e-3}


# run.sample_tokens: one forward pass per token (gpt_shakespeare: ~25 s per thousand on 2 CPU cores).
MAX_SAMPLE_TOKENS = 20_000


class SpecError(ValueError):
    """A bad configuration value; the message names the key."""


class ReportedError(RuntimeError):
    """A user error that another process (the ServerApp under `flwr run`) already reported."""


class TrainingDiverged(RuntimeError):
    """The merged model's evaluation loss stopped being finite (rundir.diverged says where)."""


# How every side of lte-fed reports an error the user can fix: one line, no traceback.
ERROR_PREFIX = "lte-fed: error: "


def user_errors() -> tuple[type[BaseException], ...]:
    """The errors a user can cause (bad config, missing data, a model that cannot be
    parameterized): reported as one line, never as a traceback."""
    from .data import DataError
    from .lte import ParameterizeError

    return (SpecError, ReportedError, TrainingDiverged, DataError, ParameterizeError, FileNotFoundError)


@dataclass
class LTESpec:
    heads: int = 2
    rank: int = 4
    alpha: float = 8.0
    merge_every: int = 10
    variant: str = "exact"
    init: str = "orthogonal"
    keep_norm_affine: bool = False
    same_batch: bool = False  # every head sees the same full batch (the multi-head LoRA regime)
    # The server's outer optimizer on the merged update (lte_fed/outer.py): avg | nesterov | adam.
    # outer_lr / outer_momentum (Nesterov's mu, Adam's beta1) / outer_beta2 / outer_eps are
    # ignored by avg.
    outer: str = "avg"
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    outer_beta2: float = 0.99
    outer_eps: float = 1e-8
    # Heads of different rank (a node's `rank` in its node config): s = alpha / sqrt(rank * lte.rank)
    # ("sqrt", each head's update the same size whatever its rank) or alpha / rank ("linear");
    # the same for heads at lte.rank. docs/heterogeneous.md has the measurement.
    rank_scale: str = "sqrt"


@dataclass
class QuantSpec:
    base: str = "none"


@dataclass
class CommSpec:
    # What workers send back (lte_fed/uplink.py): fp32 (the head's state as it is), fp16 or int8
    # (the round's change, per-block int8 scales, with error feedback kept on the worker).
    up: str = "fp32"


@dataclass
class ModelSpec:
    name: str = "vit_digits"
    img_size: int | None = None  # None: the data's native size
    patch_size: int | None = None  # None: the builder's default
    block_size: int | None = None  # language models: context length; None: the builder's default


@dataclass
class DataSpec:
    name: str = "digits"
    root: str | None = None
    partition: str = "iid"
    alpha: float = 0.5
    augment: bool = False
    download: bool = False
    test_fraction: float = 0.2
    synthetic_size: int = 512
    tokenizer: str = "char"  # text data: char | gpt2 (GPT-2's BPE through tiktoken)
    val_tokens: int = 32768  # text data: validation tokens scored per evaluation (fixed windows); 0: all


@dataclass
class TrainSpec:
    batch_size: int = 64  # cumulative: all heads together
    lr: float | None = None  # None: DEFAULT_LR[method]
    steps: int = 900
    warmup: int = 20
    weight_decay: float = 0.0
    clip: float = 1.0  # per-head gradient-norm clip; 0 disables
    eval_batch: int = 512
    log_alignment: bool = False  # log heads' pairwise cosine / Grassmann distance at each merge


@dataclass
class RunSpec:
    engine: str = "flower"
    seed: int = 0
    device: str = "auto"
    out: str | None = None
    resume: str | None = None
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    client_cpus: float = 1.0  # flower engine: CPUs per virtual node (fractions: several nodes per core)
    client_gpus: float = 0.0  # flower engine: fraction of a GPU per virtual node
    min_heads: int = 1  # flower engine: a round merges only if at least this many heads replied
    # flower engine, simulation: virtual nodes sharing the N heads (each trains its share stacked,
    # as the fused engine does). 0: as many as the machine runs in parallel (CPU cores /
    # run.client_cpus, or GPUs / run.client_gpus), at most lte.heads. In a deployment: the
    # nodes the server waits for before round 1 (0: until their capacity covers lte.heads).
    nodes: int = 0
    # flower engine, simulation: what each simulated node declares, as a deployed node's node
    # config would, in partition order, ";"-separated: "heads=2 rank=16;rank=4;memory-gb=2" (a
    # mixed fleet on one box). Null: every node declares nothing (an even share at lte.rank).
    fleet: str | None = None
    # flower engine: seconds after which a round merges the heads that arrived (0: wait for all,
    # up to run.round_timeout); a late head's update is dropped and it restarts from the
    # server's state.
    round_deadline: float = 0.0
    # flower engine: what a round in which only the heads S arrived divides their summed update
    # by: "all" (N: each head moves W as far as in a full round, a lone head 1/N of the way) or
    # "arrived" (|S|: the mean of the arrived heads' updates). "all" ended higher on 3 of 3 paired
    # seeds with a slow node under a deadline (docs/results/heterogeneous).
    partial_merge: str = "all"
    # flower engine, with run.round_deadline: what a node too slow for the deadline does. "fixed":
    # every head runs the round's T steps, and a late one is dropped and restarted; "fit": the
    # server sends such a node fewer steps, as many as its recent answers say fit in 0.8 of the
    # deadline (lte_fed/placement.py steps_that_fit), so it trains every round.
    deadline_steps: str = "fixed"
    round_timeout: float = 600.0  # flower engine: seconds to wait for a round's replies
    # flower engine, the update-size guard (lte_fed/ledger.py Guard; 0 disables): a head whose
    # update is over max_update_ratio x the layer's norm, or over max_update_outlier x the other
    # heads' median, is rejected.
    max_update_ratio: float = 10.0
    max_update_outlier: float = 20.0
    # Testing aid: make one worker misbehave, "KIND:HEAD:ROUND" with KIND one of raise (the
    # client fails: every head of its node), nan (replies NaN factors), shape (replies a wrong
    # shape), hang (replies only after the round timed out, as a node gone for that round),
    # slow<F> (the node sleeps F times its training time before replying; ROUND * = every round;
    # HEAD node<P>: the node of partition-id P, whatever heads it holds, a slow device).
    fault: str | None = None
    progress: bool = True
    verbose: bool = False  # flower engine: stream Flower's and Ray's logs here, not only to <run dir>/flower.log
    checkpoint_every: int = 1  # in merges
    sample_tokens: int = 500  # language models: tokens generated into sample.txt at the end; 0: none


@dataclass
class Spec:
    method: str = "lte"
    lte: LTESpec = field(default_factory=LTESpec)
    quant: QuantSpec = field(default_factory=QuantSpec)
    comm: CommSpec = field(default_factory=CommSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    run: RunSpec = field(default_factory=RunSpec)

    # --- derived
    @property
    def heads(self) -> int:
        """Heads actually trained: 1 for lora / lora_merge / full."""
        return self.lte.heads if self.method in ("lte", "mhlora", "fedavg") else 1

    @property
    def lr(self) -> float:
        return float(self.train.lr) if self.train.lr is not None else DEFAULT_LR[self.method]

    @property
    def merge_every(self) -> int:
        """Steps between merges (for methods that never merge: between evaluations)."""
        return self.lte.merge_every

    @property
    def rounds(self) -> int:
        return -(-self.train.steps // self.merge_every)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Spec":
        return _build(cls, d, "")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def config_keys(kind: type | None = None, prefix: str = "") -> list[str]:
    """Every dotted key of the spec (`lte.rank`, `run.out`, ...), in declaration order."""
    keys = []
    for f in dataclasses.fields(kind or Spec):
        if dataclasses.is_dataclass(f.default_factory):
            keys += config_keys(f.default_factory, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def did_you_mean(key: str) -> str:
    """" (did you mean lte.rank?)" for a misspelt key, "" when nothing is close."""
    import difflib

    close = difflib.get_close_matches(key, config_keys(), n=2, cutoff=0.75)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def _build(kind, d: dict[str, Any] | None, prefix: str):
    if d is None and prefix:  # `lte=null` would quietly put every lte.* key back at its default
        raise SpecError(f"{prefix.rstrip('.')}: a group of keys ({', '.join(config_keys(kind, prefix)[:3])}, ...), "
                        "not null")
    if d is not None and not isinstance(d, dict):
        raise SpecError(f"{prefix.rstrip('.') or 'the config'}: a group of keys ({', '.join(config_keys(kind, prefix)[:3])}, ...), "
                        f"not a value: got {d!r}")
    d = dict(d or {})
    kwargs = {}
    for f in dataclasses.fields(kind):
        if f.name not in d:
            continue
        v = d.pop(f.name)
        kwargs[f.name] = _build(f.default_factory, v, f"{f.name}.") if dataclasses.is_dataclass(f.default_factory) else v
    d.pop("hydra", None)
    if not prefix:  # summary.json's config: what the run resolved its defaults to, beside the keys
        d.pop("resolved", None)
    if d:
        raise SpecError(f"unknown config key(s): {', '.join(prefix + k + did_you_mean(prefix + k) for k in d)}")
    return kind(**kwargs)


# Keys `flwr run` does not take: in a deployment the federation's config sets the resources.
NOT_IN_FLOWER_CONFIG = ("run.client_cpus", "run.client_gpus")


def flower_run_config(spec: Spec | None = None) -> dict[str, Any]:
    """`spec` (the defaults when None) as Flower's flat run config {"lte.heads": 2, ...}, "" for
    null (TOML has none): pyproject.toml's [tool.flwr.app.config] is this for the defaults."""
    flat = {}
    for group, values in (spec or Spec()).to_dict().items():
        for key, value in (values.items() if isinstance(values, dict) else [("", values)]):
            name = f"{group}.{key}" if key else group
            if name not in NOT_IN_FLOWER_CONFIG:
                flat[name] = "" if value is None else value
    return flat


def toml_lines(flat: dict[str, Any]) -> str:
    """A flat run config as TOML lines '"lte.heads" = 2' (pyproject's table, `--run-config` files)."""
    return "".join(f"{_toml_string(k, k)} = {_toml_value(v, k)}\n" for k, v in flat.items())


def _toml_value(v, key: str) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)  # TOML reads Python's int and float literals, inf and nan included
    return _toml_string(str(v), key)


def _toml_string(text: str, key: str) -> str:
    """`text` as a TOML basic string: UTF-8 as it is, quotes, backslashes and control characters
    escaped (json.dumps wrote a character beyond U+FFFF as a surrogate pair, which TOML refuses:
    a run.out with an emoji stopped the Flower run after it had started)."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        elif 0xD800 <= ord(ch) <= 0xDFFF:  # a file name's undecodable byte (surrogateescape)
            raise SpecError(f"{key}: {text!r} is not valid Unicode; rename it")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


# The node Hydra composes on (conf/config.yaml's defaults list names it): the defaults as a plain,
# untyped dict, so a value of the wrong type reaches `validate` and ends in its one-line
# "key: why" instead of a multi-line OmegaConf error.
HYDRA_NODE = "lte_fed_spec"


def register_with_hydra() -> None:
    """Store the defaults as HYDRA_NODE in Hydra's ConfigStore (idempotent). `lte-fed` and every
    compose() need it; call it before composing."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=HYDRA_NODE, node=Spec().to_dict())


# At import only where Hydra is already loaded (the CLI imports it first): a ClientApp process
# never composes, and importing Hydra would cost every Flower message ~0.5 s of start-up.
if "hydra" in sys.modules:
    register_with_hydra()


def _need(cond: bool, key: str, why: str) -> None:
    if not cond:
        raise SpecError(f"{key}: {why}")


# Seeds are 32-bit (rng.derive_seed's keys): a larger or negative one would silently equal another.
MAX_SEED = 2**32 - 1

_TYPE_NAMES = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string"}


def _has_type(v, t) -> bool:
    if t is float:  # a finite number: no key means anything at inf or nan, and they poison the math
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return isinstance(v, t) and (t is bool or not isinstance(v, bool))  # True is an int to Python


def _check_types(node, prefix: str = "") -> None:
    """Every value has its field's type (None only where the default may be null)."""
    for name, hint in typing.get_type_hints(type(node)).items():
        v, key = getattr(node, name), prefix + name
        if dataclasses.is_dataclass(hint):
            _check_types(v, f"{key}.")
            continue
        kinds = [t for t in typing.get_args(hint) or (hint,) if t is not type(None)]
        optional = len(kinds) < len(typing.get_args(hint) or (hint,))
        if not (v is None and optional or any(_has_type(v, t) for t in kinds)):
            want = " or ".join([_TYPE_NAMES[t] for t in kinds] + ["null"] * optional)
            raise SpecError(f"{key}: must be {want}, got {v!r}")


FLEET_KEYS = {"heads": int, "rank": int, "memory-gb": float}


def parse_fleet(text: str) -> list[dict[str, float]]:
    """run.fleet "heads=2 rank=16;rank=4" -> [{"heads": 2, "rank": 16}, {"rank": 4}]."""
    out = []
    for i, entry in enumerate(str(text).split(";")):
        if not entry.strip():  # "heads=2;" would add a node nobody meant
            raise ValueError(f"node {i} is empty (a stray ';'?): give each node at least one of "
                             f"{', '.join(k + '=...' for k in FLEET_KEYS)}; rank=<lte.rank> keeps a node at the defaults")
        node = {}
        for item in entry.split():
            key, eq, value = item.partition("=")
            if not eq or key not in FLEET_KEYS:
                raise ValueError(f"{item!r} is not one of {', '.join(k + '=...' for k in FLEET_KEYS)}")
            try:
                node[key] = FLEET_KEYS[key](value)
            except ValueError:
                raise ValueError(f"{item!r}: {value!r} is not a number") from None
            if not (0 < node[key] < math.inf):  # nan fails too
                raise ValueError(f"{item!r} must be a finite number > 0")
        out.append(node)
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def validate(s: Spec) -> Spec:
    """Raise SpecError naming the first bad key; returns `s` for chaining."""
    from .data import DATASETS, TEXT_DATASETS
    from .lora import INITS, RANK_SCALES, VARIANTS
    from .models import is_language_model, list_models
    from .text import PARTITIONS, TOKENIZERS
    from .outer import OUTERS
    from .quant import QUANT_FORMATS
    from .uplink import UPLINKS

    _check_types(s)
    _need(s.method in METHODS, "method", f"{s.method!r} is not one of {', '.join(METHODS)}")
    _need(s.lte.heads > 0, "lte.heads", f"must be a positive integer, got {s.lte.heads!r}")
    _need(s.lte.rank > 0, "lte.rank", f"must be a positive integer, got {s.lte.rank!r}")
    _need(isinstance(s.lte.alpha, (int, float)) and s.lte.alpha > 0, "lte.alpha", f"must be > 0, got {s.lte.alpha!r}")
    _need(s.lte.merge_every > 0, "lte.merge_every", f"must be a positive integer, got {s.lte.merge_every!r}")
    _need(s.lte.variant in VARIANTS, "lte.variant", f"{s.lte.variant!r} is not one of {', '.join(VARIANTS)}")
    _need(s.lte.init in INITS, "lte.init", f"{s.lte.init!r} is not one of {', '.join(INITS)}")
    _need(s.lte.outer in OUTERS, "lte.outer", f"{s.lte.outer!r} is not one of {', '.join(OUTERS)}")
    _need(s.lte.outer_lr > 0, "lte.outer_lr", f"must be > 0, got {s.lte.outer_lr!r}")
    _need(0 <= s.lte.outer_momentum < 1, "lte.outer_momentum", f"must be in [0, 1), got {s.lte.outer_momentum!r}")
    _need(0 <= s.lte.outer_beta2 < 1, "lte.outer_beta2", f"must be in [0, 1), got {s.lte.outer_beta2!r}")
    _need(s.lte.outer_eps > 0, "lte.outer_eps", f"must be > 0, got {s.lte.outer_eps!r}")
    _need(s.comm.up in UPLINKS, "comm.up", f"{s.comm.up!r} is not one of {', '.join(UPLINKS)}")
    _need(s.lte.rank_scale in RANK_SCALES, "lte.rank_scale", f"{s.lte.rank_scale!r} is not one of {', '.join(RANK_SCALES)}")
    _need(s.quant.base in QUANT_FORMATS, "quant.base", f"{s.quant.base!r} is not one of {', '.join(QUANT_FORMATS)}")
    _need(s.model.name in list_models(), "model.name", f"{s.model.name!r} is unknown; available: {', '.join(list_models())}")
    _need(s.data.name in DATASETS, "data.name", f"{s.data.name!r} is not one of {', '.join(DATASETS)}")
    text = s.data.name in TEXT_DATASETS
    _need(is_language_model(s.model.name) == text, "model.name",
          f"{s.model.name!r} is {'a language model' if is_language_model(s.model.name) else 'an image model'} but "
          f"data.name={s.data.name!r} is {'text' if text else 'image data'}")
    # data.name=X alone keeps the other data keys of the preset it replaced; data=X selects X's
    preset = f" (if you switched data sets with data.name={s.data.name}, select its preset instead: data={s.data.name})"
    if text:
        _need(s.data.partition in PARTITIONS, "data.partition",
              f"{s.data.partition!r} is not one of {', '.join(PARTITIONS)} (text data){preset}")
        _need(s.data.tokenizer in TOKENIZERS, "data.tokenizer", f"{s.data.tokenizer!r} is not one of {', '.join(TOKENIZERS)}")
        _need(s.model.block_size is None or s.model.block_size > 0, "model.block_size",
              f"must be a positive integer or null, got {s.model.block_size!r}")
        _need(s.data.val_tokens >= 0, "data.val_tokens", f"must be an integer >= 0, got {s.data.val_tokens!r}")
        _need(0 <= s.run.sample_tokens <= MAX_SAMPLE_TOKENS, "run.sample_tokens",
              f"must be an integer from 0 to {MAX_SAMPLE_TOKENS} (sample.txt is a glance at the trained model; "
              f"generate more from model.safetensors), got {s.run.sample_tokens!r}")
        _need(s.data.name != "text" or bool(s.data.root), "data.root", "data.name=text needs data.root=<a text file or a folder of text files>")
        for key in ("img_size", "patch_size"):  # set, they would be ignored
            _need(getattr(s.model, key) is None, f"model.{key}", f"a language model takes no {key} (its context "
                  f"length is model.block_size); leave it null, got {getattr(s.model, key)!r}")
    else:
        _need(s.data.partition in ("iid", "dirichlet"), "data.partition", f"{s.data.partition!r} is not iid or dirichlet{preset}")
        _need(s.model.block_size is None, "model.block_size", f"only language models have a context length "
              f"(image models take model.img_size and model.patch_size); leave it null, got {s.model.block_size!r}")
    _need(s.data.alpha > 0, "data.alpha", f"must be > 0, got {s.data.alpha!r}")
    _need(s.train.batch_size > 0, "train.batch_size", f"must be a positive integer, got {s.train.batch_size!r}")
    if s.method in ("lte", "fedavg") and not s.lte.same_batch:
        _need(s.train.batch_size % s.lte.heads == 0, "train.batch_size",
              f"{s.train.batch_size} is not divisible by lte.heads={s.lte.heads} (each head gets batch_size / heads)")
    _need(s.train.steps > 0, "train.steps", f"must be a positive integer, got {s.train.steps!r}")
    # A warm-up longer than the run is cut to its length (train.lr_at): short runs just work.
    _need(s.train.warmup >= 0, "train.warmup", f"must be >= 0, got {s.train.warmup!r}")
    _need(s.train.lr is None or s.train.lr > 0, "train.lr", f"must be > 0, got {s.train.lr!r}")
    _need(s.train.clip >= 0, "train.clip", f"must be >= 0, got {s.train.clip!r}")
    _need(s.train.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {s.train.weight_decay!r}")
    _need(s.train.eval_batch > 0, "train.eval_batch", f"must be a positive integer, got {s.train.eval_batch!r}")
    _need(0 < s.data.test_fraction < 1, "data.test_fraction", f"must be in (0, 1), got {s.data.test_fraction!r}")
    _need(s.data.synthetic_size > 0, "data.synthetic_size", f"must be a positive integer, got {s.data.synthetic_size!r}")
    for key in ("img_size", "patch_size"):
        v = getattr(s.model, key)
        _need(v is None or v > 0, f"model.{key}", f"must be null or a positive integer, got {v!r}")
    _need(0 <= s.run.seed <= MAX_SEED, "run.seed", f"must be an integer in [0, {MAX_SEED}], got {s.run.seed!r}")
    _need(s.run.engine in ENGINES, "run.engine", f"{s.run.engine!r} is not one of {', '.join(ENGINES)}")
    _need(s.run.device in ("auto", "cpu", "cuda") or s.run.device.startswith("cuda:"), "run.device", f"{s.run.device!r} is not auto, cpu or cuda")
    _need(s.run.precision in ("auto", "fp32", "bf16", "fp16"), "run.precision", f"{s.run.precision!r} is not auto, fp32, bf16 or fp16")
    _need(s.run.min_heads >= 1, "run.min_heads", f"must be a positive integer, got {s.run.min_heads!r}")
    _need(s.run.checkpoint_every >= 1, "run.checkpoint_every", f"must be a positive integer, got {s.run.checkpoint_every!r}")
    _need(s.run.round_timeout > 0, "run.round_timeout", f"must be > 0, got {s.run.round_timeout!r}")
    _need(s.run.client_cpus > 0, "run.client_cpus", f"must be > 0, got {s.run.client_cpus!r}")
    _need(s.run.client_gpus >= 0, "run.client_gpus", f"must be >= 0, got {s.run.client_gpus!r}")
    _need(s.run.max_update_ratio >= 0, "run.max_update_ratio", f"must be >= 0 (0 disables), got {s.run.max_update_ratio!r}")
    _need(s.run.max_update_outlier >= 0, "run.max_update_outlier", f"must be >= 0 (0 disables), got {s.run.max_update_outlier!r}")
    if s.method == "fedavg":
        _need(s.run.engine == "flower", "run.engine", "method=fedavg runs on Flower (run.engine=flower)")
    if s.method == "mhlora":
        _need(s.run.engine == "fused", "run.engine", "method=mhlora trains all heads jointly (run.engine=fused)")
    if s.method == "full":  # Flower's ServerApp would run it as one LoRA head, silently
        _need(s.run.engine == "fused", "run.engine", "method=full trains the whole model in one process "
              "(run.engine=fused); full-model training on Flower is method=fedavg")
    _need(s.run.nodes >= 0, "run.nodes", f"must be an integer >= 0 (0: as many as run in parallel), got {s.run.nodes!r}")
    if s.method == "fedavg":  # one worker per node
        _need(s.run.nodes in (0, s.lte.heads), "run.nodes", f"{s.run.nodes} nodes for lte.heads={s.lte.heads}: "
              "method=fedavg runs one worker on each node (run.nodes=0 or lte.heads)")
    if s.method == "lte":
        _need(s.run.nodes <= s.lte.heads, "run.nodes", f"{s.run.nodes} nodes for lte.heads={s.lte.heads}: every node "
              "trains at least one head")
    if s.run.fleet:
        try:
            entries = parse_fleet(s.run.fleet)
        except ValueError as e:
            raise SpecError(f"run.fleet: {e}") from None
        _need(not s.run.nodes or len(entries) == s.run.nodes, "run.fleet",
              f"has {len(entries)} node(s) but run.nodes={s.run.nodes}")
        _need(len(entries) <= s.heads, "run.fleet", f"has {len(entries)} nodes for {s.heads} head(s): every node "
              "trains at least one head")
        # a simulated fleet never grows: heads it cannot hold would wait every round, untrained
        # (an entry that declares neither heads nor memory takes any share; memory: the server checks)
        if all("heads" in e and "memory-gb" not in e for e in entries):
            held = sum(int(e["heads"]) for e in entries)
            _need(held >= s.heads, "run.fleet", f"its nodes declare {held} head(s) of {s.heads}: the others would "
                  "never train; declare more, or leave a node's heads undeclared (it takes its share)")
    if s.run.engine == "flower":
        _need(s.run.min_heads <= s.heads, "run.min_heads", f"{s.run.min_heads} is more than the run's {s.heads} "
              "head(s): no round could merge")
    _need(s.run.partial_merge in ("arrived", "all"), "run.partial_merge",
          f"{s.run.partial_merge!r} is not arrived or all")
    _need(s.run.deadline_steps in ("fixed", "fit"), "run.deadline_steps",
          f"{s.run.deadline_steps!r} is not fixed or fit")
    _need(s.run.round_deadline >= 0, "run.round_deadline", f"must be >= 0 (0: none), got {s.run.round_deadline!r}")
    if s.run.fault:
        kind, *rest = str(s.run.fault).split(":")
        slow = kind.startswith("slow") and _is_number(kind[4:]) and 0 < float(kind[4:]) < math.inf
        who = rest[0] if rest else ""
        _need((kind in ("raise", "nan", "shape", "hang") or slow) and len(rest) == 2
              and (who.isdigit() or slow and who.startswith("node") and who[4:].isdigit())
              and (rest[1].isdigit() or slow and rest[1] == "*"),
              "run.fault", f"{s.run.fault!r} is not KIND:HEAD:ROUND with KIND raise|nan|shape|hang|slow<factor> "
              "(slow may take HEAD node<partition-id> and ROUND *)")
        _need(not who.isdigit() or int(who) < s.heads, "run.fault",
              f"head {who} does not exist (heads 0..{s.heads - 1}): the fault would never happen")
        _need(not rest[1].isdigit() or int(rest[1]) >= 1, "run.fault", "rounds count from 1: round 0 never happens")
    if s.data.name == "imagefolder":
        _need(bool(s.data.root), "data.root", "data.name=imagefolder needs data.root=<folder with one subfolder per class>")
    return s
