"""`gptforge eval` and `gptforge predict` on an image model (model.arch=cnn): the command functions."""

from __future__ import annotations

import sys

import torch

from gptforge.evaluate.classify import evaluate_classifier, predict


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

