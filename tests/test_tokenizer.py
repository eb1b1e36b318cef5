import base64

import pytest

from kimi_linear.tokenizer import ByteTokenizer, TiktokenTokenizer, load_tokenizer


@pytest.fixture
def bpe_dir(tmp_path):
    tokens = [bytes([i]) for i in range(256)] + [b"he", b"ll", b"hell", b"hello", b" w", b"12"]
    (tmp_path / "tiktoken.model").write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r
                                                       for r, t in enumerate(tokens)))
    return tmp_path


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'é✓'"
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode([tok.bos_token_id, *tok.encode("hi"), tok.eos_token_id]) == "hi"
    assert tok.decode(tok.encode("é")[:1]) == "\ufffd"


def test_tiktoken_tokenizer_merges_and_specials(bpe_dir):
    tok = load_tokenizer(bpe_dir)
    assert isinstance(tok, TiktokenTokenizer)
    ids = tok.encode("hello world 12345")
    assert ids[0] == 259 and tok.decode(ids) == "hello world 12345"
    assert tok.vocab_size == 262 + 256
    assert tok.bos_token_id == 262 and tok.eos_token_id == 264 and tok.pad_token_id == 262 + 255
    # Special-token text in user input stays text.
    assert tok.decode(tok.encode("<|im_end|>")) == "<|im_end|>" and 264 not in tok.encode("<|im_end|>")


def test_chat_format(bpe_dir):
    tok = load_tokenizer(bpe_dir)
    ids = tok.encode_chat([{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}])
    s = tok.special_tokens
    assert ids[0] == s["<|im_system|>"] and ids[-1] == s["<|im_middle|>"]
    assert ids.count(s["<|im_end|>"]) == 2 and s["<|im_user|>"] in ids and s["<|im_assistant|>"] in ids
    with pytest.raises(ValueError, match="chat role"):
        tok.encode_chat([{"role": "robot", "content": "x"}])


def test_specials_from_tokenizer_config(bpe_dir):
    (bpe_dir / "tokenizer_config.json").write_text('{"added_tokens_decoder": {"262": {"content": "[BOS]"}, '
                                                   '"263": {"content": "<|im_end|>"}}}')
    tok = load_tokenizer(bpe_dir)
    assert tok.bos_token_id == 262 and tok.eos_token_id == 263


def test_fallback_and_malformed(tmp_path):
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    (tmp_path / "tiktoken.model").write_text("not-a-valid-line\n")
    with pytest.raises(ValueError, match="tiktoken.model:1"):
        load_tokenizer(tmp_path)
