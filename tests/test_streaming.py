"""Generation and perplexity past the context under the sink policy; cancelling and following a
long prefill."""

import json
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from localllm.runtime.cache import CacheSpec
from localllm.runtime.llm import LLM
from localllm.runtime.perplexity import streaming_perplexity

SMOLLM = "smollm2-135m-instruct"
LICENSES = Path("/usr/share/common-licenses")
GPL3 = LICENSES / "GPL-3"


@pytest.fixture(scope="module")
def streaming(model_path):
    # Float32 activations and cache: a block then gives the logits of feeding its tokens one by one.
    with LLM(
        model_path(SMOLLM), n_ctx=64, cache="sink", sinks=4, window=60, quantize_activations=False, kv_dtype="f32"
    ) as llm:
        yield llm


def test_generation_runs_past_the_context_under_the_sink_policy(streaming):
    eos = streaming.tokenizer.eos_id
    completion = streaming.generate("Once upon a time", temperature=0, max_tokens=90, logit_bias={eos: -100.0})
    assert completion.stop_reason == "length"
    assert len(completion.token_ids) == 90 > streaming.cache_spec.size
    assert streaming.cache.n_tokens > 90


def test_streaming_perplexity_scores_each_token_from_the_cache_before_it(streaming):
    """Reference: feed the tokens one at a time through a fresh sink cache, as the paper does."""
    text = GPL3.read_text()[:2000]
    result = streaming_perplexity(streaming, text, sinks=4, window=30, max_tokens=90)
    tokens = streaming.tokenize(text)[:90]
    cache = streaming.model.new_cache(CacheSpec(policy="sink", sinks=4, window=30, kv_dtype="f32"))
    expected = []
    for token, target in zip(tokens, tokens[1:]):
        row = streaming.model.forward([token], cache).astype(np.float64)
        expected.append(np.log(np.exp(row - row.max()).sum()) + row.max() - row[target])
    assert result.n_tokens == len(expected) == 89
    assert np.allclose(result.nll, expected, rtol=1e-3, atol=1e-3)
    assert result.ppl == pytest.approx(np.exp(np.mean(expected)), rel=1e-3)

    # Plain window attention (no sinks): the same while everything fits in its 30 entries (the
    # block reaching past them sums in another order, so not bit for bit), different once the
    # first tokens are evicted.
    without = streaming_perplexity(streaming, text, sinks=0, window=30, max_tokens=90)
    assert np.allclose(without.nll[:30], result.nll[:30], rtol=1e-4, atol=1e-4)
    assert not np.allclose(without.nll[40:], result.nll[40:], rtol=1e-2)


def test_progress_follows_the_prefill_and_cancel_stops_it_between_blocks(streaming):
    ids = streaming.tokenize(GPL3.read_text())[:300]
    seen = []
    completion = streaming.generate(ids, max_tokens=1, progress=lambda done, total: seen.append((done, total)))
    # The prompt streams through a cache of 64 entries.
    assert seen == [(256, 300), (300, 300)] and len(completion.token_ids) == 1
    assert completion.stats.prompt_tokens == 300

    cancel, seen = threading.Event(), []

    def stop_after_first_block(done, total):
        seen.append(done)
        cancel.set()

    completion = streaming.generate(ids, max_tokens=5, cancel=cancel, progress=stop_after_first_block)
    assert completion.stop_reason == "cancelled" and completion.token_ids == []
    assert seen == [256] and streaming.cache.n_tokens == 256


def license_text() -> str:
    """The licence texts of the benchmark, concatenated (benchmarks/streaming.py)."""
    names = ["GPL-2", "GPL-3", "LGPL-2.1", "Apache-2.0", "MPL-2.0"]
    return "\n\n".join((LICENSES / name).read_text() for name in names)


@pytest.mark.slow
def test_perplexity_stays_flat_past_the_training_context(model_path):
    """20,000 tokens through sinks + window on smollm2 (trained on 8,192): the first and the last
    2,000 tokens score within 20% of each other, and every NLL stays finite. The last 2,000 are
    the first 2,000 again, so the comparison is of positions, not of texts (the licences differ
    in difficulty: GPL-2's opening and MPL-2.0's end score 16.2 and 12.3 here)."""
    with LLM(model_path(SMOLLM)) as llm:
        ids = llm.tokenize(license_text())[:18_000]
        result = streaming_perplexity(llm, ids + ids[:2000], sinks=4, window=1024)
    assert result.n_tokens == 19_999 and np.isfinite(result.nll).all()
    first, last = np.exp(result.nll[:1999].mean()), np.exp(result.nll[-1999:].mean())
    assert abs(last / first - 1) < 0.2, (first, last)


# ---- the command line ------------------------------------------------------------------------

COUNTING = "1, 2, 3, 4, 5, 6, 7, 8,"


def run_cli(*args, timeout: float = 600):
    return subprocess.run(
        [sys.executable, "-m", "localllm.runtime.cli", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--window", "0"], "window must be an int of at least 1, got 0"),
        (["--sinks", "-1"], "sinks must be an int of at least 0, got -1"),
        (["--sinks", "8", "--window", "8"], r"sinks \(8\) must be smaller than window \(8\)"),
    ],
)
def test_bad_cache_flags_are_one_line_errors(flags, message):
    result = run_cli("generate", "--raw", "--cache", "sink", *flags, "Hello")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(message, lines[0]), result.stderr


def test_info_shows_what_a_cache_policy_costs(model_path):
    result = run_cli("info", "--json", "--cache", "sink", "--sinks", "4", "--window", "1024")
    info = json.loads(result.stdout)
    # smollm2: 30 layers of 3 KV heads of 64 (keys) + 64 (values) values.
    assert info["kv_cache_bytes_per_token_by_type"] == {"f16": 30 * 3 * 128 * 2, "f32": 30 * 3 * 128 * 4}
    # Each layer: 4 sinks, 1023 + 256 (rollback margin) entries kept, one window of slack; an
    # int32 position per slot.
    slots = 4 + 1023 + 256 + 1024
    assert info["kv_cache"] == {
        "policy": "sink",
        "kv_dtype": "f16",
        "sinks": 4,
        "window": 1024,
        "bytes": 30 * slots * (3 * 128 * 2 + 4),
    }


@pytest.mark.slow
def test_generate_runs_past_the_context_with_the_sink_policy():
    result = run_cli(
        "generate",
        "--raw",
        "--cache",
        "sink",
        "--sinks",
        "4",
        "--window",
        "60",
        "--ctx",
        "32",
        "-n",
        "200",
        "--temp",
        "0",
        "--json",
        COUNTING,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["completion_tokens"] == 200 and data["stop_reason"] == "length"


@pytest.mark.slow
def test_perplexity_cli_evaluates_the_streaming_way(model_path, tmp_path):
    text = GPL3.read_text()[:3000]
    path = tmp_path / "text.txt"
    path.write_text(text)
    result = run_cli("perplexity", "--cache", "sink", "--sinks", "4", "--window", "64", "--threads", "2", str(path))
    assert result.returncode == 0, result.stderr
    with LLM(model_path(SMOLLM), threads=2) as llm:
        expected = streaming_perplexity(llm, text, sinks=4, window=64)
    ppl = float(re.search(r"PPL = ([\d.]+)", result.stdout).group(1))
    assert ppl == pytest.approx(expected.ppl, rel=1e-3)
    assert f"{expected.n_tokens} tokens scored" in result.stdout
