"""Validation loss and accuracy of an image classifier on a fixed set of batches."""

from __future__ import annotations

import math
import sys

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


# ---------------------------------------------------------------- gptforge eval / predict on an image model


def run_eval_images(args, run, device) -> int:
    """`gptforge eval RUN_DIR` for an image model: loss and accuracy on its val split (or --data DIR's)."""
    import json

    from gptforge.data.image_loader import image_val_batches
    from gptforge.data.images import load_images
    from gptforge.errors import GptforgeError
    from gptforge.progress import Progress
    from gptforge.runtime import resolve_precision
    from gptforge.train.builder import resolve_data

    cfg = run.config
    data = load_images(args.data) if args.data else resolve_data(cfg)
    if data.model_fields() != {k: getattr(cfg.model, k) for k in data.model_fields()}:
        raise GptforgeError(f"{data.path} holds {len(data.classes)} classes of {data.image_size}x{data.image_size}x"
                            f"{data.channels} images; the model of {args.run_dir} takes {cfg.model.num_classes} of "
                            f"{cfg.model.image_size}x{cfg.model.image_size}x{cfg.model.image_channels}")
    batches = image_val_batches(data, args.batch_size or cfg.train.batch_size, args.tokens or cfg.eval.tokens)
    with Progress("eval", len(batches), "batches") as bar:
        result = evaluate_classifier(run.model, bar.track(batches), resolve_precision(args.precision, device), device)
    result.update(step=run.state["step"], checkpoint=str(run.checkpoint), images=sum(len(y) for _, y in batches))
    if args.json:
        print(json.dumps(result))
        return 0
    top5 = f" | top-5 {100 * result['val_top5']:.2f}%" if "val_top5" in result else ""
    print(f"{run.checkpoint} (step {result['step']}) on {data.path} val, {result['images']:,} images")
    print(f"val loss {result['val_loss']:.4f} | accuracy {100 * result['val_acc']:.2f}%{top5}")
    return 0


def run_predict(args) -> int:
    """`gptforge predict RUN_DIR IMAGE...`: each image's top classes with their probabilities."""
    import json
    from pathlib import Path

    import numpy as np

    from gptforge.data.images import _open_image, class_names
    from gptforge.errors import GptforgeError
    from gptforge.model import IMAGE_ARCHITECTURES
    from gptforge.runs import load_run
    from gptforge.runtime import pick_device

    if args.top < 1:
        raise GptforgeError(f"--top must be at least 1, got {args.top}")
    device = pick_device(args.device)
    run = load_run(args.run_dir, device, report=lambda m: print(m, file=sys.stderr))
    m = run.config.model
    if m.arch not in IMAGE_ARCHITECTURES:
        raise GptforgeError(f"{args.run_dir} is a model.arch={m.arch} run; predict classifies images with a "
                            "model.arch=cnn run (for text, gptforge sample)")
    images = []
    for name in args.images:
        image = _open_image(Path(name), m.image_size, m.image_channels)
        if isinstance(image, str):
            raise GptforgeError(f"{name}: cannot be classified ({image})")
        images.append(image)
    names = class_names(run.checkpoint, m.num_classes)
    tops = predict(run.model, torch.from_numpy(np.stack(images)).to(device), args.top)
    for name, top in zip(args.images, tops):
        ranked = [(names[i], p) for i, p in top]
        if args.json:
            print(json.dumps({"image": name, "top": [{"class": c, "probability": p} for c, p in ranked]}))
        else:
            print(f"{name}: " + ", ".join(f"{c} {100 * p:.1f}%" for c, p in ranked))
    return 0

