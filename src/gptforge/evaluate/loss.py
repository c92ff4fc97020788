"""Validation loss, bits per byte and perplexity on a fixed set of batches."""

from __future__ import annotations

import math

import torch
from torch import nn

from gptforge.runtime import Precision


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    precision: Precision,
    token_bytes: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    world=None,
) -> dict[str, float]:
    """Mean loss per token (nats), bits per byte and perplexity over `batches` (over the targets that count:
    for chat data the assistant's tokens).

    Bits per byte divides the summed loss by the UTF-8 bytes the target tokens stand for, so models with
    different tokenizers can be compared; it is None when the tokenizer is unknown. With a `world` of several
    processes, each evaluates its share and the sums are all-reduced.
    """
    was_training = model.training
    model.eval()
    byte_table = token_bytes.to(device) if token_bytes is not None else None
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # nats, tokens, bytes: read once, at the end
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with precision.autocast():
            losses = model(x, y, reduction="none")  # (B, T)
        counted = y >= 0  # (B, T) chat data: -1 marks a target the loss mask leaves out
        totals[0] += losses.double().sum()
        totals[1] += counted.sum()
        if byte_table is not None:
            totals[2] += (byte_table[y.clamp(min=0)] * counted).sum()
    model.train(was_training)
    if world is not None:
        world.all_reduce(totals)
    nats, count, nbytes = totals.tolist()
    loss = nats / count
    bpb = nats / (math.log(2) * nbytes) if nbytes else None
    return {"val_loss": loss, "val_bpb": bpb, "perplexity": math.exp(min(loss, 700.0))}
