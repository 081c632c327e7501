"""Section 3: bytes up and down per round per client, from the real Flower Messages the LTE
strategy builds (`LTEStrategy.configure_train`) and the reply a client builds, measured with
`strategies.grid_utils.message_bytes`; FedAvg's messages built the way Flower's FedAvg and our
client build them; and the per-step communication volume of paper §4.5 (DDP all-reduce and
parameter-server variants) next to LTE's."""

from __future__ import annotations

import tempfile

import torch

from .common import Timer, default_spec_dict

MODELS = {  # name -> (model, img, classes); ViT-S/B at the paper's ImageNet setting (224 px, patch 32)
    "digits": ("vit_digits", 8, 10),
    "vit_small": ("vit_small", 224, 1000),
    "vit_base": ("vit_base", 224, 1000),
}


def _fake_grid(nodes: list[int]):
    class G:
        def get_node_ids(self):
            return list(nodes)

    return G()


def lte_messages(spec, plain, img_size: int, tmp: str) -> dict:
    """One round's real messages for `spec`: per-client down, and up as the client replies."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    from lte_fed import protocol as P
    from lte_fed.job import Job, lte_config
    from lte_fed.lte import HeadLTE
    from lte_fed.placement import NodeInfo
    from strategies.grid_utils import message_bytes
    from strategies.lte_strategy import LTEStrategy

    job = Job(spec, None, img_size, plain, torch.device("cpu"))
    st = LTEStrategy(spec, job, tmp)
    nodes = [100 + n for n in range(spec.lte.heads)]
    for n, node in enumerate(nodes):  # one head per node: the bytes of one client
        st.partitions.add(NodeInfo(node, n, heads=1))
    with Timer() as t_cfg:
        msgs = list(st.configure_train(1, None, ConfigRecord(), _fake_grid(nodes)))
    head = HeadLTE(plain, lte_config(spec), 0)
    # A trained head: every tensor distinct and non-zero (Flower stores arrays content-addressed,
    # so the all-zero B and biases of a fresh head would be counted once and undercount).
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in head.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 1e-3)
    metrics = {"head": 0, "partition": 0, "train_loss": 1.0, "steps": spec.merge_every, "num-examples": 1}
    payload_up = sum(t.numel() * t.element_size() for t in head.head_state().values())
    # The reply as the ClientApp builds it for each comm.up (clients/client_app.py
    # `_uplink_payload`): fp32 the head packed into one array, fp16/int8 the round's change (here:
    # from the fresh head) with error feedback (lte_fed/uplink.py)
    from clients.client_app import _uplink_payload

    fresh = HeadLTE(plain, lte_config(spec), 0).head_state()
    up = {}
    for fmt in ("fp32", "fp16", "int8"):
        wire, _ = _uplink_payload(fmt, head.head_state(), fresh, {})
        up[fmt] = message_bytes(Message(RecordDict({P.head_record(0): ArrayRecord(P.wire(wire)),
                                                    P.metrics_record(0): MetricRecord(metrics)}), reply_to=msgs[0]))
    base = st.quantized_base()
    return {"down": message_bytes(msgs[0]), "up": up["fp32"], "up_fp16": up["fp16"], "up_int8": up["int8"],
            "configure_s": t_cfg.s,
            "payload_up": payload_up, "payload_base": sum(t.numel() * t.element_size() for t in base.values()),
            "m_lte_params": sum(t.numel() for t in head.head_state().values()),
            "base_params": sum(w.numel() for w in st.W.values())}


def fedavg_messages(spec, plain) -> dict:
    from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

    from lte_fed import protocol as P
    from strategies.grid_utils import message_bytes

    arrays = ArrayRecord(P.wire(plain.state_dict()))
    down = Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1, "spec": P.spec_to_json(spec.to_dict())})}),
                   dst_node_id=100, message_type=MessageType.TRAIN)
    up = Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"train_loss": 1.0, "num-examples": 1})}), reply_to=down)
    return {"down": message_bytes(down), "up": message_bytes(up), "params": sum(p.numel() for p in plain.parameters())}


def comm_volume(M: float, M_lte: float, qM: float, N: int, T: int) -> dict:
    """Paper §4.5, bytes per training step (all devices together)."""
    return {
        "ddp_allreduce": N * (N - 1) * M,  # gradients every step
        "lte_allreduce": N * (N - 1) * M_lte / T,  # the paper writes M; only the heads (M_lte) are exchanged
        "lte_allreduce_paper_M": N * (N - 1) * M / T,
        "ddp_ps": 2 * (N - 1) * M,
        "lte_ps": ((N - 1) * M_lte + (N - 1) * qM) / T,
    }


def main(a) -> dict:
    from flwr.supercore.task_identity import TaskIdentity

    from lte_fed.job import setup
    from lte_fed.models import build_model
    from lte_fed.spec import Spec

    # Outside a Flower run, Messages need a run id to be built; any value does.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    models = ["digits"] if a.quick else list(MODELS)
    out = {"lte": {}, "fedavg": {}, "volume": {}, "notes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for key in models:
            name, img, classes = MODELS[key]
            if key == "digits":
                base = default_spec_dict(["run.engine=flower", "run.progress=false", "lte.heads=2"])
                spec = Spec.from_dict(base)
                plain = setup(spec).plain
            else:
                base = default_spec_dict(["run.engine=flower", "run.progress=false", "lte.heads=2", "lte.rank=64",
                                          f"model.name={name}", f"model.img_size={img}"])
                spec = Spec.from_dict(base)
                plain = build_model(name, num_classes=classes, img_size=img, in_chans=3, seed=0)
            out["notes"][key] = {"model": name, "img_size": img, "classes": classes, "rank": spec.lte.rank,
                                 "T": spec.merge_every}
            out["lte"][key] = {}
            for q in ("nf4", "nf4-dq", "int8", "none"):
                s = Spec.from_dict(base | {"quant": {"base": q}})
                out["lte"][key][q] = lte_messages(s, plain, img, f"{tmp}/{key}-{q}")
            out["fedavg"][key] = fedavg_messages(spec, plain)
            fp32 = 4 * out["fedavg"][key]["params"]
            lte = out["lte"][key]["nf4"]
            for N, T in ((8, spec.merge_every), (32, spec.merge_every)):
                out["volume"][f"{key}/N={N}/T={T}"] = comm_volume(fp32, lte["payload_up"], lte["payload_base"], N, T) | {
                    "M": fp32, "M_lte": lte["payload_up"], "qM": lte["payload_base"], "N": N, "T": T}
            del plain
    return out
