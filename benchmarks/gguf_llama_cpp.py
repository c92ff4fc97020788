"""Does llama.cpp itself load gptforge's GGUF and compute the same model? Through llama-cpp-python: the same
token ids for a prompt, logits close to gptforge's at every position, and the same greedy tokens.

Not part of the test suite: llama-cpp-python compiles llama.cpp when installed (many minutes on 2 cores).
Install it in a temporary virtual environment that also sees gptforge's dependencies, on a quiet machine:

    python -m venv --system-site-packages /tmp/llcpp && flock -x /tmp/cpu.lock /tmp/llcpp/bin/pip install llama-cpp-python
    flock -x /tmp/cpu.lock /tmp/llcpp/bin/python benchmarks/gguf_llama_cpp.py RUN_DIR [--dtype f32]

Writes benchmarks/results/gguf_llama_cpp.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

PROMPT = "def parse(self, text):\n    "


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--dtype", default="f32", choices=("f32", "f16", "q8_0"))
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "gguf_llama_cpp.json"))
    args = parser.parse_args()

    from llama_cpp import Llama

    from gptforge.adapt.gguf_export import export_gguf
    from gptforge.evaluate.generate import generate
    from gptforge.runs import load_run

    loaded = load_run(args.run)
    tok, model = loaded.tokenizer, loaded.model
    with tempfile.TemporaryDirectory() as tmp:
        path = export_gguf(args.run, Path(tmp) / "model.gguf", args.dtype)
        llm = Llama(model_path=str(path), n_ctx=loaded.config.model.block_size, logits_all=True, verbose=False)
        ours_ids = [tok.eot_id, *tok.encode(PROMPT)]
        theirs_ids = llm.tokenize(PROMPT.encode("utf-8"), add_bos=True, special=False)
        llm.reset()
        llm.eval(ours_ids)
        their_logits = np.array(llm.scores[:len(ours_ids)])  # (T, vocab)
        with torch.no_grad():
            our_logits = model(torch.tensor([ours_ids]))[0].float().numpy()  # (T, vocab)
        greedy_ours = generate(model, ours_ids, args.tokens, temperature=0.0)
        llm.reset()
        greedy_theirs = []
        for token in llm.generate(ours_ids, temp=0.0, top_k=1, reset=True):
            greedy_theirs.append(int(token))
            if len(greedy_theirs) == args.tokens:
                break
    diff = np.abs(their_logits - our_logits)
    record = {"run": str(args.run), "dtype": args.dtype, "prompt": PROMPT,
              "token_ids_equal": list(theirs_ids) == ours_ids,
              "logits_max_abs_diff": float(diff.max()), "logits_mean_abs_diff": float(diff.mean()),
              "logit_scale": float(np.abs(our_logits).max()),
              "greedy_tokens_equal": greedy_theirs == greedy_ours, "greedy_tokens": args.tokens,
              "gptforge_text": tok.decode(greedy_ours), "llama_cpp_text": tok.decode(greedy_theirs)}
    print(json.dumps(record, indent=1))
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
