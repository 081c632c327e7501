"""The config keys have ONE home, the Spec dataclasses: Hydra composes exactly their defaults,
Flower's pyproject table is them, LTEConfig's defaults are them; conf/ holds presets only. A
value of the wrong type, or a value no run can use, is refused with one message naming the key."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lte_fed.job import lte_config
from lte_fed.lte import LTEConfig
from lte_fed.spec import DEFAULT_LR, Spec, SpecError, flower_run_config, register_with_hydra, validate
from lte_fed.train import lr_at

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def composed(*overrides: str) -> dict:
    register_with_hydra()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return OmegaConf.to_container(compose("config", overrides=list(overrides)), resolve=True)


def test_hydra_composes_exactly_the_spec_defaults():
    assert composed() == Spec().to_dict()


@pytest.mark.parametrize("group", ["model", "data"])
def test_every_preset_composes_into_a_spec_and_sets_only_what_makes_it(group):
    defaults = Spec().to_dict()[group]
    for path in sorted((CONF / group).glob("*.yaml")):
        preset = yaml.safe_load(path.read_text())
        assert preset["name"] == path.stem
        assert set(preset) <= set(defaults), f"{path}: keys the spec does not have"
        spec = Spec.from_dict(composed(f"{group}={path.stem}"))
        got = getattr(spec, group)
        assert {k: getattr(got, k) for k in preset} == preset
        # Every key the preset leaves out keeps the spec's default: no second copy of defaults.
        assert {k: getattr(got, k) for k in defaults if k not in preset} == {k: v for k, v in defaults.items() if k not in preset}


def test_overrides_and_presets_still_compose():
    d = composed("model=vit_small", "data=cifar10", "lte.heads=4", "train.lr=0.01", "+experiment=ablation_cpu")
    spec = Spec.from_dict(d)
    # the experiment sets run.engine; the command line's presets and keys win over the experiment's
    assert (spec.model.name, spec.data.name, spec.train.lr, spec.run.engine) == ("vit_small", "cifar10", 0.01, "fused")
    assert (spec.model.img_size, spec.data.augment, spec.lte.heads) == (224, True, 4)


def test_pyproject_flower_table_is_the_spec_defaults():
    """`flwr run` takes its defaults from this table: it must be the spec's, key for key
    (scripts/write_flwr_config.py writes it)."""
    from strategies.server_app import spec_from_run_config

    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert table == flower_run_config(), "run: python scripts/write_flwr_config.py"
    assert spec_from_run_config(table) == Spec()


def test_lte_config_defaults_are_the_specs():
    assert lte_config(Spec()) == LTEConfig()


def test_null_lr_is_the_methods_default_and_a_given_lr_wins():
    for method in ("lte", "full"):
        assert Spec.from_dict({"method": method}).lr == DEFAULT_LR[method]
    assert Spec.from_dict({"train": {"lr": 0.01}}).lr == 0.01


@pytest.mark.parametrize("d, key", [
    ({"lte": {"heads": "abc"}}, "lte.heads: must be an integer"),
    ({"lte": {"heads": True}}, "lte.heads: must be an integer"),
    ({"lte": {"same_batch": "maybe"}}, "lte.same_batch: must be true or false"),
    ({"train": {"lr": "fast"}}, "train.lr: must be a finite number or null"),
    ({"train": {"lr": math.inf}}, "train.lr: must be a finite number or null"),
    ({"lte": {"alpha": math.inf}}, "lte.alpha: must be a finite number"),
    ({"lte": {"outer_lr": math.nan}}, "lte.outer_lr: must be a finite number"),
    ({"train": {"weight_decay": math.inf}}, "train.weight_decay: must be a finite number"),
    ({"run": {"seed": 2**32}}, "run.seed"),  # seeds are 32-bit: 2**32 would be seed 0
    ({"run": {"seed": -1}}, "run.seed"),
    ({"run": {"fleet": "memory-gb=nan"}}, "run.fleet"),
    ({"run": {"fleet": "memory-gb=inf"}}, "run.fleet"),
    ({"run": {"fleet": ";"}}, "run.fleet: node 0 is empty"),
    ({"run": {"fleet": "heads=2;"}}, "run.fleet: node 1 is empty"),
    ({"run": {"fleet": "rank=4; ;rank=2"}}, "run.fleet: node 1 is empty"),
    ({"model": {"img_size": 7.5}}, "model.img_size: must be an integer or null"),
    ({"run": {"fault": 3}}, "run.fault: must be a string or null"),
    ({"train": {"warmup": -1}}, "train.warmup"),
    ({"train": {"weight_decay": -0.1}}, "train.weight_decay"),
    ({"train": {"eval_batch": 0}}, "train.eval_batch"),
    ({"run": {"checkpoint_every": 0}}, "run.checkpoint_every"),
    ({"data": {"test_fraction": 1.0}}, "data.test_fraction"),
    ({"model": {"patch_size": 0}}, "model.patch_size"),
    ({"run": {"fault": "nan:node1:2"}}, "run.fault"),  # only a slow node is keyed by partition
    ({"run": {"fault": "slow5:nodeX:*"}}, "run.fault"),
    ({"run": {"fault": "slow5:node1"}}, "run.fault"),
    ({"run": {"fault": "hang:1:*"}}, "run.fault"),
    ({"run": {"fault": "slowinf:0:1"}}, "run.fault"),  # time.sleep(inf) would raise, not slow down
    ({"run": {"fault": "slow5:0:0"}}, "run.fault: rounds count from 1"),
    ({"run": {"fault": "raise:2:1"}}, "run.fault: head 2 does not exist"),  # the default lte.heads is 2
    # Flower's ServerApp ran method=full as one LoRA head of rank lte.rank, reported as "full"
    ({"method": "full", "run": {"engine": "flower"}}, "run.engine: method=full trains the whole model in one process"),
    ({"method": "mhlora", "run": {"engine": "flower"}}, "run.engine: method=mhlora"),
    ({"method": "fedavg", "run": {"engine": "fused"}}, "run.engine: method=fedavg"),
    ({"method": "fedavg", "run": {"engine": "flower", "nodes": 3}}, "run.nodes: 3 nodes for lte.heads=2: method=fedavg"),
    # a simulated fleet that cannot hold every head, or has more nodes than heads, failed after
    # Flower's start-up (or trained half the heads, exit 0); min_heads above the heads, after training
    ({"run": {"engine": "flower", "fleet": "heads=1;heads=1"}, "lte": {"heads": 4}}, "run.fleet: its nodes declare 2 head"),
    ({"run": {"engine": "flower", "fleet": "rank=4;rank=4;rank=4"}}, "run.fleet: has 3 nodes for 2 head"),
    ({"run": {"engine": "flower", "min_heads": 3}}, "run.min_heads: 3 is more than the run.s 2 head"),
    # keys the model would ignore
    ({"model": {"block_size": 16}}, "model.block_size: only language models"),
    ({"model": {"name": "gpt_tiny", "img_size": 32}, "data": {"name": "shakespeare", "partition": "contiguous"}}, "model.img_size: a language model"),
    ({"model": {"name": "gpt_tiny", "patch_size": 4}, "data": {"name": "shakespeare", "partition": "contiguous"}}, "model.patch_size: a language model"),
])
def test_a_bad_value_is_refused_naming_its_key(d, key):
    with pytest.raises(SpecError, match=f"^{key}"):
        validate(Spec.from_dict(d))


@pytest.mark.parametrize("fault", ["nan:1:2", "slow5:3:*", "slow0.5:node2:*", "slow5:node0:3"])
def test_the_fault_grammar_takes_heads_rounds_and_slow_nodes(fault):
    validate(Spec.from_dict({"lte": {"heads": 4}, "run": {"fault": fault}}))


def test_numbers_where_floats_are_expected_are_fine():
    validate(Spec.from_dict({"lte": {"alpha": 16}, "data": {"alpha": 1}, "run": {"round_timeout": 600}}))


@pytest.mark.parametrize("steps, warmup", [(6, 20), (1, 20), (6, 6), (900, 20), (5, 0)])
def test_any_warmup_gives_a_short_run_a_usable_schedule(steps, warmup):
    validate(Spec.from_dict({"train": {"steps": steps, "warmup": warmup}}))
    lrs = [lr_at(t, 1.0, warmup, steps) for t in range(steps)]
    assert all(0 < lr <= 1.0 and math.isfinite(lr) for lr in lrs[:-1] or lrs), lrs
    w = min(warmup, steps)
    assert lrs[:w] == sorted(lrs[:w]) and (w == 0 or lrs[w - 1] == 1.0)  # warms up to the peak
    if w < steps:
        assert lrs[w:] == sorted(lrs[w:], reverse=True)  # then decays


def test_a_rank_above_a_layers_dimensions_is_warned_about_naming_the_layers(caplog):
    from lte_fed.job import setup

    def warnings(**lte):
        caplog.clear()
        setup(Spec.from_dict({"model": {"name": "mixer_digits"}, "lte": lte, "run": {"engine": "fused"}}))
        return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]

    # mixer_digits: a 4-pixel patch embedding and 16-token mixing MLPs, every other layer wider
    warned = warnings(rank=64, alpha=128)
    assert len(warned) == 1 and "stem.proj.linear (4)" in warned[0] and "mlp_tokens.fc1 (16)" in warned[0]
    assert "rank 8 is above" in warnings(rank=8, alpha=16)[0] and "mlp_tokens" not in warnings(rank=8, alpha=16)[0]
    assert warnings(rank=4, alpha=8) == []


def test_a_patch_size_for_a_model_without_patches_is_refused():
    from lte_fed.models import build_model

    with pytest.raises(SpecError, match="^model.patch_size: 'mlp' does not cut images into patches"):
        build_model("mlp", num_classes=10, img_size=8, in_chans=1, patch_size=2)
