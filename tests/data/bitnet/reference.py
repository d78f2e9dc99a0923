"""Make tests/data/reference/bitnet-synthetic.json (and .greedy_margins.json): what llama.cpp
computes on the synthetic BitNet model of synthetic.py, in the format of the catalog models'
reference files (../shared/reference/README.md): per case the tokens, the top-10 logits at
every prompt position and a 16-token greedy continuation; and each greedy token's margin over
the runner-up.

Run with an interpreter that has llama-cpp-python 0.3.36 (see benchmarks/compare_llamacpp.py),
on the file synthetic.py wrote:
    python tests/data/bitnet/synthetic.py SMOLLM2_GGUF /tmp/bitnet-synthetic.gguf
    /path/to/llama-venv/bin/python tests/data/bitnet/reference.py /tmp/bitnet-synthetic.gguf
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

REFERENCE = Path(__file__).parents[1] / "reference"
NAME = "bitnet-synthetic"
THREADS = 2
GREEDY_TOKENS = 16
CASES = {
    "plain": "The capital of France is",
    "code": "def fibonacci(n):\n    ",
    "long": (
        "The GNU General Public License is a free, copyleft license for software and other kinds of works. "
        "The licenses for most software and other practical works are designed to take away your freedom to "
        "share and change the works. By contrast, the GNU General Public License is intended to guarantee your "
        "freedom to share and change all versions of a program--to make sure it remains free software for all "
        "its users."
    ),
}


def main(path: str) -> None:
    import llama_cpp

    llm = llama_cpp.Llama(
        path, n_ctx=512, n_batch=512, n_threads=THREADS, n_threads_batch=THREADS, logits_all=True, verbose=False
    )
    cases, margins = [], {}
    for name, text in CASES.items():
        tokens = llm.tokenize(text.encode(), add_bos=llm.metadata.get("tokenizer.ggml.add_bos_token") == "true")
        llm.reset()
        llm.eval(tokens)
        scores = np.asarray(llm.scores[: len(tokens)], dtype=np.float64)
        top10 = [[[int(i), round(float(row[i]), 4)] for i in np.argsort(-row)[:10]] for row in scores]
        greedy = [int(np.argmax(scores[-1]))]
        while len(greedy) < GREEDY_TOKENS:
            llm.eval([greedy[-1]])
            greedy.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.reset()
        llm.eval(tokens + greedy[:-1])
        rows = np.asarray(llm.scores[len(tokens) - 1 : len(tokens) - 1 + len(greedy)], dtype=np.float64)
        case_margins = []
        for row, token in zip(rows, greedy):
            others = row.copy()
            others[token] = -np.inf
            case_margins.append(round(float(row[token] - others.max()), 4))
        margins[name] = {"margins": case_margins}
        text_out = llm.detokenize(greedy).decode("utf-8", errors="replace")
        cases.append(
            {"name": name, "text": text, "special": False, "tokens": tokens, "top10": top10, "greedy": greedy,
             "greedy_text": text_out}
        )  # fmt: skip
    made_by = (
        f"llama-cpp-python {llama_cpp.__version__} (llama.cpp CPU, {THREADS} threads, f16 KV), "
        "tests/data/bitnet/reference.py"
    )
    sha256 = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    reference = {"model": NAME, "n_vocab": llm.n_vocab(), "file_sha256": sha256, "made_by": made_by, "cases": cases}
    (REFERENCE / f"{NAME}.json").write_text(json.dumps(reference) + "\n")
    out = {"model": NAME, "made_by": made_by, "cases": margins}
    (REFERENCE / f"{NAME}.greedy_margins.json").write_text(json.dumps(out, indent=1) + "\n")
    print(NAME, sha256, {name: min(m["margins"]) for name, m in margins.items()})


if __name__ == "__main__":
    main(sys.argv[1])
