"""Training data: find documents, tokenize them, split off validation, pack into fixed-length rows.

Design choices:
- The built-in corpus is the Python standard library's own ``.py`` sources, found at run time under
  ``sysconfig.get_paths()["stdlib"]`` (``site-packages`` excluded): it exists on every machine, needs no
  download, and is a few tens of MB of real code.
- User data: ``.jsonl`` files give one document per line (its ``"text"`` field); any other file is one document;
  a directory is searched recursively for files with a text suffix.
- Each document is ``[BOS] bytes... [EOS]`` (byte-level tokenizer). Documents are concatenated and cut into rows of
  ``seq_len`` tokens; a document may continue into the next row. ``position_ids`` restart at 0 at every BOS and
  at every row start, so the model never attends across a document boundary and never predicts a BOS.
- Validation is a deterministic set of whole documents, chosen by a hash of the document's name (independent of
  file order and of the corpus size); a single-document corpus is split by bytes instead.
- Order: documents are shuffled once with the seed, the rows then reshuffled every epoch with (seed, epoch).
  The whole position in the stream is the number of rows consumed, so resuming needs just that integer.
"""

from __future__ import annotations

import json
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from kimi_linear.errors import UserError

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".jsonl", ".json", ".c", ".h", ".js", ".html", ".csv", ".tex")


@dataclass
class Document:
    name: str
    text: str


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _is_installed_package(path: Path) -> bool:
    return any(part in ("site-packages", "dist-packages") for part in path.parts)


def stdlib_documents() -> list[Document]:
    """Every ``.py`` file of the running Python's standard library, sorted by relative path."""
    root = stdlib_root()
    files = sorted(p for p in root.rglob("*.py") if p.is_file() and not _is_installed_package(p.relative_to(root)))
    docs = [Document(str(p.relative_to(root)), p.read_bytes().decode("utf-8", errors="replace")) for p in files]
    return [d for d in docs if d.text]


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8", errors="replace")
    except OSError as e:
        raise UserError(f"cannot read data file {path}: {e.strerror or e}") from e


def _jsonl_documents(path: Path) -> list[Document]:
    docs = []
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise UserError(f"{path}:{lineno}: each JSONL line must be an object with a string \"text\" field")
        if record["text"]:
            docs.append(Document(f"{path}:{lineno}", record["text"]))
    return docs


def _file_documents(path: Path) -> list[Document]:
    if path.suffix == ".jsonl":
        return _jsonl_documents(path)
    text = _read_text(path)
    return [Document(str(path), text)] if text else []


def load_documents(paths: list[str] | None) -> list[Document]:
    """Documents of the given files / directories, or the built-in stdlib corpus when ``paths`` is empty."""
    if not paths:
        docs = stdlib_documents()
        if not docs:
            raise UserError(f"the built-in corpus is empty: no .py files under {stdlib_root()}")
        return docs
    docs: list[Document] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
            if not files:
                raise UserError(f"data directory {path} holds no text files ({', '.join(TEXT_SUFFIXES)})")
            for f in files:
                docs.extend(_file_documents(f))
        elif path.is_file():
            docs.extend(_file_documents(path))
        elif path.exists():
            raise UserError(f"data path {path} is neither a file nor a directory")
        else:
            raise UserError(f"data path {path} does not exist")
    if not docs:
        raise UserError(f"the data in {', '.join(paths)} holds no text: every document is empty")
    return docs


def split_documents(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """Deterministic (train, val) split: the ``val_fraction`` of documents with the smallest name hashes, at
    least one; a lone document gives its last ``val_fraction`` of characters instead."""
    if len(docs) == 1:
        text = docs[0].text
        cut = min(len(text) - 1, max(1, round(len(text) * (1 - val_fraction))))
        if cut < 1:
            raise UserError("the corpus is a single document too short to split into train and validation")
        return [Document(docs[0].name, text[:cut])], [Document(docs[0].name + "#val", text[cut:])]
    order = sorted(range(len(docs)), key=lambda i: (zlib.crc32(docs[i].name.encode()), i))
    n_val = max(1, round(len(docs) * val_fraction))
    val_ids = set(order[:n_val])
    train = [d for i, d in enumerate(docs) if i not in val_ids]
    val = [d for i, d in enumerate(docs) if i in val_ids]
    return train, val


def tokenize_documents(docs: list[Document], tokenizer) -> torch.Tensor:
    """One stream ``[BOS] doc [EOS] [BOS] doc [EOS] ...`` as an int32 tensor (documents in the given order)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pieces = [torch.tensor([bos, *tokenizer.encode(d.text), eos], dtype=torch.int32) for d in docs]
    return torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.int32)


def position_ids(rows: torch.Tensor, bos_token_id: int) -> torch.Tensor:
    """``[B, T]`` positions restarting at 0 at every BOS and at every row start."""
    B, T = rows.shape
    t = torch.arange(T, device=rows.device).expand(B, T)
    starts = rows == bos_token_id
    starts[:, 0] = True
    segment_start = torch.where(starts, t, torch.zeros_like(t)).cummax(dim=1).values
    return t - segment_start


def unigram_bits_per_token(train: torch.Tensor, val_rows: torch.Tensor, vocab_size: int, bos_token_id: int) -> float:
    """Cross-entropy (bits) on the validation targets of an add-one-smoothed unigram model of the training stream:
    the baseline a language model must beat. Targets are what the model predicts: every token but a row's first
    and each BOS."""
    counts = torch.bincount(train.long(), minlength=vocab_size).double() + 1.0
    log_p = (counts / counts.sum()).log2()
    targets = val_rows[:, 1:].reshape(-1).long()
    targets = targets[targets != bos_token_id]
    return float(-log_p[targets].mean())


class PackedData:
    """Training rows ``[N, T]`` and validation rows ``[M, T]`` of the packed token streams.

    ``train_batch(step, rank, world)`` returns this rank's ``rows_per_rank`` rows of global batch ``step``:
    global batch ``step`` is rows ``[step * B, (step + 1) * B)`` of the epoch's permutation of the training rows,
    and rank r takes every world-th of them.
    """

    def __init__(self, train: torch.Tensor, val: torch.Tensor, seq_len: int, batch_size: int, seed: int,
                 bos_token_id: int, max_val_rows: int, documents: tuple[int, int] = (0, 0)) -> None:
        if seq_len < 2:
            raise UserError(f"sequence length must be at least 2, got {seq_len}")
        if batch_size < 1:
            raise UserError(f"batch size must be at least 1, got {batch_size}")
        n_train = train.numel() // seq_len
        if n_train < batch_size:
            raise UserError(
                f"the batch ({batch_size} rows of {seq_len} tokens) is larger than the training data "
                f"({train.numel()} tokens = {n_train} rows): use a smaller --batch-size or --seq-len, or more data"
            )
        n_val = min(val.numel() // seq_len, max_val_rows)
        if n_val < 1:
            raise UserError(
                f"the validation split ({val.numel()} tokens) is shorter than one row of {seq_len} tokens: "
                "use a smaller --seq-len, a larger --val-fraction, or more data"
            )
        self.train_tokens, self.val_tokens = train, val
        self.documents = documents  # (training, validation) document counts, for the run's description
        self.train_rows = train[: n_train * seq_len].view(n_train, seq_len)
        self.val_rows = val[: n_val * seq_len].view(n_val, seq_len)
        self.seq_len, self.batch_size, self.seed, self.bos_token_id = seq_len, batch_size, seed, bos_token_id
        self.batches_per_epoch = n_train // batch_size
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.train_rows.size(0), generator=gen)
        return self._perm

    def train_batch(self, step: int, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, position_ids), each ``[batch_size // world, T]`` long, for global batch ``step``."""
        epoch, index = divmod(step, self.batches_per_epoch)
        perm = self._permutation(epoch)
        ids = perm[index * self.batch_size:(index + 1) * self.batch_size][rank::world]
        rows = self.train_rows[ids].long()
        return rows, position_ids(rows, self.bos_token_id)

    def val_batches(self, rows_per_batch: int, rank: int = 0, world: int = 1):
        """Yield this rank's (input_ids, position_ids) validation batches; ranks take interleaved rows."""
        mine = self.val_rows[rank::world].long()
        for i in range(0, mine.size(0), rows_per_batch):
            rows = mine[i:i + rows_per_batch]
            yield rows, position_ids(rows, self.bos_token_id)


def shuffled(docs: list[Document], seed: int) -> list[Document]:
    gen = torch.Generator().manual_seed(seed)
    return [docs[i] for i in torch.randperm(len(docs), generator=gen).tolist()]


def prepare_data(paths: list[str] | None, tokenizer, seq_len: int, batch_size: int, seed: int,
                 val_fraction: float, max_val_rows: int) -> PackedData:
    """Load, split, tokenize and pack: the whole data pipeline in one call."""
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"validation fraction must be in (0, 1), got {val_fraction}")
    train_docs, val_docs = split_documents(load_documents(paths), val_fraction)
    train = tokenize_documents(shuffled(train_docs, seed), tokenizer)
    val = tokenize_documents(val_docs, tokenizer)
    return PackedData(train, val, seq_len, batch_size, seed, tokenizer.bos_token_id, max_val_rows,
                      documents=(len(train_docs), len(val_docs)))


def describe_source(paths: list[str] | None) -> str:
    """The data source in words, for the line a run prints before training."""
    if not paths:
        return f"the Python standard library's .py sources ({stdlib_root()})"
    return ", ".join(paths)

