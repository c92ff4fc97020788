"""Does llama.cpp itself load gptforge's GGUF and compute the same model? Through llama-cpp-python: the same
token ids for a prompt, logits close to gptforge's at every position, and the same greedy tokens.

Not part of the test suite: llama-cpp-python compiles llama.cpp when installed (many minutes on 2 cores).
Install it in a temporary virtual environment that also sees gptforge's dependencies, on a quiet machine:

    python -m venv --system-site-packages /tmp/llcpp && flock -x /tmp/cpu.lock /tmp/llcpp/bin/pip install llama-cpp-python
    flock -x /tmp/cpu.lock /tmp/llcpp/bin/python benchmarks/gguf_llama_cpp.py RUN_DIR [--dtype f32] [--families]

--families adds, for each GGUF architecture, a small model of random weights (every parameter drawn, so
no block is the identity) with the run's tokenizer. Writes benchmarks/results/gguf_llama_cpp.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

PROMPT = "def parse(self, text):\n    "


FAMILIES = {"apertus": {}, "llama": dict(mlp="swiglu", qk_norm=False), "qwen3": dict(mlp="swiglu"),
            "arcee": dict(qk_norm=False, tie_embeddings=False),
            "gpt2": dict(pos="learned", norm="layernorm", mlp="gelu", qk_norm=False, bias=True)}


def random_run(path: Path, source, **model) -> Path:
    """A small model of random weights with `source`'s tokenizer, saved as a run."""
    from gptforge.config import from_dict
    from gptforge.model.gpt import GPT
    from gptforge.train.checkpoint import save_weights

    cfg = from_dict({"model": {"vocab_size": source.config.model.vocab_size, "n_layer": 2, "n_head": 4,
                               "n_embd": 128, "block_size": 128, **model}})
    torch.manual_seed(0)
    gpt = GPT(cfg.model)
    with torch.no_grad():
        for p in gpt.parameters():
            p.copy_(torch.randn_like(p) * 0.05 + (1.0 if p.dim() == 1 else 0.0))
    save_weights(path, gpt, cfg.to_dict(), step=1, tokenizer_file=source.checkpoint / "tokenizer.json")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--dtype", default="f32", choices=("f32", "f16", "q8_0"))
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--families", action="store_true", help="also a random model of each GGUF architecture")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "gguf_llama_cpp.json"))
    args = parser.parse_args()

    from gptforge.runs import load_run

    records = [check(args.run, args.dtype, args.tokens)]
    if args.families:
        with tempfile.TemporaryDirectory() as tmp:
            source = load_run(args.run)
            for name, model in FAMILIES.items():
                record = check(random_run(Path(tmp) / name, source, **model), args.dtype, args.tokens)
                records.append({"family": name, **record})
    print(json.dumps(records, indent=1))
    Path(args.out).write_text(json.dumps(records, indent=1) + "\n")


def check(run: Path, dtype: str, n_tokens: int) -> dict:
    """llama.cpp against gptforge on the GGUF export of `run`."""
    from llama_cpp import Llama

    from gptforge.adapt.gguf_export import export_gguf
    from gptforge.evaluate.generate import generate
    from gptforge.runs import load_run

    loaded = load_run(run)
    tok, model = loaded.tokenizer, loaded.model
    with tempfile.TemporaryDirectory() as tmp:
        path = export_gguf(run, Path(tmp) / "model.gguf", dtype, report=lambda m: None)
        llm = Llama(model_path=str(path), n_ctx=loaded.config.model.block_size, logits_all=True, verbose=False)
        ours_ids = [tok.eot_id, *tok.encode(PROMPT)]
        theirs_ids = llm.tokenize(PROMPT.encode("utf-8"), add_bos=True, special=False)
        llm.reset()
        llm.eval(ours_ids)
        their_logits = np.array(llm.scores[:len(ours_ids)])  # (T, vocab)
        with torch.no_grad():
            our_logits = model(torch.tensor([ours_ids]))[0].float().numpy()  # (T, vocab)
        greedy_ours = generate(model, ours_ids, n_tokens, temperature=0.0)
        llm.reset()
        greedy_theirs = []
        for token in llm.generate(ours_ids, temp=0.0, top_k=1, reset=True):
            greedy_theirs.append(int(token))
            if len(greedy_theirs) == n_tokens:
                break
    diff = np.abs(their_logits - our_logits)
    m = loaded.config.model
    return {"run": str(run), "switches": f"pos={m.pos} norm={m.norm} mlp={m.mlp} qk_norm={m.qk_norm} bias={m.bias}",
            "dtype": dtype, "prompt": PROMPT, "token_ids_equal": list(theirs_ids) == ours_ids,
            "logits_max_abs_diff": float(diff.max()), "logits_mean_abs_diff": float(diff.mean()),
            "logit_scale": float(np.abs(our_logits).max()),
            "greedy_tokens_equal": greedy_theirs == greedy_ours, "greedy_tokens": n_tokens,
            "gptforge_text": tok.decode(greedy_ours), "llama_cpp_text": tok.decode(greedy_theirs)}


if __name__ == "__main__":
    main()
