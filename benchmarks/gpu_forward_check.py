"""The GPU forward path against the CPU's logits, for a CUDA machine that has no model store.

SmolLM2-135M (98 MB) is trimmed to its first layers, every tensor, type and metadata key kept
(block_count aside), and the CPU path's logits for a few cases are saved beside it; the CUDA
machine then needs only this repository, the two files and the gpu extra.

Here, with the catalog model in the store:

    python benchmarks/gpu_forward_check.py make OUT_DIR [--layers 6]

writes OUT_DIR/smollm2-trimmed.gguf (about 45 MB at 6 layers: the Q8_0 embedding is most of it)
and OUT_DIR/cpu_logits.npz. There:

    python benchmarks/gpu_forward_check.py check OUT_DIR [--cpu] [--cases short,long]

runs the same tokens through LLM(device="cuda") and compares by tests/test_models.py's measures
(top-1 agreement, median and largest |delta| over each row's CPU top 10); --cpu recomputes the
CPU logits there as well. Each case is a prompt (all its logits) and then decode steps that feed
the CPU's greedy tokens, so the rows line up; it runs twice, the second time timed (the first
compiles the Triton kernels). Exit status 1 when a case is out of tolerance. Without CUDA,
TRITON_INTERPRET=1 runs the check through Triton's interpreter (minutes; try --cases short).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from localllm.errors import LocalLLMError
from localllm.runtime.catalog import ensure_model
from localllm.runtime.llm import LLM

MODEL = "smollm2-135m-instruct"
TRIMMED = "smollm2-trimmed.gguf"
LOGITS = "cpu_logits.npz"
# tests/test_models.py: what the CPU path meets against llama.cpp, applied here to GPU vs CPU.
TOP1_AGREEMENT, MEDIAN_DELTA, MAX_DELTA = 0.90, 0.4, 3.0
PROMPTS = {
    "short": ("The capital of France is Paris. The capital of Germany is", 4),
    # Past one attention chunk of keys and through the matmul path with many rows.
    "long": (" ".join(f"Item {i}: the {i}th line of a numbered list." for i in range(1, 21)), 2),
}


def trim(source: Path, destination: Path, layers: int) -> None:
    """The first `layers` layers of the GGUF at `source`, written to `destination`."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    reader = GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    writer = GGUFWriter(destination, arch, use_temp_file=False)
    for field in reader.fields.values():
        # GGUF.* are the reader's view of the header; the writer adds the architecture itself.
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        value = layers if field.name == f"{arch}.block_count" else field.contents()
        writer.add_key_value(field.name, value, vtype, sub_type=sub_type)
    for tensor in reader.tensors:
        if tensor.name.startswith("blk.") and int(tensor.name.split(".")[1]) >= layers:
            continue
        writer.add_tensor(tensor.name, tensor.data, raw_shape=tensor.data.shape, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def run_case(llm: LLM, prompt: list[int], steps: list[int]) -> tuple[np.ndarray, float, float]:
    """Logits of every prompt position and of each decode step feeding `steps`, with the
    prefill's seconds and the decode steps' tokens per second."""
    started = time.perf_counter()
    rows = [llm.logits(prompt)]
    prefill = time.perf_counter() - started
    started = time.perf_counter()
    rows += [llm.model.forward([token], llm.cache)[None] for token in steps]
    decode = time.perf_counter() - started
    return np.vstack(rows), prefill, len(steps) / decode if steps else 0.0


def make(out: Path, layers: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    trimmed = out / TRIMMED
    trim(ensure_model(MODEL), trimmed, layers)
    saved = {}
    with LLM(trimmed, n_ctx=512, quantize_activations=False) as llm:
        for name, (text, n_steps) in PROMPTS.items():
            prompt = llm.tokenize(text)
            rows = [llm.logits(prompt)]
            steps = []
            for _ in range(n_steps):
                steps.append(int(np.argmax(rows[-1][-1])))
                rows.append(llm.model.forward([steps[-1]], llm.cache)[None])
            saved[f"{name}_prompt"] = np.array(prompt)
            saved[f"{name}_steps"] = np.array(steps)
            # Only what the measures read (full logits would be 60 MB): each row's top 10.
            logits = np.vstack(rows)
            saved[f"{name}_top10"] = np.argsort(-logits, axis=-1)[:, :10]
            saved[f"{name}_values"] = np.take_along_axis(logits, saved[f"{name}_top10"], -1)
            print(f"{name}: {len(prompt)} prompt tokens, {len(steps)} decode steps")
    np.savez(out / LOGITS, **saved)
    print(f"wrote {trimmed} ({trimmed.stat().st_size / 1e6:.1f} MB) and {out / LOGITS}")


def agreement(logits: np.ndarray, top10: np.ndarray, values: np.ndarray) -> tuple[float, float, float]:
    """Top-1 agreement with the saved rows, and the median and largest |delta| over their top 10."""
    deltas = np.abs(np.take_along_axis(logits, top10, -1) - values)
    return float(np.mean(logits.argmax(-1) == top10[:, 0])), float(np.median(deltas)), float(deltas.max())


def check(out: Path, cases: list[str], recompute_cpu: bool) -> int:
    saved = np.load(out / LOGITS)
    failed = False
    devices = [("cuda", {"device": "cuda"})]
    if recompute_cpu:
        devices.append(("cpu (here)", {"quantize_activations": False}))
    for label, options in devices:
        with LLM(out / TRIMMED, n_ctx=512, **options) as llm:
            if label == "cuda":
                _describe(llm)
            for name in cases:
                prompt = [int(t) for t in saved[f"{name}_prompt"]]
                steps = [int(t) for t in saved[f"{name}_steps"]]
                run_case(llm, prompt, steps)
                logits, prefill, decode_rate = run_case(llm, prompt, steps)
                top1, median, worst = agreement(logits, saved[f"{name}_top10"], saved[f"{name}_values"])
                ok = top1 >= TOP1_AGREEMENT and median <= MEDIAN_DELTA and worst <= MAX_DELTA
                failed |= not ok
                print(
                    f"{label} {name}: {len(prompt)} + {len(steps)} tokens, top-1 {top1:.1%}, median |d| "
                    f"{median:.4f}, max |d| {worst:.4f} -> {'ok' if ok else 'OUT OF TOLERANCE'}; prefill "
                    f"{prefill * 1000:.1f} ms, decode {decode_rate:.1f} tokens/s"
                )
    return 1 if failed else 0


def _describe(llm: LLM) -> None:
    import torch

    target = llm.device.target
    name = torch.cuda.get_device_name(target) if target.type == "cuda" else "CPU tensors, Triton interpreter"
    print(f"device: {name}; torch {torch.__version__}; {llm.model.hparams.n_layer} layers")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make_parser = commands.add_parser("make", help="trim the model and save the CPU logits (here)")
    make_parser.add_argument("out", type=Path)
    make_parser.add_argument("--layers", type=int, default=6)
    check_parser = commands.add_parser("check", help="compare the GPU's logits with the saved ones (there)")
    check_parser.add_argument("out", type=Path)
    check_parser.add_argument("--cases", default=",".join(PROMPTS), help="comma-separated: " + ", ".join(PROMPTS))
    check_parser.add_argument("--cpu", action="store_true", help="also recompute the CPU logits on this machine")
    args = parser.parse_args()
    try:
        if args.command == "make":
            make(args.out, args.layers)
            return 0
        return check(args.out, args.cases.split(","), args.cpu)
    except LocalLLMError as error:
        print(f"gpu_forward_check: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
