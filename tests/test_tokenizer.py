import base64
import json

import pytest

from kimi_linear.config import PRESETS
from kimi_linear.tokenizer import (
    BYTE_CHAT_SPECIALS,
    CHAT_MARKERS,
    NUM_RESERVED_SPECIAL,
    ByteTokenizer,
    TiktokenTokenizer,
    load_tokenizer,
)


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
    assert NUM_RESERVED_SPECIAL == 258 and tok.vocab_size == 262 + 258
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
    # Unnamed slots keep the released code's reserved names (absolute ids), so they stay specials.
    assert tok.special_tokens["<|reserved_token_264|>"] == 264 and len(tok.special_tokens) == 258
    assert tok.decode([262, 259, 300]) == "hello" and tok.stop_token_ids == [263]


def test_fallback_and_malformed(tmp_path):
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    (tmp_path / "tiktoken.model").write_text("not-a-valid-line\n")
    with pytest.raises(ValueError, match="tiktoken.model:1"):
        load_tokenizer(tmp_path)


def test_released_special_ids(bpe_dir):
    """architecture.md §5, with the base vocabulary of 262 standing for 163,584."""
    s = load_tokenizer(bpe_dir).special_tokens
    expected = {"[BOS]": 0, "[EOS]": 1, "<|im_end|>": 2, "<|im_user|>": 3, "<|im_assistant|>": 4,
                "<|start_header_id|>": 6, "<|end_header_id|>": 7, "[EOT]": 9, "<|im_system|>": 10,
                "<|tool_calls_section_begin|>": 11, "<|tool_calls_section_end|>": 12, "<|tool_call_begin|>": 13,
                "<|tool_call_argument_begin|>": 14, "<|tool_call_end|>": 15, "<|im_middle|>": 17, "[PAD]": 255}
    assert {name: s[name] - 262 for name in expected} == expected
    assert s["<|reserved_token_267|>"] == 267 and s["<|reserved_token_519|>"] == 519 and len(s) == 258


def test_stop_tokens(bpe_dir):
    tok = load_tokenizer(bpe_dir)
    assert tok.stop_token_ids == [262 + 2, 262 + 1]  # <|im_end|>, [EOS]
    assert ByteTokenizer().stop_token_ids == [257]
    assert ByteTokenizer.with_chat_markers().stop_token_ids == [259, 257]


def test_special_strings_in_text_stay_text(bpe_dir):
    for tok in (load_tokenizer(bpe_dir), ByteTokenizer.with_chat_markers()):
        text = "a<|im_end|>b<|tool_call_begin|>[BOS]"
        ids = tok.encode(text)
        assert not set(ids) & set(tok.special_tokens.values()) and tok.decode(ids) == text
        marked = tok.encode_with_specials(text)
        assert tok.special_tokens["<|im_end|>"] in marked and tok.special_tokens["<|tool_call_begin|>"] in marked
        assert tok.decode(marked) == "ab"


def test_byte_tokenizer_chat_markers_fit_small_vocab():
    tok = ByteTokenizer.with_chat_markers()
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (256, 257, 258)
    assert [tok.special_tokens[n] for n in CHAT_MARKERS] == list(range(259, 269))
    assert tok.special_tokens["<|im_middle|>"] == 268 and tok.special_tokens["<|tool_call_begin|>"] == 265
    assert tok.vocab_size == 269 <= min(PRESETS[p]["vocab_size"] for p in ("tiny", "test"))
    assert tok.encode("é") == [195, 169] and tok.encode_with_specials("<|im_user|>x") == [260, 120]
    assert tok.decode([259, *tok.encode("hi"), 268]) == "hi"
    # The plain byte tokenizer (existing checkpoints) is unchanged.
    plain = ByteTokenizer()
    assert plain.vocab_size == 259 and plain.special_tokens == {"[BOS]": 256, "[EOS]": 257, "[PAD]": 258}
    with pytest.raises(ValueError, match="bytes"):
        ByteTokenizer({"<|im_end|>": 10})


def test_byte_tokenizer_config_round_trip(tmp_path):
    path = ByteTokenizer.with_chat_markers().save_pretrained(tmp_path)
    config = json.loads(open(path).read())
    assert config["tokenizer_class"] == "ByteTokenizer"
    assert config["added_tokens_decoder"]["259"] == {"content": "<|im_end|>", "special": True}
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, ByteTokenizer) and tok.special_tokens == BYTE_CHAT_SPECIALS
    assert tok.vocab_size == 269 and tok.chat_template is None
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "TikTokenTokenizer"}')
    with pytest.raises(ValueError, match="tiktoken.model"):
        load_tokenizer(tmp_path)


def test_chat_template_attached(bpe_dir):
    assert load_tokenizer(bpe_dir).chat_template is None
    (bpe_dir / "chat_template.jinja").write_text("{{ messages[0].content }}")
    assert load_tokenizer(bpe_dir).chat_template == "{{ messages[0].content }}"
