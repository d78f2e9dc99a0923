"""BitNet b1.58 (llama.cpp's `bitnet` architecture: src/models/bitnet.cpp and its converter).

A Llama layer with ternary weight matrices (TQ1_0, TQ2_0) and two more RMSNorms: one over the
attention output before its projection (`attn_sub_norm`) and one over the FFN's hidden state
before the down projection (`ffn_sub_norm`). Any projection may carry a one-value scale tensor
(`blk.i.attn_q.scale`, ...) that multiplies its product, as the converter's per-tensor ternary
scales do. RoPE rotates the two halves (NeoX), the FFN is SwiGLU as llama.cpp builds it for this
architecture (llama.cpp has no metadata key that selects another activation), and the output
head is the token embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from localllm.runtime.device import CPU, Device
from localllm.runtime.models.base import Model, Weights, attention_scale, read_hparams


@dataclass
class ScaledWeight:
    """A projection and the scale its product is multiplied by (None: none)."""

    weight: object
    scale: np.float32 | None


@dataclass
class BitnetLayer:
    attn_norm: np.ndarray
    wq: ScaledWeight
    wk: ScaledWeight
    wv: ScaledWeight
    attn_sub_norm: np.ndarray
    wo: ScaledWeight
    ffn_norm: np.ndarray
    gate: ScaledWeight
    up: ScaledWeight
    ffn_sub_norm: np.ndarray
    down: ScaledWeight


class BitnetModel(Model):
    def __init__(self, gguf_file, source: str, n_vocab: int, device: Device = CPU):
        hp = read_hparams(gguf_file.metadata, source, n_vocab)
        weights = Weights(gguf_file, source, device)
        super().__init__(gguf_file, hp, weights)
        self.scale = attention_scale(hp.head_dim_k)
        q_dim, kv_dim = hp.n_head * hp.head_dim_k, hp.n_head_kv * hp.head_dim_k
        v_dim = hp.n_head_kv * hp.head_dim_v

        def projection(name, rows, cols):
            scale_name = name.removesuffix(".weight") + ".scale"
            scale = weights.vector(scale_name, 1)[0] if weights.has(scale_name) else None
            return ScaledWeight(weights.matrix(name, rows, cols), scale)

        self.layers = []
        for i in range(hp.n_layer):
            p = f"blk.{i}."
            self.layers.append(
                BitnetLayer(
                    attn_norm=weights.vector(p + "attn_norm.weight", hp.n_embd),
                    wq=projection(p + "attn_q.weight", q_dim, hp.n_embd),
                    wk=projection(p + "attn_k.weight", kv_dim, hp.n_embd),
                    wv=projection(p + "attn_v.weight", v_dim, hp.n_embd),
                    attn_sub_norm=weights.vector(p + "attn_sub_norm.weight", hp.n_head * hp.head_dim_v),
                    wo=projection(p + "attn_output.weight", hp.n_embd, hp.n_head * hp.head_dim_v),
                    ffn_norm=weights.vector(p + "ffn_norm.weight", hp.n_embd),
                    gate=projection(p + "ffn_gate.weight", hp.n_ff, hp.n_embd),
                    up=projection(p + "ffn_up.weight", hp.n_ff, hp.n_embd),
                    ffn_sub_norm=weights.vector(p + "ffn_sub_norm.weight", hp.n_ff),
                    down=projection(p + "ffn_down.weight", hp.n_embd, hp.n_ff),
                )
            )

    def _rotate(self, x, positions):
        hp = self.hparams
        return self.kernels.rope(
            x, positions, n_rot=hp.n_rot, base=hp.rope_base, freq_scale=hp.rope_freq_scale, neox=True
        )

    def _scaled(self, projection: ScaledWeight, x: np.ndarray) -> np.ndarray:
        out = self.linear(projection.weight, x)
        if projection.scale is not None:
            out *= projection.scale
        return out

    def _layer(self, i, x, positions, cache):
        hp, layer = self.hparams, self.layers[i]
        n = x.shape[0]

        h = self.kernels.rms_norm(x, layer.attn_norm, hp.rms_eps)
        q = self._scaled(layer.wq, h).reshape(n, hp.n_head, hp.head_dim_k)
        k = self._scaled(layer.wk, h).reshape(n, hp.n_head_kv, hp.head_dim_k)
        v = self._scaled(layer.wv, h).reshape(n, hp.n_head_kv, hp.head_dim_v)
        attn = self.attend(i, q, k, v, positions, cache, self._rotate).reshape(n, hp.n_head * hp.head_dim_v)
        x += self._scaled(layer.wo, self.kernels.rms_norm(attn, layer.attn_sub_norm, hp.rms_eps))

        h = self.kernels.rms_norm(x, layer.ffn_norm, hp.rms_eps)
        hidden = self.kernels.swiglu(self._scaled(layer.gate, h), self._scaled(layer.up, h))
        x += self._scaled(layer.down, self.kernels.rms_norm(hidden, layer.ffn_sub_norm, hp.rms_eps))


ARCHITECTURES = {"bitnet": BitnetModel}
