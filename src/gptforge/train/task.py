"""What a model family trains on and how it is judged: the one place the loop and the step ask.

    LanguageTask    GPT, and recurrent models on random windows: model(x, y) is the loss; evaluation gives
                    val loss, bits per byte and perplexity (evaluate/loss.py)
    RecurrentTask   a recurrent model on the sequential loader: each micro-step's rows continue where they
                    stopped the step before (data/loader.py, `streams`), so the hidden state is carried from
                    window to window and detached in between (truncated backpropagation through time). The
                    state is part of the checkpoint (carry.safetensors), by global row block, so a resume is
                    bitwise and may change the number of processes
    ImageTask       a classifier: model(images, labels) is the loss; evaluation gives val loss, top-1 and
                    top-5 accuracy (evaluate/classify.py); the underfitting baseline is the label entropy

The builder picks the task (task_for); the Stepper calls task.loss for every micro-step, the loop calls
task.evaluate and task.summary, and a checkpoint holds task.carry_tensors().
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gptforge.evaluate.loss import evaluate

CARRY_FILE = "carry.safetensors"


class LanguageTask:
    baseline: float | None = None  # the fit watch's underfitting line: None, the training shards' unigram entropy

    def __init__(self, token_bytes: torch.Tensor | None = None):
        self.token_bytes = token_bytes  # UTF-8 bytes per token id, for bits per byte

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, micro: int) -> torch.Tensor:
        return model(x, y)

    def evaluate(self, model, batches, precision, device, world) -> dict[str, Any]:
        return evaluate(model, batches, precision, self.token_bytes, device, world)

    def summary(self, result: dict[str, Any]) -> str:
        bpb = f", {result['val_bpb']:.3f} bits/byte" if result.get("val_bpb") is not None else ""
        return f"val loss {result['val_loss']:.4f}{bpb}"

    def carry_tensors(self, world) -> dict[str, torch.Tensor] | None:
        """What the checkpoint must hold beyond weights and optimizer (collective; None: nothing)."""
        return None

    def load_carry(self, checkpoint: Path) -> None:
        pass


class RecurrentTask(LanguageTask):
    def __init__(self, token_bytes: torch.Tensor | None, world):
        super().__init__(token_bytes)
        from gptforge.model.rnn import RecurrentState

        self.world, self.make_state = world, RecurrentState
        self.carry: dict[int, Any] = {}  # micro-step -> its RecurrentState

    def _block(self, micro: int) -> int:
        return micro * self.world.world_size + self.world.rank  # the loader's global row block

    def loss(self, model, x, y, micro):
        state = self.carry.setdefault(micro, self.make_state(x.size(0)))
        state.detach()  # the last step's graph stays behind: backpropagation is truncated at the window
        return model(x, y, cache=state)

    def carry_tensors(self, world) -> dict[str, torch.Tensor] | None:
        mine = {str(self._block(m)): [_encode(t) for t in s.state] for m, s in self.carry.items() if s.state}
        gathered = world.gather_json(mine)
        return {f"block{g}.{i}": _decode(t) for part in gathered for g, ts in part.items() for i, t in enumerate(ts)}

    def load_carry(self, checkpoint: Path) -> None:
        file = Path(checkpoint) / CARRY_FILE
        if not file.is_file():
            return  # saved before any step: every row starts from zeros
        from safetensors.torch import load_file

        tensors = load_file(str(file))
        blocks: dict[int, list[tuple[int, torch.Tensor]]] = {}
        for key, t in tensors.items():
            g, i = key.removeprefix("block").split(".")
            blocks.setdefault(int(g), []).append((int(i), t))
        m = 0
        while self._block(m) in blocks:  # this process's blocks, micro-step by micro-step
            parts = [t for _, t in sorted(blocks[self._block(m)], key=lambda p: p[0])]
            state = self.make_state(parts[0].size(1))
            state.state = tuple(parts)
            self.carry[m] = state
            m += 1

    def to(self, device: torch.device) -> None:
        for s in self.carry.values():
            if s.state is not None:
                s.state = tuple(t.to(device) for t in s.state)


class ImageTask(LanguageTask):
    def __init__(self, baseline: float):
        super().__init__(None)
        self.baseline = baseline

    def evaluate(self, model, batches, precision, device, world) -> dict[str, Any]:
        from gptforge.evaluate.classify import evaluate_classifier

        return evaluate_classifier(model, batches, precision, device, world)

    def summary(self, result: dict[str, Any]) -> str:
        top5 = f", top-5 {100 * result['val_top5']:.2f}%" if result.get("val_top5") is not None else ""
        return f"val loss {result['val_loss']:.4f}, accuracy {100 * result['val_acc']:.2f}%{top5}"


def task_for(cfg, data, world, device: torch.device, checkpoint: Path | None) -> LanguageTask:
    """The task of cfg's model family on `data`; a resumed RecurrentTask gets its carried state back."""
    from gptforge.model import IMAGE_ARCHITECTURES
    from gptforge.model.config import RECURRENT

    if cfg.model.arch in IMAGE_ARCHITECTURES:
        return ImageTask(data.label_entropy())
    tokenizer = data.tokenizer
    token_bytes = torch.from_numpy(tokenizer.token_byte_lengths()) if tokenizer is not None else None
    if cfg.model.arch in RECURRENT and cfg.data.loader == "sequential":
        task = RecurrentTask(token_bytes, world)
        if checkpoint is not None:
            task.load_carry(checkpoint)
            task.to(device)
        return task
    return LanguageTask(token_bytes)


def _encode(t: torch.Tensor) -> dict[str, Any]:
    """A tensor as JSON without loss: its float32 bytes (bf16 and fp16 values are exact in float32)."""
    a = t.detach().float().cpu().contiguous().numpy()
    return {"shape": list(a.shape), "dtype": str(t.dtype).removeprefix("torch."), "data": base64.b64encode(a.tobytes()).decode()}


def _decode(d: dict[str, Any]) -> torch.Tensor:
    a = np.frombuffer(base64.b64decode(d["data"]), dtype=np.float32).reshape(d["shape"])
    return torch.from_numpy(a.copy()).to(getattr(torch, d["dtype"]))
