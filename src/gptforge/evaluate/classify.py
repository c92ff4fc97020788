"""Validation loss and accuracy of an image classifier on a fixed set of batches."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gptforge.runtime import Precision

TOP5_MIN_CLASSES = 10  # top-5 accuracy is reported where it says something: ten classes or more


@torch.no_grad()
def evaluate_classifier(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], precision: Precision,
                        device: torch.device | str = "cpu", world=None) -> dict[str, float | None]:
    """Mean cross entropy per image (nats, no label smoothing), top-1 and (with ten classes or more) top-5
    accuracy over `batches` of (images, labels). With a `world` of several processes the sums are
    all-reduced. The model's train/eval mode is put back as it was."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # nats, images, top-1 hits, top-5 hits
    classes = 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with precision.autocast():
            logits = model(x).float()  # (B, num_classes)
        classes = logits.size(-1)
        totals[0] += F.cross_entropy(logits, y, reduction="sum").double()
        totals[1] += y.numel()
        top = logits.topk(min(5, classes), dim=-1).indices  # (B, 5)
        totals[2] += (top[:, 0] == y).sum()
        totals[3] += (top == y[:, None]).any(dim=-1).sum()
    model.train(was_training)
    if world is not None:
        world.all_reduce(totals)
    nats, count, top1, top5 = totals.tolist()
    loss = nats / count
    result = {"val_loss": loss, "val_acc": top1 / count, "val_bpb": None, "perplexity": math.exp(min(loss, 700.0))}
    if classes >= TOP5_MIN_CLASSES:
        result["val_top5"] = top5 / count
    return result


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, top: int = 5) -> list[list[tuple[int, float]]]:
    """The `top` most probable classes of each uint8 image (B, S, S, C), as (class index, probability)."""
    model.eval()
    probs = torch.softmax(model(images).float(), dim=-1)  # (B, num_classes)
    values, indices = probs.topk(min(top, probs.size(-1)), dim=-1)
    return [list(zip(i.tolist(), v.tolist())) for i, v in zip(indices, values)]
