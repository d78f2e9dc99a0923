"""Tokenizers built from GGUF metadata that tokenize exactly as llama.cpp does.

`Tokenizer.from_gguf(g)` reads only `g.metadata`:

- ``tokenizer.ggml.model == "llama"``: SentencePiece BPE. A `sentencepiece` ModelProto is
  assembled from the file's tokens, scores and token types, with an identity normalizer that
  only escapes spaces to U+2581 (llama.cpp's llm_tokenizer_spm), no dummy prefix (llama.cpp
  adds it itself, per text fragment, when ``tokenizer.ggml.add_space_prefix`` says so) and byte
  fallback to ``<0xXX>`` tokens.
- ``tokenizer.ggml.model == "gpt2"``: byte-level BPE with the `tokenizers` library, from the
  file's vocabulary and merges, split first by the regex list llama.cpp uses for the file's
  ``tokenizer.ggml.pre``.

Special tokens follow llama.cpp's ``parse_special`` semantics: user-defined tokens are always
matched in the text as single tokens; control and unknown tokens only when
``parse_special=True`` (otherwise their text is tokenized like any other text). Where two
special tokens overlap in the text, the leftmost-longest match wins (llama.cpp tries the longest
token first over the whole text; the two only differ for overlapping special tokens, which none
of the supported vocabularies have).

Decoding concatenates each token's bytes (byte-level BPE pieces mapped back to bytes, U+2581
back to spaces, ``<0xXX>`` tokens to their byte, control and user-defined tokens to their text)
and decodes UTF-8 with replacement characters for invalid bytes, as llama.cpp's
token_to_piece/detokenize do without space cleanup.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import re
import threading
from enum import IntEnum
from functools import cached_property

import numpy as np

from localllm.errors import TokenizerError

logger = logging.getLogger(__name__)


class TokenType(IntEnum):
    """GGUF ``tokenizer.ggml.token_type`` values (the same numbers as SentencePiece's)."""

    UNDEFINED = 0
    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


# llama.cpp's special tokens: matched whole in text, not a piece of it.
_SPECIAL_TYPES = (TokenType.CONTROL, TokenType.USER_DEFINED)

_KEY_MODEL = "tokenizer.ggml.model"
_KEY_TOKENS = "tokenizer.ggml.tokens"
_KEY_SCORES = "tokenizer.ggml.scores"
_KEY_TYPES = "tokenizer.ggml.token_type"
_KEY_MERGES = "tokenizer.ggml.merges"
_KEY_PRE = "tokenizer.ggml.pre"

# llama.cpp's pre-tokenizer regexes (src/llama-vocab.cpp, llm_tokenizer_bpe), applied one after
# the other: each splits the pieces the previous one produced.
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_REGEX = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_STARCODER_REGEXES = (r"\p{N}", _GPT2_REGEX)
_PRE_TOKENIZER_REGEXES: dict[str, tuple[str, ...]] = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2_REGEX, r"\p{N}+", r"[0-9][0-9][0-9]"),
    "gpt2": (_GPT2_REGEX,),
    "gpt-2": (_GPT2_REGEX,),
    "phi-2": (_GPT2_REGEX,),
    "mpt": (_GPT2_REGEX,),
    "olmo": (_GPT2_REGEX,),
    "jais": (_GPT2_REGEX,),
    "llama3": (_LLAMA3_REGEX,),
    "llama-v3": (_LLAMA3_REGEX,),
    "llama-bpe": (_LLAMA3_REGEX,),
    "dbrx": (_LLAMA3_REGEX,),
    "smaug-bpe": (_LLAMA3_REGEX,),
    "qwen2": (_QWEN2_REGEX,),
    "deepseek-r1-qwen": (_QWEN2_REGEX,),
    "stablelm2": (_QWEN2_REGEX,),
    "megrez": (_QWEN2_REGEX,),
    "smollm": _STARCODER_REGEXES,
    "starcoder": _STARCODER_REGEXES,
    "refact": _STARCODER_REGEXES,
    "command-r": _STARCODER_REGEXES,
    "codeshell": _STARCODER_REGEXES,
    "exaone": _STARCODER_REGEXES,
    "minerva-7b": _STARCODER_REGEXES,
    "deepseek-coder": ("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", "[一-龥ࠀ-一가-퟿]+", r"\p{N}"),
    "falcon": (
        r"[\p{P}\$\+<=>\^~\|`]+",
        _GPT2_REGEX,
        "[0-9][0-9][0-9]",
    ),
}
# Pre-tokenizers whose llama.cpp vocabulary takes whole words that are in the vocabulary as
# one token, skipping the merges (llama.cpp's ignore_merges), and that add BOS by default.
_IGNORE_MERGES_PRES = frozenset({"llama3", "llama-v3", "llama-bpe"})

# Token texts llama.cpp recognises as end-of-generation (llama_vocab::impl::load), on top of
# the ids the metadata names; each is forced to be a control token.
_EOT_TEXTS = (
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
)
_EOG_TEXTS = frozenset(
    {
        "<|eot_id|>",
        "<|im_end|>",
        "<|end|>",
        "<|return|>",
        "<|call|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "<|eom_id|>",
        "<EOT>",
        "_<EOT>",
        "<|end_of_text|>",
        "<end_of_utterance>",
    }
)
# Fill-in-the-middle pad / repository / file-separator tokens also end generation in llama.cpp.
_FIM_EOG_TEXTS = (
    ("tokenizer.ggml.fim_pad_token_id", ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>")),
    ("tokenizer.ggml.fim_rep_token_id", ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>")),
    ("tokenizer.ggml.fim_sep_token_id", ("<|file_sep|>",)),
)

_SPM_SPACE = "\u2581"
_BPE_CHUNK_CHARS = 16_384
_BPE_CUT = re.compile(r"\n(?=\S)")
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_decoding_table() -> dict[int, str]:
    """GPT-2's byte-level alphabet as a str.translate table from each stand-in character to the
    byte it stands for (as a latin-1 character): printable bytes stand for themselves, the rest
    shift to 256 and up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[256 + shifted] = chr(b)
            shifted += 1
    return table


_BYTE_LEVEL_DECODE = _byte_level_decoding_table()


def _trie_pattern(texts: list[str]) -> re.Pattern | None:
    """One regex matching any of `texts`, longest first at each position.

    A trie-shaped pattern keeps matching linear in the text even with thousands of special
    tokens (Gemma has ~6,400), where a flat alternation would try every token at every position.
    """
    if not texts:
        return None
    trie: dict = {}
    for text in texts:
        node = trie
        for ch in text:
            node = node.setdefault(ch, {})
        node[""] = True

    def build(node: dict) -> str:
        terminal = "" in node
        branches = [re.escape(ch) + build(child) for ch, child in sorted(node.items()) if ch != ""]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        if terminal:
            return "(?:" + body + ")?"
        return body

    return re.compile(build(trie))


class Tokenizer:
    """Text <-> token ids for one GGUF vocabulary; see the module docstring for the rules."""

    def __init__(self, metadata: dict):
        model = metadata.get(_KEY_MODEL)
        if model is None:
            raise TokenizerError(f"GGUF metadata has no tokenizer: missing key {_KEY_MODEL!r}")
        if model not in ("llama", "gpt2"):
            raise TokenizerError(f"unsupported tokenizer model {_KEY_MODEL}={model!r} (supported: 'llama', 'gpt2')")
        self.kind = "spm" if model == "llama" else "bpe"
        self._tokens = self._read_tokens(metadata)
        n = len(self._tokens)
        self._types = self._read_array(metadata, _KEY_TYPES, n, np.int32, TokenType.NORMAL)
        self._scores = self._read_array(metadata, _KEY_SCORES, n, np.float32, 0.0)
        self._token_to_id = dict(zip(self._tokens, range(n)))

        if self.kind == "spm":
            default_bos, default_eos, default_unk = 1, 2, 0
            self.add_bos, self.add_eos, self.add_space_prefix = True, False, True
        else:
            default_bos = default_eos = default_unk = None
            self.pre = metadata.get(_KEY_PRE, "default")
            self.add_bos = self.pre in _IGNORE_MERGES_PRES
            self.add_eos = self.add_space_prefix = False
        self.add_bos = self._read_bool(metadata, "tokenizer.ggml.add_bos_token", self.add_bos)
        self.add_eos = self._read_bool(metadata, "tokenizer.ggml.add_eos_token", self.add_eos)
        self.add_space_prefix = self._read_bool(metadata, "tokenizer.ggml.add_space_prefix", self.add_space_prefix)

        self.bos_id = self._read_id(metadata, "tokenizer.ggml.bos_token_id", default_bos)
        self.eos_id = self._read_id(metadata, "tokenizer.ggml.eos_token_id", default_eos)
        self.unk_id = self._read_id(metadata, "tokenizer.ggml.unknown_token_id", default_unk)
        if self.add_bos and self.bos_id is None:
            raise TokenizerError("tokenizer.ggml.add_bos_token is true but tokenizer.ggml.bos_token_id is missing")
        if self.add_eos and self.eos_id is None:
            raise TokenizerError("tokenizer.ggml.add_eos_token is true but tokenizer.ggml.eos_token_id is missing")
        self.eos_ids = self._end_of_generation_ids(metadata)

        self._pieces: dict[int, bytes] = {}
        if self.kind == "spm":
            self._sp = self._build_sentencepiece()
        else:
            self._hf = self._build_byte_level_bpe(metadata)
            self._hf_lock = threading.Lock()

    @classmethod
    def from_gguf(cls, g) -> Tokenizer:
        """Build from an open GGUF file (only its metadata is read)."""
        return cls(g.metadata)

    # ---- metadata ---------------------------------------------------------------------------

    @staticmethod
    def _read_tokens(metadata: dict) -> list[str]:
        tokens = metadata.get(_KEY_TOKENS)
        if tokens is None:
            raise TokenizerError(f"GGUF metadata has no vocabulary: missing key {_KEY_TOKENS!r}")
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
            raise TokenizerError(f"{_KEY_TOKENS} must be a non-empty array of strings")
        # llama.cpp renames empty tokens so that every id keeps a distinct, non-empty text.
        return [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]

    @staticmethod
    def _read_array(metadata: dict, key: str, n: int, dtype, default) -> np.ndarray:
        value = metadata.get(key)
        if value is None:
            return np.full(n, default, dtype=dtype)
        array = np.asarray(value)
        if array.ndim != 1 or len(array) != n or not np.issubdtype(array.dtype, np.number):
            raise TokenizerError(f"{key} must be a numeric array with one entry per token ({n})")
        return array.astype(dtype)

    @staticmethod
    def _read_bool(metadata: dict, key: str, default: bool) -> bool:
        value = metadata.get(key, default)
        if not isinstance(value, (bool, int, np.integer)):
            raise TokenizerError(f"{key} must be a boolean, got {value!r}")
        return bool(value)

    def _read_id(self, metadata: dict, key: str, default: int | None) -> int | None:
        value = metadata.get(key, default)
        if value is None:
            return None
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise TokenizerError(f"{key} must be an integer token id, got {value!r}")
        if not 0 <= value < len(self._tokens):
            if key in metadata:
                logger.warning(
                    "%s = %d is outside the vocabulary (%d tokens); ignoring it", key, value, len(self._tokens)
                )
            return None
        return int(value)

    def _end_of_generation_ids(self, metadata: dict) -> tuple[int, ...]:
        def mark_control(token_id: int) -> None:
            # llama.cpp forces end-of-generation tokens to be control tokens whatever the file says.
            self._types[token_id] = TokenType.CONTROL

        eog: set[int] = set()
        for key, texts in _FIM_EOG_TEXTS:
            token_id = self._read_id(metadata, key, None)
            if token_id is None:
                token_id = next((self._token_to_id[t] for t in texts if t in self._token_to_id), None)
            if token_id is not None:
                mark_control(token_id)
                eog.add(token_id)
        for text in _EOG_TEXTS:
            token_id = self._token_to_id.get(text)
            if token_id is not None:
                mark_control(token_id)
                eog.add(token_id)
        eot = self._read_id(metadata, "tokenizer.ggml.eot_token_id", None)
        if eot is None:
            eot = next((self._token_to_id[t] for t in _EOT_TEXTS if t in self._token_to_id), None)
        eom = self._read_id(metadata, "tokenizer.ggml.eom_token_id", None)
        for token_id in (self.eos_id, eot, eom):
            if token_id is not None:
                mark_control(token_id)
                eog.add(token_id)
        return tuple(sorted(eog))

    def piece(self, token_id: int) -> bytes:
        """The token's bytes as llama.cpp's token_to_piece renders them with special=true.
        Rendered on first use: all of a 150k vocabulary at load took a tenth of a second."""
        piece = self._pieces.get(token_id)
        if piece is None:
            piece = self._pieces[token_id] = self._render_piece(self._tokens[token_id], int(self._types[token_id]))
        return piece

    def _render_piece(self, text: str, token_type: int) -> bytes:
        if token_type in (TokenType.NORMAL, TokenType.UNDEFINED):
            if self.kind == "spm":
                return text.replace(_SPM_SPACE, " ").encode()
            try:
                return text.translate(_BYTE_LEVEL_DECODE).encode("latin-1")
            except UnicodeEncodeError:
                return text.encode()
        if token_type in (TokenType.CONTROL, TokenType.USER_DEFINED, TokenType.UNKNOWN):
            return text.encode()
        if token_type == TokenType.BYTE and (match := _BYTE_TOKEN.fullmatch(text)):
            return bytes([int(match.group(1), 16)])
        return b""

    # ---- backends ---------------------------------------------------------------------------

    def _ids_of_types(self, types: tuple[TokenType, ...]) -> np.ndarray:
        return np.flatnonzero(np.isin(self._types, np.array(types, dtype=np.int32)))

    def _special_texts(self, types: tuple[TokenType, ...]) -> list[str]:
        return [self._tokens[i] for i in self._ids_of_types(types).tolist()]

    def _build_sentencepiece(self):
        import sentencepiece
        from sentencepiece import sentencepiece_model_pb2 as sp_model

        unk_id = self.unk_id
        if unk_id is None:
            unknown = np.flatnonzero(self._types == TokenType.UNKNOWN)
            if len(unknown) == 0:
                raise TokenizerError(
                    "SentencePiece vocabulary has no unknown token: missing key tokenizer.ggml.unknown_token_id"
                )
            unk_id = int(unknown[0])
        proto = sp_model.ModelProto()
        proto.trainer_spec.model_type = sp_model.TrainerSpec.BPE
        proto.trainer_spec.vocab_size = len(self._tokens)
        proto.trainer_spec.unk_id = unk_id
        proto.trainer_spec.bos_id = -1
        proto.trainer_spec.eos_id = -1
        proto.trainer_spec.pad_id = -1
        proto.trainer_spec.byte_fallback = int(np.count_nonzero(self._types == TokenType.BYTE)) == 256
        proto.normalizer_spec.name = "identity"
        proto.normalizer_spec.add_dummy_prefix = False
        proto.normalizer_spec.remove_extra_whitespaces = False
        proto.normalizer_spec.escape_whitespaces = True
        known_types = {int(t) for t in TokenType if t != TokenType.UNDEFINED}
        for i, (text, score, token_type) in enumerate(zip(self._tokens, self._scores.tolist(), self._types.tolist())):
            piece = proto.pieces.add()
            piece.piece = text
            piece.score = score
            if i == unk_id:
                piece.type = sp_model.ModelProto.SentencePiece.UNKNOWN
            elif token_type == TokenType.UNKNOWN:
                piece.type = sp_model.ModelProto.SentencePiece.CONTROL
            else:
                piece.type = token_type if token_type in known_types else TokenType.NORMAL
        processor = sentencepiece.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(proto.SerializeToString())
        except (RuntimeError, OSError) as exc:
            raise TokenizerError(f"SentencePiece rejected the GGUF vocabulary: {exc}") from None
        return processor

    def _build_byte_level_bpe(self, metadata: dict):
        from tokenizers import AddedToken, Regex, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer

        raw_merges = metadata.get(_KEY_MERGES)
        if raw_merges is None:
            raise TokenizerError(f"byte-level BPE vocabulary without merges: missing key {_KEY_MERGES!r}")
        merges = []
        for merge in raw_merges:
            # llama.cpp splits at the first space after the first character, so a merge of
            # a piece that is itself a space stays well defined.
            cut = merge.find(" ", 1) if isinstance(merge, str) else -1
            if cut < 0:
                raise TokenizerError(f"malformed entry in {_KEY_MERGES}: {merge!r}")
            merges.append((merge[:cut], merge[cut + 1 :]))
        regexes = _PRE_TOKENIZER_REGEXES.get(self.pre)
        if regexes is None:
            logger.warning("unknown pre-tokenizer %s=%r; falling back to gpt2's regex", _KEY_PRE, self.pre)
            regexes = _PRE_TOKENIZER_REGEXES["gpt2"]
        try:
            model = models.BPE(vocab=self._token_to_id, merges=merges, ignore_merges=self.pre in _IGNORE_MERGES_PRES)
        except Exception as exc:
            raise TokenizerError(f"cannot build the BPE model from the GGUF vocabulary: {exc}") from None
        hf = HFTokenizer(model)
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        hf.add_tokens(
            [AddedToken(t, special=False, normalized=False) for t in self._special_texts((TokenType.USER_DEFINED,))]
        )
        hf.add_special_tokens(
            [
                AddedToken(t, special=True, normalized=False)
                for t in self._special_texts((TokenType.CONTROL, TokenType.UNKNOWN))
            ]
        )
        return hf

    @cached_property
    def _user_defined_pattern(self) -> re.Pattern | None:
        return _trie_pattern(self._special_texts((TokenType.USER_DEFINED,)))

    @cached_property
    def _all_special_pattern(self) -> re.Pattern | None:
        return _trie_pattern(self._special_texts((TokenType.USER_DEFINED, TokenType.CONTROL, TokenType.UNKNOWN)))

    # ---- public API -------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    def token_text(self, token_id: int) -> str:
        """The token's text exactly as stored in the GGUF vocabulary."""
        self._check_id(token_id)
        return self._tokens[token_id]

    @cached_property
    def vocabulary_digest(self) -> str:
        """sha256 over every token's type and text, in id order: two tokenizers with equal
        digests give each id the same meaning."""
        digest = hashlib.sha256(np.ascontiguousarray(self._types, dtype="<i4").tobytes())
        digest.update(json.dumps(self._tokens, ensure_ascii=False).encode("utf-8", "surrogatepass"))
        return digest.hexdigest()

    def token_id(self, text: str) -> int | None:
        """The id of the token whose stored text is `text`, if there is one."""
        return self._token_to_id.get(text)

    def token_type(self, token_id: int) -> TokenType:
        self._check_id(token_id)
        value = int(self._types[token_id])
        return TokenType(value) if value in TokenType._value2member_map_ else TokenType.UNDEFINED

    def is_special(self, token_id: int) -> bool:
        """Control or user-defined token (llama.cpp's special tokens, matched whole in text)."""
        self._check_id(token_id)
        return int(self._types[token_id]) in _SPECIAL_TYPES

    @cached_property
    def special_ids(self) -> np.ndarray:
        """The ids `is_special` holds for, increasing."""
        return self._ids_of_types(_SPECIAL_TYPES)

    def is_eog(self, token_id: int) -> bool:
        return token_id in self.eos_ids

    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of `text`, with BOS/EOS as the metadata says when `add_special`."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode() needs a str, got {type(text).__name__}")
        if self.kind == "spm":
            ids = self._encode_spm(text, parse_special)
        else:
            ids = self._encode_bpe(text, parse_special)
        if add_special:
            if self.add_bos:
                ids.insert(0, self.bos_id)
            if self.add_eos:
                ids.append(self.eos_id)
        return ids

    def _encode_bpe(self, text: str, parse_special: bool) -> list[int]:
        if not text:
            return []
        chunks = self._bpe_chunks(text)
        with self._hf_lock:
            self._hf.encode_special_tokens = not parse_special
            try:
                encodings = self._hf.encode_batch(chunks, add_special_tokens=False)
            except Exception as exc:
                raise TokenizerError(f"BPE tokenization failed: {exc}") from None
        return [token_id for encoding in encodings for token_id in encoding.ids]

    def _bpe_chunks(self, text: str) -> list[str]:
        """Cut long text where every supported pre-tokenizer regex splits anyway, so the pieces
        encode in parallel and the library's per-call cost, which grows faster than linearly
        with the input length, stays small.

        No pre-tokenizer regex matches a newline followed by a non-space character, so a piece
        always ends between them; a special token containing a newline could span the cut, so
        such vocabularies are not cut.
        """
        if len(text) <= _BPE_CHUNK_CHARS or self._newline_in_special_tokens:
            return [text]
        chunks = []
        start = 0
        while len(text) - start > _BPE_CHUNK_CHARS:
            match = _BPE_CUT.search(text, start + _BPE_CHUNK_CHARS)
            if match is None:
                break
            chunks.append(text[start : match.end()])
            start = match.end()
        chunks.append(text[start:])
        return chunks

    @cached_property
    def _newline_in_special_tokens(self) -> bool:
        texts = self._special_texts((TokenType.USER_DEFINED, TokenType.CONTROL, TokenType.UNKNOWN))
        return any("\n" in t or "\r" in t for t in texts)

    def _encode_spm(self, text: str, parse_special: bool) -> list[int]:
        pattern = self._all_special_pattern if parse_special else self._user_defined_pattern
        # Runs of special tokens and text fragments, in order; the fragments are encoded in
        # one batch call.
        segments: list[list[int] | str] = []
        prev_is_special = True
        start = 0
        if pattern is not None:
            for match in pattern.finditer(text):
                if not match.group():
                    continue
                if match.start() > start:
                    segments.append(self._spm_fragment(text[start : match.start()], prev_is_special))
                    prev_is_special = False
                if not segments or isinstance(segments[-1], str):
                    segments.append([])
                segments[-1].append(self._token_to_id[match.group()])
                prev_is_special = True
                start = match.end()
        if start < len(text):
            segments.append(self._spm_fragment(text[start:], prev_is_special))
        fragments = [s for s in segments if isinstance(s, str)]
        encoded = iter(self._sp.encode(fragments) if fragments else [])
        ids: list[int] = []
        for segment in segments:
            ids += next(encoded) if isinstance(segment, str) else segment
        return ids

    def _spm_fragment(self, fragment: str, prev_is_special: bool) -> str:
        return " " + fragment if self.add_space_prefix and prev_is_special else fragment

    def _check_id(self, token_id) -> None:
        if not isinstance(token_id, (int, np.integer)) or not 0 <= token_id < len(self._tokens):
            raise TokenizerError(f"token id {token_id!r} is outside the vocabulary (0..{len(self._tokens) - 1})")

    def _skipped(self, token_id: int) -> bool:
        return int(self._types[token_id]) in (TokenType.CONTROL, TokenType.UNKNOWN)

    def decode(self, ids, skip_special: bool = False) -> str:
        """Text of `ids`. `skip_special` drops control and unknown tokens (BOS, EOS, <|im_end|>...);
        user-defined tokens are text (Gemma's newline and space runs) and always stay."""
        decoder = self.stream_decoder(skip_special=skip_special)
        return "".join(decoder.push(i) for i in ids) + decoder.flush()

    def stream_decoder(self, skip_special: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_ids={self.eos_ids})"
        )


class StreamDecoder:
    """Incremental detokenizer: `push(id)` returns the text completed so far, never half a
    UTF-8 character; `flush()` returns what is left. The concatenation equals `decode(ids)`."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # Encoding prefixed a space to the first fragment; the first piece gives it back.
        self._strip_space = tokenizer.add_space_prefix

    def push(self, token_id: int) -> str:
        tok = self._tokenizer
        tok._check_id(token_id)
        if self._skip_special and tok._skipped(token_id):
            return ""
        piece = tok.piece(token_id)
        if self._strip_space and piece and not tok._skipped(token_id):
            self._strip_space = False
            if piece.startswith(b" "):
                piece = piece[1:]
        return self._utf8.decode(piece)

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
