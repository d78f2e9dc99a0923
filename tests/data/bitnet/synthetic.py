"""A small synthetic BitNet model (llama.cpp's `bitnet` architecture) with random ternary
weights, written with the gguf package: the file the BitNet tests run and llama.cpp computed
the reference logits of (tests/data/reference/bitnet-synthetic.json, made by reference.py here).

Everything is drawn from one seeded generator, so `write_model(path)` makes the same bytes on
every machine: three layers of width 256 (4 query heads, 2 KV heads of 64), FFN width 512; the
weight matrices ternary (values -a, 0, +a per tensor) in TQ2_0 (layers 0 and 2) or TQ1_0 (layer
1), quantized by gguf.quants exactly; layer 0's projections carry the optional one-value scale
tensors; F16 token embedding, tied output. The vocabulary and tokenizer are SmolLM2-135M's
(copied from its GGUF, path given), so prompts tokenize as they do for that model.

    python tests/data/bitnet/synthetic.py SMOLLM2_GGUF OUT.gguf
"""

from __future__ import annotations

import sys
from functools import cache
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf import quants as gguf_quants

SEED = 20261129
N_LAYER, N_EMBD, N_FF, N_HEAD, N_HEAD_KV = 3, 256, 512, 4, 2
LAYER_TYPES = [GGMLQuantizationType.TQ2_0, GGMLQuantizationType.TQ1_0, GGMLQuantizationType.TQ2_0]
SCALED_LAYERS = {0}
PROJECTIONS = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]


def _shapes() -> dict[str, tuple[int, int]]:
    head_dim = N_EMBD // N_HEAD
    kv = N_HEAD_KV * head_dim
    return {
        "attn_q": (N_EMBD, N_EMBD),
        "attn_k": (kv, N_EMBD),
        "attn_v": (kv, N_EMBD),
        "attn_output": (N_EMBD, N_EMBD),
        "ffn_gate": (N_FF, N_EMBD),
        "ffn_up": (N_FF, N_EMBD),
        "ffn_down": (N_EMBD, N_FF),
    }


@cache
def _tokenizer_fields(path: str) -> list[tuple]:
    """(name, value, type, element type) of every tokenizer key of the GGUF at `path` but its
    chat template; read once per process (reading 49,152 tokens' strings takes seconds)."""
    fields = []
    for field in GGUFReader(path).fields.values():
        if field.name.startswith("tokenizer.") and field.name != "tokenizer.chat_template":
            vtype = field.types[0]
            fields.append(
                (field.name, field.contents(), vtype, field.types[-1] if vtype == GGUFValueType.ARRAY else None)
            )
    return fields


def write_model(tokenizer_source: str | Path, path: str | Path, omit: frozenset[str] = frozenset()) -> None:
    """The model, minus the tensors named in `omit` (to make a broken file)."""
    rng = np.random.default_rng(SEED)
    tokenizer = _tokenizer_fields(str(tokenizer_source))
    n_vocab = len(next(value for name, value, _, _ in tokenizer if name == "tokenizer.ggml.tokens"))
    writer = GGUFWriter(path, "bitnet")
    add_tensor = writer.add_tensor

    def add(name, data, **kwargs):
        # Drawn all the same, so that the other tensors keep their bytes.
        if name not in omit:
            add_tensor(name, data, **kwargs)

    writer.add_name("bitnet-synthetic")
    writer.add_block_count(N_LAYER)
    writer.add_context_length(2048)
    writer.add_embedding_length(N_EMBD)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_file_type(37)  # MOSTLY_TQ2_0
    for name, value, vtype, sub_type in tokenizer:
        writer.add_key_value(name, value, vtype, sub_type=sub_type)

    # Embedding rows of norm ~4 give logits a spread like a real model's.
    embedding = rng.normal(0.0, 4.0 / np.sqrt(N_EMBD), size=(n_vocab, N_EMBD)).astype(np.float16)
    add("token_embd.weight", embedding)
    add("output_norm.weight", (1.0 + 0.1 * rng.standard_normal(N_EMBD)).astype(np.float32))
    for i in range(N_LAYER):
        p = f"blk.{i}."
        for norm, size in (
            ("attn_norm", N_EMBD),
            ("attn_sub_norm", N_EMBD),
            ("ffn_norm", N_EMBD),
            ("ffn_sub_norm", N_FF),
        ):
            add(p + norm + ".weight", (1.0 + 0.1 * rng.standard_normal(size)).astype(np.float32))
        for name, (rows, cols) in _shapes().items():
            ternary = rng.choice(np.array([-1.0, 0.0, 1.0], dtype=np.float32), size=(rows, cols), p=[0.3, 0.4, 0.3])
            values = ternary * np.float32(1.5 / np.sqrt(cols))
            raw = gguf_quants.quantize(values, LAYER_TYPES[i])
            add(p + name + ".weight", raw, raw_shape=raw.shape, raw_dtype=LAYER_TYPES[i])
            if i in SCALED_LAYERS:
                add(p + name + ".scale", np.array([rng.uniform(0.5, 1.5)], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


if __name__ == "__main__":
    write_model(sys.argv[1], sys.argv[2])
