"""The Llama family: SmolLM2, Llama 2/3 and Qwen2 (which is Llama plus Q/K/V biases).

Per layer: x += Wo·attn(rope(Wq·n), rope(Wk·n), Wv·n) with n = rmsnorm(x), then
x += Wdown·(silu(Wgate·m) * Wup·m) with m = rmsnorm(x).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from localllm.runtime.device import CPU, Device
from localllm.runtime.models.base import Model, Weights, attention_scale, read_hparams


@dataclass
class LlamaLayer:
    attn_norm: np.ndarray
    wq: object
    wk: object
    wv: object
    wo: object
    bq: np.ndarray | None
    bk: np.ndarray | None
    bv: np.ndarray | None
    ffn_norm: np.ndarray
    gate: object
    up: object
    down: object


class LlamaModel(Model):
    # llama.cpp's GGUF converter permutes Llama's Q/K rows so the interleaved ("normal")
    # RoPE applies; Qwen2 keeps the Hugging Face layout, which rotates the two halves (NeoX).
    NEOX_ROPE = {"llama": False, "qwen2": True}

    def __init__(self, gguf_file, source: str, n_vocab: int, device: Device = CPU):
        hp = read_hparams(gguf_file.metadata, source, n_vocab)
        weights = Weights(gguf_file, source, device)
        super().__init__(gguf_file, hp, weights)
        self.neox = self.NEOX_ROPE[hp.arch]
        self.scale = attention_scale(hp.head_dim_k)
        q_dim, kv_dim = hp.n_head * hp.head_dim_k, hp.n_head_kv * hp.head_dim_k
        v_dim = hp.n_head_kv * hp.head_dim_v

        def bias(name, size):
            return weights.vector(name, size) if weights.has(name) else None

        self.layers = []
        for i in range(hp.n_layer):
            p = f"blk.{i}."
            self.layers.append(
                LlamaLayer(
                    attn_norm=weights.vector(p + "attn_norm.weight", hp.n_embd),
                    wq=weights.matrix(p + "attn_q.weight", q_dim, hp.n_embd),
                    wk=weights.matrix(p + "attn_k.weight", kv_dim, hp.n_embd),
                    wv=weights.matrix(p + "attn_v.weight", v_dim, hp.n_embd),
                    wo=weights.matrix(p + "attn_output.weight", hp.n_embd, hp.n_head * hp.head_dim_v),
                    bq=bias(p + "attn_q.bias", q_dim),
                    bk=bias(p + "attn_k.bias", kv_dim),
                    bv=bias(p + "attn_v.bias", v_dim),
                    ffn_norm=weights.vector(p + "ffn_norm.weight", hp.n_embd),
                    gate=weights.matrix(p + "ffn_gate.weight", hp.n_ff, hp.n_embd),
                    up=weights.matrix(p + "ffn_up.weight", hp.n_ff, hp.n_embd),
                    down=weights.matrix(p + "ffn_down.weight", hp.n_embd, hp.n_ff),
                )
            )

    def _rotate(self, x, positions):
        hp = self.hparams
        return self.kernels.rope(
            x, positions, n_rot=hp.n_rot, base=hp.rope_base, freq_scale=hp.rope_freq_scale, neox=self.neox
        )

    def _layer(self, i, x, positions, cache):
        hp, layer = self.hparams, self.layers[i]
        n = x.shape[0]

        h = self.kernels.rms_norm(x, layer.attn_norm, hp.rms_eps)
        q = self.linear(layer.wq, h)
        k = self.linear(layer.wk, h)
        v = self.linear(layer.wv, h)
        for projected, bias in ((q, layer.bq), (k, layer.bk), (v, layer.bv)):
            if bias is not None:
                projected += bias
        q = q.reshape(n, hp.n_head, hp.head_dim_k)
        k = k.reshape(n, hp.n_head_kv, hp.head_dim_k)
        v = v.reshape(n, hp.n_head_kv, hp.head_dim_v)
        attn = self.attend(i, q, k, v, positions, cache, self._rotate)
        x += self.linear(layer.wo, attn.reshape(n, hp.n_head * hp.head_dim_v))

        h = self.kernels.rms_norm(x, layer.ffn_norm, hp.rms_eps)
        x += self.linear(layer.down, self.kernels.swiglu(self.linear(layer.gate, h), self.linear(layer.up, h)))


ARCHITECTURES = {"llama": LlamaModel, "qwen2": LlamaModel}
