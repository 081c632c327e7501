"""The results markdown of `make bench`, from the JSON the sections wrote."""

from __future__ import annotations

from .common import fmt

MiB = 2**20


def _b(n: float) -> str:
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= k:
            return f"{n / k:.3g} {unit}"
    return f"{n:.0f} B"


def _r(s: dict) -> str:
    return "n/a" if not s or not s.get("n") else f"{s['median']:.2f}× [{s['q1']:.2f}–{s['q3']:.2f}]"


def _ok(value: float | None, target: float) -> str:
    return "n/a" if value is None else ("meets" if value <= target else "misses")


def step_md(d: dict) -> list[str]:
    c = d["config"]
    L = [f"## 1. Step cost (fused engine vs full, N one-head models, floor)", "",
         f"{c['model']} (384/1536, 12 blocks), img {c['img_size']} patch {c['patch_size']} → {c['tokens']} tokens, "
         f"N={c['heads']} heads, r={c['rank']}, alpha={c['alpha']:g}, cumulative batch {c['batch']} "
         f"({c['batch'] // c['heads']} per head), device {c['device']}; {c['reps']} repetitions, all variants "
         "stepped round-robin in each. Median [IQR] in ms per step (a step = every head once).", "",
         "| variant | what | ms/step |", "|---|---|---|"]
    what = d.get("what", {})
    for k, s in d["step_s"].items():
        L.append(f"| {k} | {what.get(k, '')} | {fmt(s, 'ms')} |")
    r = d["ratios"]
    cr = d.get("cpu_ratios") or {}
    L += ["", "Ratios (pair by pair, same repetition), median [IQR] and min–max, of wall time and (CPU) of "
          "the process's CPU time, which waiting for a core on a loaded machine does not inflate:", "",
          "| ratio | wall | min–max | CPU time | target | |", "|---|---|---|---|---|---|"]
    targets = d.get("targets", {})
    for k, s in r.items():
        t = targets.get(k)
        L.append(f"| {k} | {_r(s)} | {s['min']:.2f}–{s['max']:.2f} | {_r(cr.get(k, {}))} | "
                 f"{'≤ %.2f×' % t if t else ''} | {_ok(s.get('median'), t) if t else ''} |")
    if d.get("flops"):
        f = d["flops"]
        L += ["", "Matmul FLOPs of the Linear layers per token relative to full training (forward, input "
              "gradient and weight gradient, 3·m·n per layer): " + ", ".join(f"{k} {v:.2f}×" for k, v in f.items())
              + ". The LoRA path costs r·(m+n) per matmul against m·n for the base, three times over (forward, "
              "input grad, factors' grads); the exact variant's V costs twice more when applied to the tokens, "
              "nothing per step when folded into per-head bases (the fused engine's default)."]
    if d.get("profile"):
        L += ["", "Profile of one step (torch.profiler, self time, top ops):", ""]
        for k, rows in d["profile"].items():
            L.append(f"- **{k}**: " + ", ".join(f"{x['op']} {100 * x['share']:.0f}% ({x['calls']})" for x in rows[:8]))
    return L + [""]


def layers_md(d: dict) -> list[str]:
    c = d["config"]
    L = ["## 1b. One layer's cost (one thread, CPU time)", "",
         f"Forward + backward of one Linear at ViT-S shapes, {c['tokens_per_head']} tokens per head, N={c['heads']}, "
         f"r={c['rank']}, one thread, median over repetitions, per head (stacked layers: time / N). "
         "Ratios to full training's layer (weight gradient included) and to the stacked exact layer:", "",
         "| layer (out×in) | " + " | ".join(next(iter(d["layers"].values()))["ms_per_head"]) + " |",
         "|---|" + "---|" * len(next(iter(d["layers"].values()))["ms_per_head"])]
    for shape, r in d["layers"].items():
        L.append(f"| {shape} ms | " + " | ".join(f"{v:.1f}" for v in r["ms_per_head"].values()) + " |")
        L.append(f"| {shape} / full | " + " | ".join(f"{v:.2f}" for v in r["vs_full"].values()) + " |")
        L.append(f"| {shape} / stacked exact | " + " | ".join(f"{v:.2f}" for v in r["vs_stacked_exact"].values()) + " |")
    if d.get("quantize"):
        L += ["", "Quantizing one layer's W (what the server does for every round's message, "
              "`lte_fed.quant.quantize`) against bitsandbytes' `quantize_4bit`, the same bytes; one thread, "
              "alternating, median:", "", "| format, layer | ours ms | bitsandbytes ms | ratio (pairs) |", "|---|---|---|---|"]
        L += [f"| {k} | {v['ours_ms']:.1f} | {v['bitsandbytes_ms']:.1f} | {v['ratio']:.2f} |" for k, v in d["quantize"].items()]
    return L + [""]


def bytes_md(d: dict) -> list[str]:
    L = ["## 3. Bytes per round per client (real Flower Messages) and §4.5 volumes", "",
         "Down = the TRAIN message `LTEStrategy.configure_train` builds for one client (q(W) + replicas + config); "
         "up = the reply a client builds (its head's A, B + replicas + metrics); FedAvg: the plain model's "
         "arrays each way. Bytes are `message_bytes` (every nested object as serialized for transport).", "",
         "LTE up is per `comm.up` (fp16 / int8: the round's change, lte_fed/uplink.py).", "",
         "nf4-dq: the NF4 base with its block scales double-quantized (`quant.base=nf4-dq`, lte_fed/quant.py).", "",
         "| model | rank | LTE nf4 down | LTE nf4-dq down | LTE int8 down | LTE none down | LTE up fp32 / fp16 / int8 "
         "| FedAvg down | FedAvg up | LTE nf4 down + fp32 up / FedAvg | nf4 down + int8 up / FedAvg "
         "| nf4-dq down + int8 up / FedAvg |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, q in d["lte"].items():
        fa = d["fedavg"][key]
        fedavg = fa["down"] + fa["up"]
        dq = q.get("nf4-dq")  # absent in results from before the format existed
        dq_down, dq_ratio = (_b(dq["down"]), f"{(dq['down'] + dq['up_int8']) / fedavg:.3f}") if dq else ("-", "-")
        n = d["notes"][key]
        L.append(f"| {key} ({n['model']}, {n['img_size']} px) | {n['rank']} | {_b(q['nf4']['down'])} | "
                 f"{dq_down} | {_b(q['int8']['down'])} | "
                 f"{_b(q['none']['down'])} | {_b(q['nf4']['up'])} / {_b(q['nf4']['up_fp16'])} / {_b(q['nf4']['up_int8'])} | "
                 f"{_b(fa['down'])} | {_b(fa['up'])} | {(q['nf4']['down'] + q['nf4']['up']) / fedavg:.3f} | "
                 f"{(q['nf4']['down'] + q['nf4']['up_int8']) / fedavg:.3f} | "
                 f"{dq_ratio} |")
    L += ["", "Per step over all devices, paper §4.5 (M = fp32 model, M_lte = one head's trainable tensors, "
          "qM = NF4 base; LTE communicates every T steps). The paper writes LTE's all-reduce with M; only the "
          "heads travel, so `lte all-reduce` uses M_lte (the M form is in the JSON):", "",
          "| model / N / T | M | M_lte | qM | DDP all-reduce N(N-1)M | LTE all-reduce N(N-1)M_lte/T | DDP param. server 2(N-1)M | LTE param. server ((N-1)M_lte+(N-1)qM)/T |",
          "|---|---|---|---|---|---|---|---|"]
    for k, v in d["volume"].items():
        L.append(f"| {k} | {_b(v['M'])} | {_b(v['M_lte'])} | {_b(v['qM'])} | {_b(v['ddp_allreduce'])} | "
                 f"{_b(v['lte_allreduce'])} | {_b(v['ddp_ps'])} | {_b(v['lte_ps'])} |")
    return L + [""]


def flower_md(d: dict) -> list[str]:
    L = ["## 2. Flower overhead per round (run.engine=flower vs fused)", "",
         "Default digits job (conf/: vit_digits, N=4, batch 64, rank/alpha/lr defaults), fewer steps; per-round "
         "wall time from each run's metrics rows (excludes the server's evaluation in both engines), round 1 "
         "left out (workers build data and models). Median [IQR] over the remaining rounds, seconds.", "",
         "| T | N | rounds timed | fused s/round | flower s/round | flower / fused | overhead (flower − fused) / fused | whole flower run incl. start-up |",
         "|---|---|---|---|---|---|---|---|"]
    for r in d["t_sweep"]:
        L.append(f"| {r['T']} | {r['heads']} | {r['flower_round_s']['n']} | {fmt(r['fused_round_s'])} | "
                 f"{fmt(r['flower_round_s'])} | {r['flower_over_fused']:.2f}× | {100 * r['overhead_ratio']:.0f}% | {r['flower_run_s']:.0f} s |")
    L += ["", "Parts of one Flower round (T, N=4), each timed separately with the function the round calls, "
          "median seconds. `configure` = quantize + build the N TRAIN messages + count their bytes; "
          "`serialize` = `message_bytes` of one message; client parts run with the worker's thread count; "
          "`predicted` = configure + (load + train) of the busiest node (its k = ceil(N / nodes) heads "
          "stacked) + nodes × serialize_up + merge, with run.nodes at its default (the workers Ray runs at "
          "once); `residual` = measured flower round − predicted = transfer, Ray scheduling and the "
          "server's polling.", "",
          "| T | quantize | configure | serialize down | client load | client train (T steps) | serialize up | merge | evaluate | nodes × heads | predicted | measured | residual |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in d["parts"]:
        m = {k: v["median"] for k, v in p["parts_s"].items()}
        L.append(f"| {p['T']} | {m['quantize']:.4f} | {m['configure']:.3f} | {m['serialize_down']:.4f} | {m['client_load']:.4f} | "
                 f"{m['client_train']:.3f} | {m['serialize_up']:.4f} | {m['merge']:.4f} | {m['evaluate']:.3f} | {p['workers']} × {p.get('heads_per_node', 1)} | "
                 f"{p['predicted_round_s']:.3f} | {p['flower_round_s']:.3f} | {p['orchestration_residual_s']:.3f} |")
    L += ["", "## 6. Scaling: time per round as N grows (T=10, cumulative batch fixed)", "",
          "Flower with run.nodes at its default (as many nodes as Ray runs at once, each training its "
          "share of the N heads stacked on one q(W)).", "",
          "| N | per-head batch | fused s/round | flower s/round | flower / fused |", "|---|---|---|---|---|"]
    for r in d["n_sweep"]:
        L.append(f"| {r['heads']} | {64 // r['heads']} | {fmt(r['fused_round_s'])} | {fmt(r['flower_round_s'])} | {r['flower_over_fused']:.2f}× |")
    if d.get("floor"):
        L += ["", "Flower's own floor: the no-op app in benchmarks/flower_floor (every node replies at once), same "
              "launcher, SuperLink and polling; what no change of ours can take off a round.", "",
              "| nodes | reply | round s |", "|---|---|---|"]
        for f in d["floor"]:
            L.append(f"| {f['nodes']} | {f['arrays']} × {f['values']} float32 | {fmt(f['round_s'])} |")
    return L + [""]


def deploy_md(d: dict) -> list[str]:
    j, floor = d["job"], d["floor_median_s"]
    L = ["## 4. A real deployment next to the simulation and fused engines (benchmarks/deployment.py)", "",
         f"{j['model.name']} at {j['model.img_size']} px (patch {j['model.patch_size']}), NF4 base, rank {j['lte.rank']}, "
         f"{d['nodes']} heads of {j['train.batch_size'] // j['lte.heads']} samples, T={j['lte.merge_every']}, CPU. "
         "Deployment: SuperLink + one SuperNode per head on loopback (TLS, node auth), started and stopped by the "
         "benchmark. Seconds per round (the server's wall time, configure -> aggregate); client columns are the worst "
         "head's reply metrics (lte_fed/costs.py): `start` = process start -> handler (interpreter, Flower's own "
         "per-message work, imports), then the job's libraries (libs), data, model, train, reply. overhead = round - "
         "slowest training.", "",
         f"Floor (`python -c \"import torch, flwr.clientapp\"`, this run, median of {len(d['floor_s'])}): "
         f"**{floor:.2f} s**.", "",
         "| engine | round | round s | train s | overhead s | overhead / floor | start | imports | libs | data | model | reply "
         "| peak RSS MiB | peak before the job's work |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in ("deployment", "simulation", "fused"):
        for r in d[name]:
            train = r.get("client_train_s")
            over = r["round_s"] - train if train is not None else None
            cells = [f"{r[k]:.2f}" if k in r else "—" for k in ("client_start_s", "client_imports_s", "client_libs_s",
                                                               "client_data_s", "client_model_s", "client_reply_s")]
            L.append(f"| {name} | {r['round']} | {r['round_s']:.2f} | {'—' if train is None else f'{train:.2f}'} | "
                     f"{'—' if over is None else f'{over:.2f}'} | {'—' if over is None else f'{over / floor:.2f}'} | "
                     + " | ".join(cells) + f" | {r.get('client_rss_peak_mib', '—')} | {r.get('client_rss_entry_mib', '—')} |")
    if d.get("flower_round_s"):
        flower = d["flower_round_median_s"]
        L += ["", f"Flower's own deployed round, the same deployment with the no-op app (benchmarks/flower_floor: "
              f"a fresh `flwr-clientapp` per message, as many bytes each way as the LTE job's last round, "
              f"median of {len(d['flower_round_s'])} rounds): **{flower:.2f} s** ({flower / floor:.2f}× the floor). "
              "The LTE job's overhead beyond it, per warm round: "
              + ", ".join(f"{o:.2f} s ({o / floor:.2f}× the floor)" for o in d["overhead_beyond_flower_s"]) + "."]
    m = d["memory"]
    L += ["", "Peak memory of one ClientApp process (VmHWM in its reply), above the import floor "
          f"(a process that imports the ClientApp and the job's libraries: {m['floor_mib']:.0f} MiB; the ClientApp "
          f"alone: {m['app_import_mib']:.0f} MiB), next to `lte-fed-memory`:", "",
          "| client | measured peak | above floor | estimate | measured / estimate |", "|---|---|---|---|---|",
          f"| LTE (NF4 + one head) | {m['lte_peak_mib']:.0f} MiB | {m['lte_above_floor_mib']:.0f} MiB | "
          f"{m['lte_mib']:.0f} MiB | {m['lte_vs_estimate']:.2f} |",
          f"| FedAvg (full AdamW) | {m['fedavg_peak_mib']:.0f} MiB | {m['fedavg_above_floor_mib']:.0f} MiB | "
          f"{m['full_mib']:.0f} MiB | {m['fedavg_above_floor_mib'] / m['full_mib']:.2f} |",
          "", f"LTE / FedAvg above the floor: **{m['lte_vs_fedavg']:.2f}**."]
    if m.get("idle_process_mib"):
        L += ["", f"A ClientApp process of the same deployment that only answered the server's QUERY (no job) "
              f"peaked at {m['idle_process_mib']:.0f} MiB, {m['flower_runtime_mib']:.0f} MiB above the ClientApp's "
              "import: Flower's own per-message runtime, which neither floor holds. Without it the LTE client's "
              f"job takes {m['lte_job_mib']:.0f} MiB, **{m['lte_job_vs_estimate']:.2f}×** the estimate."]
    return L + [""]


def accuracy_md(d: dict) -> list[str]:
    r0 = d["runs"][0]
    L = ["## 5. Accuracy per sample (digits, fused engine, defaults from conf/)", "",
         f"LTE: N={r0['lte']['heads']}, r={r0['lte']['rank']}, alpha={r0['lte']['alpha']}, T={r0['lte']['T']}, "
         f"lr={r0['lte']['lr']}, base {r0['lte']['quant']}; full: lr={r0['full']['lr']}; {r0['lte']['steps']} steps of "
         f"batch {r0['lte']['batch']}. Target = full training's final test accuracy of the same seed.", "",
         "| seed | full final acc | LTE final acc | LTE best acc | samples full needs to reach it | samples LTE needs | LTE / full |",
         "|---|---|---|---|---|---|---|"]
    for r in d["runs"]:
        ratio = f"{r['samples_ratio']:.2f}×" if r.get("samples_ratio") else "not reached"
        L.append(f"| {r['seed']} | {r['full']['final_acc']:.2f}% | {r['lte']['final_acc']:.2f}% | {r['lte']['best_acc']:.2f}% | "
                 f"{r['full_samples_to_target']} | {r['lte_samples_to_target'] or '—'} | {ratio} |")
    L += ["", f"LTE reached the target in {d['reached']} seeds; samples ratio {_r(d['samples_ratio'])}."]
    return L + [""]


def markdown(res: dict) -> str:
    e = res["env"]
    L = [f"# lte-fed benchmarks — {e['time'][:10]}", "",
         f"- command: `{res['command']}` (from the repository root){' — QUICK sizes (smoke test)' if res['quick'] else ''}",
         f"- device: {e['device']}{' — ' + e['cpu_model'] if e.get('cpu_model') else ''}, {e['cpu_count']} CPUs",
         f"- torch {e['torch']}, torch threads {e['torch_threads']}, flwr {e.get('flwr')}, python {e['python']}",
         f"- load average at start {tuple(round(x, 2) for x in e['loadavg'])}, at end "
         f"{tuple(round(x, 2) for x in res['env_end']['loadavg'])} (a shared machine: absolute times move with the "
         "load; ratios are taken within one repetition)",
         f"- total wall time {res['total_s'] / 60:.1f} min", ""]
    secs = res["sections"]
    for key, fn in (("step", step_md), ("layers", layers_md), ("flower", flower_md), ("bytes", bytes_md), ("deploy", deploy_md),
                    ("accuracy", accuracy_md)):
        if key not in secs:
            continue
        if "error" in secs[key]:
            L += [f"## {key}: FAILED ({secs[key]['error']})", ""]
            continue
        try:
            L += fn(secs[key])
        except Exception as err:  # a report bug must not lose the JSON
            L += [f"## {key}: could not render ({err!r}); see the JSON", ""]
        L.append(f"_(section took {secs[key].get('section_s', 0):.0f} s)_\n")
    return "\n".join(L) + "\n"
