"""Looking inside a GPT on one prompt: attention maps, the logit lens and token attributions.

The model attends through scaled_dot_product_attention and never materializes its attention weights, so
they are recomputed here from what each attention module received, captured by forward pre-hooks: its
input (after ln_1) and the rotary tables the model handed it. The recomputation applies the module's own
q/k norms and the model's own rotary helper; its test checks that weights @ values, merged over heads and
projected by c_proj, reproduce the module's output.

The logit lens reads the residual stream before the first block and after each block through the final
norm and the head; after the last block that is exactly the model's output. Attributions are gradient x
input on the token embeddings for the logit of the model's top next-token prediction, summed over the
embedding dimension: how much each input token pushes that prediction up (positive) or down.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from gptforge.data.tokenizer import Tokenizer
from gptforge.errors import GptforgeError
from gptforge.evaluate.generate import prompt_ids
from gptforge.model.gpt import GPT, CausalSelfAttention, apply_rotary


def recompute_attention(attn: CausalSelfAttention, x: torch.Tensor,
                        rope: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention weights (B, nh, T, T) and values (B, nh, T, hd) of `attn` for its input x (B, T, C).

    The same steps as CausalSelfAttention.forward up to the attention itself, which is written out:
    softmax(q k^T / sqrt(hd)) under a causal mask.
    """
    B, T, C = x.shape
    hd = C // attn.n_head
    q, k, v = (t.view(B, T, attn.n_head, hd).transpose(1, 2) for t in attn.c_attn(x).split(C, dim=2))
    if attn.q_norm is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
    scores = q @ k.transpose(-2, -1) / math.sqrt(hd)  # (B, nh, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(dim=-1), v


def inspect_run(model: GPT, tokenizer: Tokenizer, prompt: str, *, top_k: int = 5,
                device: str | torch.device = "cpu") -> dict:
    """Attention, logit lens and attributions for `prompt`, read after the end-of-text token as sampling does.

    Returns tokens and ids; attention: per layer an array (n_head, T, T); logit_lens: per layer (embeddings,
    then block 0 ... block N-1) the top_k tokens with probabilities at every position; prediction: the
    model's top next token; attributions: one value per input token.
    """
    ids = prompt_ids(tokenizer, prompt)
    if len(ids) > model.config.block_size:
        raise GptforgeError(f"the prompt is {len(ids) - 1} tokens; the model's context holds "
                            f"{model.config.block_size - 1} after the end-of-text token")
    if not 1 <= top_k <= model.config.vocab_size:
        raise GptforgeError(f"--top-k must be in [1, {model.config.vocab_size}], got {top_k}")
    was_training = model.training
    model.eval()
    try:
        captured = _forward_with_hooks(model, torch.tensor([ids], device=device))
    finally:
        model.train(was_training)
    logits, embeddings = captured["logits"], captured["embeddings"]
    predicted = int(logits[0, -1].argmax())
    (grad,) = torch.autograd.grad(logits[0, -1, predicted], embeddings)
    attributions = (grad * embeddings).sum(-1)[0]  # (T,)
    with torch.no_grad():
        attention = [recompute_attention(attn, x, rope)[0][0].cpu().numpy() for attn, x, rope in captured["attn"]]
        lens = [{"layer": name, "top": _top_k(model, tokenizer, h, top_k)} for name, h in captured["residuals"]]
        prob = float(logits[0, -1].float().softmax(-1)[predicted])
    return {
        "prompt": prompt,
        "ids": ids,
        "tokens": [tokenizer.decode([i]) for i in ids],
        "prediction": {"id": predicted, "token": tokenizer.decode([predicted]), "prob": prob},
        "attention": attention,
        "logit_lens": lens,
        "attributions": attributions.detach().cpu().tolist(),
    }


def _forward_with_hooks(model: GPT, idx: torch.Tensor) -> dict:
    """One forward pass that keeps each attention module's input and rotary tables, the residual stream
    around every block, and the token embeddings as a tensor to differentiate the logits against."""
    captured: dict = {"attn": [], "residuals": []}

    def embed(module, args, output):
        # A fresh leaf, so attributions work whether or not the weights require grad.
        captured["embeddings"] = output.detach().requires_grad_()
        return captured["embeddings"]

    def attention_input(module, args):
        x, rope = args[0], args[1]  # then the cache and the mask (None: one causal document)
        captured["attn"].append((module, x.detach(), rope))

    def block_input(module, args):
        captured["residuals"].append(("embeddings", args[0].detach()))

    def block_output(index):
        return lambda module, args, output: captured["residuals"].append((f"block {index}", output.detach()))

    blocks = model.transformer.h
    handles = [model.transformer.wte.register_forward_hook(embed), blocks[0].register_forward_pre_hook(block_input)]
    for i, block in enumerate(blocks):
        handles += [block.attn.register_forward_pre_hook(attention_input), block.register_forward_hook(block_output(i))]
    try:
        with torch.enable_grad():
            captured["logits"] = model(idx)  # (1, T, vocab_size)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def _top_k(model: GPT, tokenizer: Tokenizer, hidden: torch.Tensor, k: int) -> list[list[dict]]:
    """The k likeliest tokens, with probabilities, at every position of a residual stream (1, T, C)."""
    probs = model.logits(model.transformer.ln_f(hidden))[0].float().softmax(-1)  # (T, vocab_size)
    top = probs.topk(k, dim=-1)
    return [[{"id": i, "token": tokenizer.decode([i]), "prob": p} for i, p in zip(ids, ps)]
            for ids, ps in zip(top.indices.tolist(), top.values.tolist())]


# ----------------------------------------------------------------------------------------------------------
# Output


def write_inspection(result: dict, out_dir: str | Path) -> list[Path]:
    """One PNG of attention maps per layer (heads side by side) and inspect.json with everything else."""
    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = [_label(t).replace("$", r"\$") for t in result["tokens"]]  # a bare $ would start matplotlib mathtext
    paths = []
    for layer, weights in enumerate(result["attention"]):
        paths.append(out / f"attention_layer_{layer}.png")
        _plot_layer(plt, weights, labels, f"layer {layer}", paths[-1])
    paths.append(out / "inspect.json")
    data = {key: value for key, value in result.items() if key != "attention"}  # the maps are in the PNGs
    paths[-1].write_text(json.dumps(data, indent=1), encoding="utf-8")
    return paths


def _plot_layer(plt, weights: np.ndarray, labels: list[str], title: str, path: Path) -> None:
    """A grid of one layer's heads, four to a row, with the tokens as ticks (every k-th past 48 tokens)."""
    n_head, T = weights.shape[0], weights.shape[1]
    cols = min(n_head, 4)
    rows = math.ceil(n_head / cols)
    side = min(max(3.0, 0.22 * T), 12.0)
    fig, axes = plt.subplots(rows, cols, figsize=(side * cols, side * rows), squeeze=False, constrained_layout=True)
    step = math.ceil(T / 48)  # at most 48 labels per axis stay readable
    ticks = list(range(0, T, step))
    for h, ax in enumerate(axes.flat):
        if h >= n_head:
            ax.axis("off")
            continue
        ax.imshow(weights[h], cmap="viridis", vmin=0.0)
        ax.set_title(f"{title}, head {h}")
        ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=90, fontsize=7)
        ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize=7)
        if h >= n_head - cols:  # bottom row
            ax.set_xlabel("attended token (key)")
        if h % cols == 0:  # left column
            ax.set_ylabel("attending token (query)")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _label(token: str) -> str:
    """A token as a tick label or table cell: spaces as "·", newlines and other control characters escaped."""
    return "".join("·" if c == " " else c if c.isprintable() else repr(c)[1:-1] for c in token)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise GptforgeError("attention maps need matplotlib, which is not installed: "
                            "pip install 'gptforge[plot]'") from None
    return plt


def print_inspection(result: dict) -> None:
    """The logit lens at the last position, layer by layer, and the attribution of every input token."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 160, highlight=False)
    prediction = result["prediction"]
    lens = Table(title=f"logit lens at the last position (the model predicts "
                       f"'{escape(_label(prediction['token']))}', p={prediction['prob']:.3f})", title_justify="left")
    lens.add_column("layer")
    for rank in range(len(result["logit_lens"][0]["top"][-1])):
        lens.add_column(f"top {rank + 1}")
    for layer in result["logit_lens"]:
        lens.add_row(layer["layer"], *(f"{escape(_label(t['token']))} {t['prob']:.3f}" for t in layer["top"][-1]))
    console.print(lens)

    attributions = Table(title="gradient x input attribution of each token to that prediction", title_justify="left")
    for header in ("position", "token", "attribution"):
        attributions.add_column(header, justify="left" if header == "token" else "right")
    for pos, (token, value) in enumerate(zip(result["tokens"], result["attributions"])):
        attributions.add_row(str(pos), escape(_label(token)), f"{value:+.4f}")
    console.print(attributions)


# ----------------------------------------------------------------------------------------------------------
# Command line


def run_inspect(args: argparse.Namespace) -> int:
    """`gptforge inspect`: print the tables; with --out, write the maps and the JSON too."""
    from gptforge.runs import load_run
    from gptforge.runtime import pick_device

    if args.out:
        _pyplot()  # fail before loading the model, not after
    device = pick_device(args.device)
    run = load_run(args.run_dir, device, report=lambda m: print(m, file=sys.stderr))
    if run.tokenizer is None:
        raise GptforgeError(f"{run.checkpoint} has no tokenizer.json: cannot turn the prompt into tokens")
    result = inspect_run(run.model, run.tokenizer, args.prompt, top_k=args.top_k, device=device)
    print_inspection(result)
    if args.out:
        paths = write_inspection(result, args.out)
        print(f"wrote {len(paths) - 1} attention map(s) and {paths[-1].name} to {args.out}")
    return 0
