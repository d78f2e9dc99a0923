"""FR-Spec (Zhao et al., 2025): a draft model whose output head scores only the tokens that text
actually uses. The head is the largest single matrix of a small model (the 0.5B's 151,936 x 896
rows are a third of its bytes), and a draft rarely needs the rare tokens; the target still
scores every token, so the output is unchanged, only some drafts are lost.

Which tokens are kept is measured once, not at run time: a table per vocabulary, counted on the
corpus shipped beside it (`models/frequent_tokens/corpus.txt.xz`: the repository's own .py, .md
and .toml files at commit 1f0bfa6, concatenated in path order, code and English prose), then
filled up with the products of the tokenizer's earliest BPE merges (`FrequentTokens.filled`).
Made and remade by

    python -m localllm.runtime.drafters.frequent_tokens MODEL [--corpus TEXT] [--size N] [--out PATH]

A table names the vocabulary it was counted with (a digest of every token's text and type), so
it is only ever applied to a model whose token ids mean the same.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import importlib.resources
import lzma
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from localllm.errors import IncompatibleDraftError, InvalidParameterError

CORPUS = "corpus.txt.xz"
MERGES_KEY = "tokenizer.ggml.merges"
# Tokens kept: 22% of the 0.5B's head, 0.5-0.65 ms of a token's step instead of 4.0-4.6 (Zen 4,
# 2 threads). The corpus's own 10,190 tokens missed 6% of the 1.5B's tokens on the speculative
# benchmark's code prompt and 30% on its chat prompt; filled to 32,768, 2% and 8%.
DEFAULT_SIZE = 32768
# `draft_vocab` values that name no table file.
AUTO = "auto"
FULL = "full"


def tables_dir():
    return importlib.resources.files("localllm.catalog") / "frequent_tokens"


def corpus_text() -> str:
    return lzma.decompress((tables_dir() / CORPUS).read_bytes()).decode("utf-8")


@dataclass(frozen=True)
class FrequentTokens:
    """Token ids by falling count on the corpus (ties by id), with their counts."""

    ids: np.ndarray
    counts: np.ndarray
    vocabulary: str
    corpus: str

    @classmethod
    def count(cls, text: str, tokenizer) -> FrequentTokens:
        counts = collections.Counter(tokenizer.encode(text, add_special=False))
        ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        return cls(
            ids=np.array([token for token, _ in ordered], dtype=np.int64),
            counts=np.array([count for _, count in ordered], dtype=np.int64),
            vocabulary=tokenizer.vocabulary_digest,
            corpus=hashlib.sha256(text.encode("utf-8")).hexdigest(),
        )

    def filled(self, size: int, merges: list[str], tokenizer) -> FrequentTokens:
        """The table grown to `size` tokens with the products of the earliest BPE merges it
        lacks, at count 0: a byte-level BPE merges the most frequent pair of its training text
        first, so merge order is the tokenizer's own frequency ranking, on text far larger than
        the corpus (common words the corpus happens not to use)."""
        have, extra = set(self.ids.tolist()), []
        for merge in merges:
            if len(have) >= size:
                break
            token = tokenizer.token_id(merge.replace(" ", "", 1))
            if token is not None and token not in have:
                have.add(token)
                extra.append(token)
        return FrequentTokens(
            ids=np.concatenate([self.ids, np.array(extra, dtype=np.int64)]),
            counts=np.concatenate([self.counts, np.zeros(len(extra), dtype=np.int64)]),
            vocabulary=self.vocabulary,
            corpus=self.corpus,
        )

    def write(self, path: Path, note: str) -> None:
        lines = [f"# {note}", f"vocabulary\t{self.vocabulary}", f"corpus\t{self.corpus}"]
        lines += [f"{token}\t{count}" for token, count in zip(self.ids.tolist(), self.counts.tolist())]
        Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")

    @classmethod
    def read(cls, path) -> FrequentTokens:
        """Read a table written by `write` (a Path, or a shipped table's resource); a file that
        is not one is an InvalidParameterError."""
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise InvalidParameterError(f"draft vocabulary table {path}: {error}") from None
        fields, ids, counts = {}, [], []
        try:
            for line in text.splitlines():
                if not line or line.startswith("#"):
                    continue
                key, value = line.split("\t")
                if key.isdigit():
                    ids.append(int(key))
                    counts.append(int(value))
                else:
                    fields[key] = value
            vocabulary, corpus = fields["vocabulary"], fields["corpus"]
        except (ValueError, KeyError):
            raise InvalidParameterError(f"draft vocabulary table {path}: not a frequent-token table") from None
        if not ids or len(set(ids)) != len(ids):
            raise InvalidParameterError(f"draft vocabulary table {path}: no tokens, or a token listed twice")
        return cls(np.array(ids, dtype=np.int64), np.array(counts, dtype=np.int64), vocabulary, corpus)


def shipped_tables() -> list:
    return sorted((entry for entry in tables_dir().iterdir() if entry.name.endswith(".tsv")), key=lambda e: e.name)


def head_tokens(draft_vocab, tokenizer) -> np.ndarray | None:
    """The token ids a draft model's head keeps for `draft_vocab` ("auto": the shipped table of
    this vocabulary, if there is one; "full" or None: every token; else a table's path), in
    increasing order, the end-of-generation tokens always among them; None for the whole head."""
    if draft_vocab is None or draft_vocab == FULL:
        return None
    if not isinstance(draft_vocab, (str, os.PathLike)):
        raise InvalidParameterError(f"draft_vocab must be {AUTO!r}, {FULL!r} or a table's path, got {draft_vocab!r}")
    if draft_vocab == AUTO:
        digest = tokenizer.vocabulary_digest
        table = next((t for t in map(FrequentTokens.read, shipped_tables()) if t.vocabulary == digest), None)
        if table is None:
            return None
    else:
        table = FrequentTokens.read(Path(draft_vocab))
        if table.vocabulary != tokenizer.vocabulary_digest:
            raise IncompatibleDraftError(f"draft vocabulary table {draft_vocab} was counted for another vocabulary")
    if table.ids.max() >= tokenizer.vocab_size:
        raise InvalidParameterError(f"draft vocabulary table lists token {table.ids.max()}, past the vocabulary")
    # Control tokens end turns (a chat template's markers), which a draft must be able to propose.
    return np.union1d(table.ids, np.array([*tokenizer.eos_ids, *tokenizer.special_ids], dtype=np.int64))


def main(argv=None) -> None:
    from localllm.formats.gguf import open_gguf
    from localllm.formats.tokenizer import Tokenizer
    from localllm.runtime.catalog import ensure_model

    parser = argparse.ArgumentParser(description="Count the shipped corpus's tokens with MODEL's tokenizer.")
    parser.add_argument("model", help="catalog name or GGUF path whose vocabulary the table is for")
    parser.add_argument("--corpus", type=Path, help="UTF-8 text to count (default: the shipped corpus)")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help="tokens to keep (default %(default)s)")
    parser.add_argument("--out", type=Path, help="table to write (default: only print its summary)")
    args = parser.parse_args(argv)
    path = ensure_model(args.model)
    with open_gguf(path) as gguf:
        tokenizer = Tokenizer.from_gguf(gguf)
        merges = list(gguf.metadata.get(MERGES_KEY, []))
    text = corpus_text() if args.corpus is None else args.corpus.read_text(encoding="utf-8")
    source = CORPUS if args.corpus is None else args.corpus.name
    counted = FrequentTokens.count(text, tokenizer)
    table = counted.filled(args.size, merges, tokenizer)
    note = (
        f"token counts of {source} ({len(text.encode('utf-8'))} bytes) by the tokenizer of {path.name}, "
        f"then at count 0 the products of its earliest merges, to {args.size} tokens"
    )
    print(f"{len(counted.ids)} distinct tokens in the corpus, {len(table.ids)} kept, of {tokenizer.vocab_size}")
    if args.out is not None:
        table.write(args.out, note)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
