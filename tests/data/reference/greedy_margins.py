"""Make `<model>.greedy_margins.json`: how far llama.cpp's greedy choices are from a tie.

The reference files hold llama.cpp's greedy continuation of each case, but top-10 logits only
over the prompt. A greedy token whose logit beats the runner-up by a hair can fall the other way
on another CPU (float results differ in the last bits), so tests compare greedy sequences only
up to the first near-tie. This script feeds prompt + greedy continuation through llama.cpp once
and records, for each greedy token, its logit minus the best other logit at that step (negative
where this build of llama.cpp would itself pick another token there).

Run with an interpreter that has llama-cpp-python 0.3.36 (the version that made the reference):
    python tests/data/reference/greedy_margins.py ~/.cache/localllm/models/*.gguf
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
FILES = {
    "SmolLM2-135M-Instruct.Q4_1.gguf": "smollm2-135m-instruct",
    "gemma-3-270m-q4_k_m.gguf": "gemma-3-270m",
    "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf": "qwen2.5-coder-0.5b-instruct",
    "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf": "qwen2.5-coder-1.5b-instruct",
}
THREADS = 2


def margins(llm, prompt: list[int], greedy: list[int]) -> list[float]:
    llm.reset()
    llm.eval(prompt + greedy[:-1])
    # scores row i holds the logits after token i; the row before greedy[k] is len(prompt) - 1 + k.
    rows = np.asarray(llm.scores[len(prompt) - 1 : len(prompt) - 1 + len(greedy)], dtype=np.float64)
    result = []
    for row, token in zip(rows, greedy):
        chosen = row[token]
        row = row.copy()
        row[token] = -np.inf
        result.append(round(float(chosen - row.max()), 4))
    return result


def main(paths: list[str]) -> None:
    import llama_cpp

    for path in paths:
        name = FILES[Path(path).name]
        reference = json.loads((HERE / f"{name}.json").read_text())
        llm = llama_cpp.Llama(
            path, n_ctx=2048, n_batch=512, n_threads=THREADS, n_threads_batch=THREADS, logits_all=True, verbose=False
        )
        cases = {case["name"]: {"margins": margins(llm, case["tokens"], case["greedy"])} for case in reference["cases"]}
        out = {
            "model": reference["model"],
            "made_by": f"llama-cpp-python {llama_cpp.__version__} (llama.cpp CPU, {THREADS} threads, f16 KV), "
            "tests/data/reference/greedy_margins.py",
            "cases": cases,
        }
        (HERE / f"{name}.greedy_margins.json").write_text(json.dumps(out, indent=1) + "\n")
        print(name, {case: min(v["margins"]) for case, v in cases.items()})


if __name__ == "__main__":
    main(sys.argv[1:])
