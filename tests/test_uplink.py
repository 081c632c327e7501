"""The compressed uplink (comm.up, lte_fed/uplink.py): error feedback loses only the last
residual, int8's per-block error bound, malformed compressed replies refused by the reply gate,
and the fused engine's merge through the uplink (resume included)."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from lte_fed import protocol as P
from lte_fed import uplink as U
from lte_fed.engine import FusedRun, run_fused
from lte_fed.rundir import RunDir

from .helpers import max_abs_diff, model_of, quick_spec

SHAPES = {"l.lora_A": (4, 300), "l.lora_B": (37, 4), "norm.weight": (64,)}


def _states(k: int) -> list[dict[str, torch.Tensor]]:
    """k + 1 successive head states of a random walk (seeded), steps of mixed sizes."""
    g = torch.Generator().manual_seed(0)
    x = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    out = [x]
    for t in range(k):
        x = {n: v + torch.randn(v.shape, generator=g) * 10.0 ** -(t % 4) for n, v in x.items()}
        out.append(x)
    return out


@pytest.mark.parametrize("fmt", ["fp16", "int8"])
def test_error_feedback_sends_the_sum_of_the_changes_up_to_the_last_residual(fmt):
    states, resid = _states(8), {}
    layout = {n: (s, torch.float32) for n, s in SHAPES.items()}
    sent = {n: torch.zeros(s, dtype=torch.float64) for n, s in SHAPES.items()}
    for start, end in zip(states, states[1:]):
        wire, resid = U.ef_step(end, start, resid, fmt)
        assert {k: (tuple(t.shape), t.dtype) for k, t in wire.items()} == U.wire_layout(layout, fmt)
        for n, t in U.decode(wire, fmt, layout).items():
            sent[n] += t.double()
    for n in SHAPES:
        total = states[-1][n].double() - states[0][n].double()
        assert torch.allclose(sent[n] + resid[n].double(), total, atol=1e-5), n
        assert resid[n].abs().max() > 0  # something was left over: the property is not vacuous
    # ... and without the feedback the error would have piled up instead
    lost = {n: torch.zeros(s, dtype=torch.float64) for n, s in SHAPES.items()}
    for start, end in zip(states, states[1:]):
        wire, _ = U.ef_step(end, start, {}, fmt)
        for n, t in U.decode(wire, fmt, layout).items():
            lost[n] += t.double() - (end[n].double() - start[n].double())
    assert any(lost[n].abs().max() > resid[n].abs().max() for n in SHAPES)


def test_int8_error_is_at_most_half_a_step_per_block():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(3)) * torch.logspace(-4, 1, 1000)
    parts = U.encode_tensor(x, "int8")
    assert parts["q"].dtype == torch.int8 and parts["scale"].shape == (-(-1000 // U.BLOCK),)
    err = (U.decode_tensor(parts, "int8", (1000,)) - x).abs()
    step = parts["scale"].repeat_interleave(U.BLOCK)[:1000]
    assert (err <= step / 2 + 1e-12).all()
    assert U.payload_bytes({"x": ((1000,), torch.float32), "y": ((5,), torch.float32)}, "int8") == 1005 + 4 * 9


def _reply(wire: dict[str, torch.Tensor], head: int = 0) -> RecordDict:
    return RecordDict({P.HEAD: ArrayRecord(P.wire(wire)), P.METRICS: MetricRecord({"head": head, "train_loss": 1.0})})


@pytest.mark.parametrize("fmt, tamper, reason", [
    ("int8", lambda w: w.pop("scale"), "missing"),
    ("int8", lambda w: w.update({"q": w["q"].to(torch.int16)}), "dtype"),
    ("int8", lambda w: w.update({"scale": w["scale"][:-1]}), "shape"),
    ("int8", lambda w: w.update({"scale": torch.full_like(w["scale"], float("nan"))}), "non-finite"),
    ("int8", lambda w: w.update({"l.lora_A": torch.zeros(4, 300)}), "unexpected"),
    ("fp16", lambda w: w.update({"delta": w["delta"].float()}), "dtype"),
    ("fp16", lambda w: w.update({"delta": w["delta"][1:]}), "shape"),
])
def test_a_malformed_compressed_reply_is_refused_with_its_reason(fmt, tamper, reason):
    states = _states(1)
    layout = {n: (s, torch.float32) for n, s in SHAPES.items()}
    wire, _ = U.ef_step(states[1], states[0], {}, fmt)
    assert P.screen_reply(_reply(wire), U.wire_layout(layout, fmt), 0).reason is None
    tamper(wire)
    verdict = P.screen_reply(_reply(wire), U.wire_layout(layout, fmt), 0)
    assert verdict.state is None and reason in verdict.reason, verdict.reason


@pytest.mark.parametrize("up", ["fp16", "int8"])
def test_fused_engine_merges_through_the_uplink_and_resumes_exactly(tmp_path, up):
    # one merge: compressed, and close to fp32 (over many steps the runs drift apart as any two do)
    run_fused(quick_spec(train={"steps": 3}, comm={"up": up}), tmp_path / "one")
    run_fused(quick_spec(train={"steps": 3}), tmp_path / "fp32")
    diff = max_abs_diff(model_of(tmp_path / "one"), model_of(tmp_path / "fp32"))
    assert 0 < diff < (2e-3 if up == "int8" else 1e-4), diff
    rows, fp32_rows = RunDir(tmp_path / "one").read_metrics(), RunDir(tmp_path / "fp32").read_metrics()
    assert rows[0]["bytes_up"] < fp32_rows[0]["bytes_up"] * (0.27 if up == "int8" else 0.51)
    kw = {"train": {"steps": 12}, "comm": {"up": up}, "lte": {"outer": "nesterov"}}
    run_fused(quick_spec(**kw), tmp_path / "whole")
    assert FusedRun(quick_spec(**kw), tmp_path / "cut").run(stop_after_rounds=2) == {"stopped_at_round": 2}
    FusedRun(quick_spec(**kw, run={"resume": str(tmp_path / "cut")}), tmp_path / "cut").run()
    assert max_abs_diff(model_of(tmp_path / "whole"), model_of(tmp_path / "cut")) == 0.0
