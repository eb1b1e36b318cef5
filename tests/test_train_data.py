"""Data pipeline: corpus discovery, splitting, packing with document boundaries, user-input errors."""

import json
import math

import pytest
import torch

from kimi_linear.errors import UserError
from kimi_linear.tokenizer import ByteTokenizer
from kimi_linear.train.data import (
    Document,
    PackedData,
    load_documents,
    position_ids,
    split_documents,
    stdlib_documents,
    tokenize_documents,
    unigram_bits_per_token,
)

BOS = ByteTokenizer.bos_token_id


def test_stdlib_corpus_is_found():
    docs = stdlib_documents()
    names = {d.name for d in docs}
    assert len(docs) > 100 and "os.py" in names
    assert not any("site-packages" in n for n in names)


def test_position_ids_restart_at_bos_and_row_start():
    rows = torch.tensor([[5, 6, BOS, 7, 8, BOS, 9], [BOS, 1, 2, 3, 4, 5, 6]])
    assert position_ids(rows, BOS).tolist() == [[0, 1, 0, 1, 2, 0, 1], [0, 1, 2, 3, 4, 5, 6]]


def test_tokenize_wraps_documents():
    stream = tokenize_documents([Document("a", "hi"), Document("b", "é")], ByteTokenizer())
    assert stream.tolist() == [BOS, 104, 105, 257, BOS, 0xC3, 0xA9, 257]


def test_split_is_deterministic_disjoint_and_order_independent():
    docs = [Document(f"doc{i}", f"text {i}") for i in range(200)]
    train, val = split_documents(docs, 0.05)
    assert len(val) == 10 and len(train) == 190
    assert not {d.name for d in train} & {d.name for d in val}
    _, val_reversed = split_documents(docs[::-1], 0.05)
    assert {d.name for d in val} == {d.name for d in val_reversed}
    lone_train, lone_val = split_documents([Document("one", "x" * 100)], 0.1)
    assert len(lone_train[0].text) == 90 and len(lone_val[0].text) == 10


def test_user_files_jsonl_and_directories(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text(json.dumps({"text": "beta"}) + "\n\n" + json.dumps({"text": "gamma"}))
    (tmp_path / "sub" / "skip.bin").write_bytes(b"\x00\x01")
    assert [d.text for d in load_documents([str(tmp_path)])] == ["alpha", "beta", "gamma"]
    assert [d.text for d in load_documents([str(tmp_path / "a.txt")])] == ["alpha"]


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.mkdir(), "holds no text files"),
        (lambda p: p.write_text(""), "every document is empty"),
    ],
)
def test_bad_data_paths(tmp_path, setup, message):
    path = tmp_path / "data.txt"
    setup(path)
    with pytest.raises(UserError, match=message):
        load_documents([str(path)])


def test_malformed_jsonl(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n{"content": "no text field"}\n')
    with pytest.raises(UserError, match=r"d.jsonl:2"):
        load_documents([str(path)])


def _packed(n_tokens=1000, seq_len=10, batch=4):
    stream = torch.arange(n_tokens, dtype=torch.int32) % 250
    return PackedData(stream, stream[:100], seq_len, batch, seed=0, bos_token_id=BOS, max_val_rows=5)


def test_batches_cover_epochs_and_split_across_ranks():
    data = _packed()
    assert data.batches_per_epoch == 25
    epoch = torch.cat([data.train_batch(s)[0] for s in range(25)])
    assert sorted(epoch[:, 0].tolist()) == sorted(data.train_rows[:, 0].long().tolist())
    assert not torch.equal(data.train_batch(0)[0], data.train_batch(25)[0])  # reshuffled next epoch
    whole = data.train_batch(3)[0]
    parts = [data.train_batch(3, rank=r, world=2)[0] for r in range(2)]
    assert torch.equal(torch.stack(parts, 1).reshape(4, -1), whole)
    assert torch.equal(_packed().train_batch(7)[0], data.train_batch(7)[0])  # a pure function of the step
    assert data.val_rows.shape == (5, 10)


def test_batch_larger_than_data():
    with pytest.raises(UserError, match="larger than the training data"):
        _packed(n_tokens=30, seq_len=10, batch=4)


def test_unigram_baseline():
    uniform = torch.arange(256).repeat(40).to(torch.int32)
    bits = unigram_bits_per_token(uniform, uniform[:512].view(2, 256), vocab_size=256, bos_token_id=BOS)
    assert bits == pytest.approx(math.log2(256), rel=1e-3)
