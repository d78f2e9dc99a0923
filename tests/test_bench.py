"""`localllm bench`, the op timers behind `-v`, and the llama.cpp comparison script's fallback."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from localllm.formats.gguf import open_gguf
from localllm.kernels import cpu as kernels
from localllm.runtime.bench import weight_bytes_per_token
from localllm.runtime.llm import LLM
from localllm.runtime.profile import OpTimers

SMOLLM = "smollm2-135m-instruct"
ROOT = Path(__file__).parent.parent


def run_bench(*args, timeout: float = 300):
    return subprocess.run(
        [sys.executable, "-m", "localllm.runtime.cli", "bench", *args],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


@pytest.fixture(scope="module")
def bench_json(model_path):
    result = run_bench("-m", str(model_path(SMOLLM)), "-p", "16", "-n", "4", "-r", "2", "--threads", "1", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_json_has_one_object_per_test_with_llama_bench_fields(bench_json, model_path):
    assert [entry["test"] for entry in bench_json] == ["pp16", "tg4"]
    pp, tg = bench_json
    assert (pp["n_prompt"], pp["n_gen"]) == (16, 0)
    assert (tg["n_prompt"], tg["n_gen"]) == (0, 4)
    for entry in bench_json:
        assert entry["model_filename"] == str(model_path(SMOLLM))
        assert entry["n_threads"] == 1
        assert entry["model_type"] == "llama Q4_1"
        assert entry["model_size"] == model_path(SMOLLM).stat().st_size
        assert len(entry["samples_ns"]) == len(entry["samples_ts"]) == 2


def test_speeds_are_tokens_over_measured_time(bench_json):
    for entry in bench_json:
        n_tokens = entry["n_prompt"] + entry["n_gen"]
        expected = [n_tokens * 1e9 / ns for ns in entry["samples_ns"]]
        assert entry["samples_ts"] == pytest.approx(expected)
        assert entry["avg_ts"] == pytest.approx(np.mean(expected))
        assert entry["stddev_ts"] == pytest.approx(np.std(expected, ddof=1))
        assert entry["avg_ts"] > 0


def test_roofline_is_bandwidth_over_weight_bytes(bench_json):
    pp, tg = bench_json
    assert pp["roofline_ts"] is None
    assert tg["bandwidth_gbs"] > 0
    assert tg["roofline_ts"] == pytest.approx(tg["bandwidth_gbs"] * 1e9 / tg["weight_bytes_per_token"])
    assert tg["roofline_fraction"] == pytest.approx(tg["avg_ts"] / tg["roofline_ts"])


def test_load_first_token_and_memory_are_plausible(bench_json):
    for entry in bench_json:
        assert 0 < entry["load_seconds"] < entry["first_token_seconds"]
        # Decoding touches every weight of the memory map, so they are all resident at the peak.
        assert entry["peak_rss_bytes"] >= entry["weight_bytes_per_token"]


def test_weight_bytes_per_token_counts_a_tied_head_once(model_path):
    # SmolLM2 has no output.weight: the embedding is the head, read whole for every token.
    with open_gguf(model_path(SMOLLM)) as gguf:
        assert "output.weight" not in gguf.tensors
        assert weight_bytes_per_token(gguf) == sum(t.nbytes for t in gguf.tensors.values())


def test_table_and_per_op_profile(model_path):
    result = run_bench("-m", str(model_path(SMOLLM)), "-p", "8", "-n", "2", "-r", "1", "-v")
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if "SmolLM2-135M-Instruct.Q4_1.gguf |" in line]
    assert [row.split("|")[5].strip() for row in rows] == ["pp8", "tg2"]
    assert "ms per token by op" in result.stdout
    assert "matmul ffn_down" in result.stdout and "matvec ffn_down" in result.stdout


def test_op_timers_account_for_a_forward_pass_and_restore_the_kernels(model_path):
    original = kernels.matvec
    with LLM(model_path(SMOLLM), n_ctx=32) as llm:
        llm.model.forward([1, 2, 3], llm.cache)
        with OpTimers() as timers:
            assert kernels.matvec is not original
            llm.model.forward([4], llm.cache)
        per_token = timers.per_token(1)
    assert kernels.matvec is original
    n_layer = llm.model.hparams.n_layer
    assert {"matvec attn_q", "matvec ffn_down", "matvec token_embd", "attention", "rms_norm", "other"} <= set(per_token)
    assert sum(per_token.values()) == pytest.approx(timers.wall_seconds)
    for role in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
        assert timers.calls[f"matvec {role}"] == n_layer
    assert timers.calls["attention"] == n_layer
    assert timers.calls["matvec token_embd"] == 1  # the tied output head


def test_draft_adds_a_speculative_generation_row_with_its_acceptance(model_path):
    result = run_bench(
        "-m", str(model_path(SMOLLM)), "-p", "0", "-n", "48", "-r", "1", "--threads", "1", "--draft", "lookup", "--json"
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    plain, speculative = json.loads(result.stdout)
    assert (plain["test"], speculative["test"]) == ("tg48", "tg48+lookup")
    assert plain["draft"] is None and plain["acceptance_rate"] is None
    assert speculative["n_gen"] == 48 and speculative["draft"] == "lookup"
    # Greedy text from BOS repeats itself within 48 tokens, so prompt lookup finds drafts.
    assert 0 < speculative["acceptance_rate"] <= 1
    assert speculative["mean_accepted_length"] > 0
    assert plain["roofline_ts"] > 0 and speculative["roofline_ts"] is None


@pytest.mark.parametrize("args, fragment", [
    (("-r", "0"), "-r must be an integer >= 1"),
    (("--draft-max", "4"), "--draft-max needs --draft"),
    (("-p", "0", "-n", "0"), "nothing to measure"),
    (("-m", "no-such-model"), "no-such-model"),
])  # fmt: skip
def test_bad_options_give_one_line_errors(args, fragment, model_path):
    base = () if "-m" in args else ("-m", str(model_path(SMOLLM)))
    result = run_bench(*base, *args)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("localllm: error: ") and fragment in lines[0], result.stderr


def test_compare_script_explains_how_to_get_llama_cpp_when_missing():
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "compare_llamacpp.py"), "--llama-python", "/bin/false"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "pip install llama-cpp-python==0.3.36" in result.stdout
