"""Tokenizers built from GGUF metadata against llama.cpp's tokenization of the reference cases."""

import logging

import pytest
from gguf import GGUFWriter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from localllm.errors import TokenizerError
from localllm.formats.gguf import open_gguf
from localllm.formats.tokenizer import Tokenizer

from conftest import CATALOG_MODELS, FAST_MODELS, REFERENCE, load_reference

# Loading a tokenizer reads only metadata, so even the 1.5B model's is quick.
# The ternary reference files were made from the 1.5B model and share its tokenizer.
REFERENCE_MODELS = {
    "smollm2-135m-instruct": "smollm2-135m-instruct",
    "gemma-3-270m": "gemma-3-270m",
    "qwen2.5-coder-0.5b-instruct": "qwen2.5-coder-0.5b-instruct",
    "qwen2.5-coder-1.5b-instruct": "qwen2.5-coder-1.5b-instruct",
    "qwen2.5-coder-1.5b-tq1_0": "qwen2.5-coder-1.5b-instruct",
    "qwen2.5-coder-1.5b-tq2_0": "qwen2.5-coder-1.5b-instruct",
}
# One model per tokenizer kind and pre-tokenizer: SentencePiece (gemma), byte-level BPE with
# the smollm and the qwen2 pre-tokenizers.
KINDS = ["gemma-3-270m", "smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"]


def by_model(names):
    """Parameters over reference names; those whose model the quick subset lacks are slow."""
    return [
        pytest.param(name, id=name, marks=() if REFERENCE_MODELS.get(name, name) in FAST_MODELS else pytest.mark.slow)
        for name in names
    ]


# Tests that load several tokenizers at once need the larger models' files.
needs_larger_models = pytest.mark.slow

CORPUS = [
    "",
    "a",
    "Hello, world!",
    "line one\r\nline two\r\n",
    "\ttabbed\t\tcolumns\t",
    " leading space",
    "   three leading spaces",
    "trailing space ",
    "trailing spaces   ",
    "multiple    inner     spaces",
    "\n\n\nnewlines\n\n",
    " \n \t \r\n mixed whitespace \u3000 \u00a0",
    "emoji 🙂🚀👩‍👩‍👧‍👦 flags 🇫🇷",
    "日本語のテキストと中文文本",
    "العربية نص تجريبي",
    "combining accents: e\u0301 a\u0300 n\u0303 o\u0308",
    "Ελληνικά, русский, हिन्दी, 한국어",
    "code: def f(x):\n    return x ** 2  # square\n",
    "<|im_start|>not special here<|im_end|> <start_of_turn>",
    "numbers 1234567890 3.14159 -42",
    "\x00\x01 control \x7f chars",
]


@pytest.fixture(scope="module")
def tokenizers(model_path):
    cache = {}

    def get(name):
        if name not in cache:
            with open_gguf(model_path(name)) as g:
                cache[name] = Tokenizer.from_gguf(g)
        return cache[name]

    return get


def without_bos(tok, ids):
    return ids[1:] if tok.add_bos and ids and ids[0] == tok.bos_id else ids


@pytest.mark.parametrize("reference", by_model(sorted(REFERENCE_MODELS)))
def test_token_ids_match_llama_cpp(tokenizers, reference):
    tok = tokenizers(REFERENCE_MODELS[reference])
    data = load_reference(reference)
    assert tok.vocab_size == data["n_vocab"]
    for case in data["cases"]:
        ids = tok.encode(case["text"], parse_special=case["special"])
        assert ids == case["tokens"], case["name"]


@pytest.mark.parametrize("name", by_model(KINDS))
def test_reference_texts_round_trip(tokenizers, name):
    tok = tokenizers(name)
    for case in load_reference(name)["cases"]:
        ids = tok.encode(case["text"], parse_special=case["special"])
        assert tok.decode(without_bos(tok, ids)) == case["text"], case["name"]


@pytest.mark.parametrize("name", by_model(KINDS))
def test_corpus_round_trips(tokenizers, name):
    # Gemma's vocabulary has add_space_prefix = false, so unlike older SentencePiece models
    # (where llama.cpp prefixes a space and detokenize strips it again) leading spaces
    # survive exactly; no model here needs that exception.
    tok = tokenizers(name)
    for text in CORPUS:
        ids = tok.encode(text)
        assert tok.decode(without_bos(tok, ids)) == text, repr(text)
        assert tok.decode(tok.encode(text, add_special=False)) == text, repr(text)


# Printable: assigned letters, marks, numbers, punctuation, symbols and separators. Their
# UTF-8 never needs the bytes SmolLM2's vocabulary lacks (see the test below).
PRINTABLE = st.characters(whitelist_categories=("L", "M", "N", "P", "S", "Zs", "Zl", "Zp"))


# The quick subset runs a sample; the full 1,000 strings per tokenizer kind run with the slow ones.
EXAMPLE_COUNTS = [pytest.param(100, id="100"), pytest.param(1000, id="1000", marks=pytest.mark.slow)]


@pytest.mark.parametrize("examples", EXAMPLE_COUNTS)
@pytest.mark.parametrize(
    "names",
    [
        pytest.param(FAST_MODELS, id="quick-models"),
        pytest.param(KINDS, id="all-kinds", marks=needs_larger_models),
    ],
)
def test_random_printable_strings_round_trip(tokenizers, names, examples):
    kinds = [tokenizers(name) for name in names]

    @settings(
        max_examples=examples, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(st.text(alphabet=PRINTABLE, max_size=40))
    def round_trip(text):
        for tok in kinds:
            # SentencePiece writes spaces as U+2581, so a literal U+2581 reads back as a space
            # (see test_sentencepiece_reads_its_space_marker_as_a_space).
            expected = text.replace("\u2581", " ") if tok.kind == "spm" else text
            assert tok.decode(tok.encode(text, add_special=False)) == expected, tok

    round_trip()


def test_bytes_missing_from_a_byte_level_vocabulary_are_dropped(tokenizers):
    # SmolLM2's vocabulary has no token for some bytes (0xF1, a UTF-8 lead byte used only by
    # unassigned planes 4-7). llama.cpp's BPE session drops bytes it cannot map, and so do we,
    # so such text cannot round-trip on this model.
    tok = tokenizers("smollm2-135m-instruct")
    assert "\xf1" not in "".join(tok.token_text(i) for i in range(tok.vocab_size))
    ids = tok.encode("\U00040000", add_special=False)
    assert tok.decode(ids) == "\ufffd" * 3


@needs_larger_models
def test_sentencepiece_reads_its_space_marker_as_a_space(tokenizers):
    # llama.cpp escapes " " to U+2581 before tokenizing and unescapes every U+2581 when
    # detokenizing, so the marker character itself cannot round-trip; we do the same.
    tok = tokenizers("gemma-3-270m")
    ids = tok.encode("a\u2581b", add_special=False)
    assert ids == tok.encode("a b", add_special=False)
    assert tok.decode(ids) == "a b"


@needs_larger_models
def test_bos_follows_metadata(tokenizers):
    gemma = tokenizers("gemma-3-270m")
    smollm = tokenizers("smollm2-135m-instruct")
    assert gemma.encode("hi")[0] == gemma.bos_id
    assert gemma.bos_id not in gemma.encode("hi", add_special=False)
    assert not smollm.add_bos
    assert smollm.encode("hi") == smollm.encode("hi", add_special=False)


@pytest.mark.parametrize(
    "name, marker",
    [
        ("smollm2-135m-instruct", "<|im_start|>"),
        pytest.param("qwen2.5-coder-0.5b-instruct", "<|im_start|>", marks=needs_larger_models),
        pytest.param("gemma-3-270m", "<start_of_turn>", marks=needs_larger_models),
    ],
)
def test_parse_special_controls_special_tokens(tokenizers, name, marker):
    tok = tokenizers(name)
    marker_id = tok._token_to_id[marker]
    assert tok.is_special(marker_id)
    assert tok.encode(marker, add_special=False, parse_special=True) == [marker_id]
    as_text = tok.encode(marker, add_special=False, parse_special=False)
    assert marker_id not in as_text and len(as_text) > 1
    assert tok.decode(as_text) == marker


@needs_larger_models
def test_gemma_user_defined_tokens_always_match(tokenizers):
    tok = tokenizers("gemma-3-270m")
    newline = tok._token_to_id["\n"]
    assert tok.is_special(newline)
    assert tok.encode("a\nb", add_special=False, parse_special=False).count(newline) == 1


@needs_larger_models
def test_end_of_generation_ids(tokenizers):
    qwen = tokenizers("qwen2.5-coder-0.5b-instruct")
    gemma = tokenizers("gemma-3-270m")
    smollm = tokenizers("smollm2-135m-instruct")
    assert {qwen._token_to_id["<|im_end|>"], qwen._token_to_id["<|endoftext|>"]} <= set(qwen.eos_ids)
    assert {gemma.eos_id, gemma._token_to_id["<end_of_turn>"]} <= set(gemma.eos_ids)
    assert {smollm.eos_id, smollm._token_to_id["<|im_end|>"]} <= set(smollm.eos_ids)
    assert all(qwen.is_eog(i) for i in qwen.eos_ids)
    assert not qwen.is_eog(qwen.encode("hello", add_special=False)[0])


@needs_larger_models
def test_decode_skip_special_drops_control_tokens(tokenizers):
    tok = tokenizers("qwen2.5-coder-0.5b-instruct")
    text = "<|im_start|>user\nhi<|im_end|>\n"
    ids = tok.encode(text, parse_special=True)
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special=True) == "user\nhi\n"


def test_token_text_and_bad_ids(tokenizers):
    tok = tokenizers("smollm2-135m-instruct")
    assert tok.token_text(tok.bos_id) == "<|im_start|>"
    for bad in (-1, tok.vocab_size):
        with pytest.raises(TokenizerError, match="outside the vocabulary"):
            tok.decode([bad])
        with pytest.raises(TokenizerError):
            tok.token_text(bad)
    with pytest.raises(TokenizerError):
        tok.encode(b"bytes")


# ---- streaming ------------------------------------------------------------------------------


def assert_streams_like_decode(tok, ids):
    decoder = tok.stream_decoder()
    chunks = [decoder.push(i) for i in ids] + [decoder.flush()]
    full = tok.decode(ids)
    assert "".join(chunks) == full
    assert sum(c.count("\ufffd") for c in chunks) == full.count("\ufffd")
    return chunks


@pytest.mark.parametrize("name", by_model(KINDS))
def test_streaming_holds_back_split_characters(tokenizers, name):
    tok = tokenizers(name)
    text = "日本語 🙂 é"
    # Emit the text one byte at a time via byte tokens or single-byte BPE pieces, which
    # splits every multi-byte character across tokens.
    byte_ids = [next(i for i in range(tok.vocab_size) if tok.piece(i) == bytes([b])) for b in text.encode()]
    chunks = assert_streams_like_decode(tok, byte_ids)
    assert "\ufffd" not in "".join(chunks)
    assert [c for c in chunks if c] == list(text)


@pytest.mark.parametrize("examples", EXAMPLE_COUNTS)
@pytest.mark.parametrize("name", by_model(KINDS))
def test_streaming_random_ids_concatenate_to_decode(tokenizers, name, examples):
    tok = tokenizers(name)

    @settings(
        max_examples=examples // 2,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.lists(st.integers(0, tok.vocab_size - 1), max_size=30))
    def stream(ids):
        assert_streams_like_decode(tok, ids)

    stream()
    for text in CORPUS:
        assert_streams_like_decode(tok, tok.encode(text))


# ---- metadata errors ------------------------------------------------------------------------


def test_missing_tokenizer_metadata_names_the_key(tmp_path):
    path = tmp_path / "no-tokenizer.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with open_gguf(path) as g:
        with pytest.raises(TokenizerError, match="tokenizer.ggml.model"):
            Tokenizer.from_gguf(g)


@pytest.fixture(scope="module")
def smollm_metadata(model_path):
    with open_gguf(model_path("smollm2-135m-instruct")) as g:
        return dict(g.metadata)


@pytest.mark.parametrize("missing", ["tokenizer.ggml.tokens", "tokenizer.ggml.merges"])
def test_missing_vocabulary_keys_are_named(smollm_metadata, missing):
    metadata = {k: v for k, v in smollm_metadata.items() if k != missing}
    with pytest.raises(TokenizerError, match=missing):
        Tokenizer(metadata)


def test_bad_metadata_values(smollm_metadata):
    with pytest.raises(TokenizerError, match="unsupported tokenizer model"):
        Tokenizer({**smollm_metadata, "tokenizer.ggml.model": "bert"})
    with pytest.raises(TokenizerError, match="token_type"):
        Tokenizer({**smollm_metadata, "tokenizer.ggml.token_type": smollm_metadata["tokenizer.ggml.token_type"][:5]})
    with pytest.raises(TokenizerError, match="bos_token_id"):
        Tokenizer({**smollm_metadata, "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.bos_token_id": 10**9})


def test_unknown_pre_tokenizer_falls_back_to_gpt2(smollm_metadata, caplog):
    with caplog.at_level(logging.WARNING, logger="localllm.formats.tokenizer"):
        tok = Tokenizer({**smollm_metadata, "tokenizer.ggml.pre": "no-such-pre"})
    assert "no-such-pre" in caplog.text
    gpt2 = Tokenizer({**smollm_metadata, "tokenizer.ggml.pre": "gpt2"})
    text = "Version 12345 of the GPL, 2007"
    assert tok.encode(text) == gpt2.encode(text)
    assert tok.decode(tok.encode(text)) == text


def test_every_catalog_model_has_a_reference():
    assert set(CATALOG_MODELS) <= set(REFERENCE_MODELS)
    references = {p.stem for p in REFERENCE.glob("*.json") if not p.name.endswith(".greedy_margins.json")}
    # The synthetic BitNet model borrows SmolLM2's tokenizer; test_bitnet checks its tokens.
    assert references - {"bitnet-synthetic"} == set(REFERENCE_MODELS)


@pytest.mark.parametrize("name", by_model(["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"]))
def test_long_text_is_cut_only_where_pre_tokenizers_split(tokenizers, name):
    # Long text is encoded in pieces cut before non-space characters that follow a newline;
    # the result must equal encoding the whole text in one call.
    tok = tokenizers(name)
    text = "\n".join(CORPUS + [case["text"] for case in load_reference(name)["cases"]]) * 12
    assert len(tok._bpe_chunks(text)) > 1
    ids = tok.encode(text, add_special=False)
    # encode() left the library in parse_special=False mode, which the reference call reuses.
    assert tok._hf.encode_special_tokens
    assert ids == tok._hf.encode(text, add_special_tokens=False).ids
