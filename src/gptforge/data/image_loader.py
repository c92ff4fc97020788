"""Training batches of labelled images, with the TokenLoader's interface and its resumable position.

The unit is the optimizer step, as in data/loader.py: each step draws one global batch of
`accum x world_size x batch_size` images, and rank r takes, for micro-step m, the images
[(m * world_size + r) * batch_size, ... + batch_size), so a run resumes on another number of processes with
the same stream. data.loader=random sweeps each epoch in a fresh permutation; sequential in stored order. An
epoch ends when a step no longer fits (the last partial batch is left out).

Augmentation (training batches only), drawn from the loader's own generator so it resumes bit for bit:
random crop after zero padding (data.aug_crop pixels), horizontal flip (data.aug_flip; not for digits or
text), cutout (data.aug_cutout: one square of that side set to zero, DeVries & Taylor 2017). Batches leave
as uint8 (B, S, S, C) with int64 labels (B,): a quarter of the bytes of float to copy to a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gptforge.data.images import ImageData
from gptforge.data.loader import Layout
from gptforge.errors import DataError


@dataclass(frozen=True)
class ImageAugment:
    crop: int = 0  # padding in pixels before a random crop back to the image size; 0: off
    flip: bool = False
    cutout: int = 0  # side of the zeroed square; 0: off

    @property
    def enabled(self) -> bool:
        return bool(self.crop or self.flip or self.cutout)

    def __call__(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """images (B, S, S, C) uint8 -> augmented copies, the same shape."""
        B, S = images.shape[0], images.shape[1]
        if self.crop:
            p = self.crop
            padded = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))  # (B, S+2p, S+2p, C)
            dy, dx = rng.integers(0, 2 * p + 1, size=(2, B))
            rows = dy[:, None] + np.arange(S)  # (B, S)
            cols = dx[:, None] + np.arange(S)
            images = padded[np.arange(B)[:, None, None], rows[:, :, None], cols[:, None, :]]  # (B, S, S, C)
        if self.flip:
            flip = rng.random(B) < 0.5
            images = np.where(flip[:, None, None, None], images[:, :, ::-1], images)
        if self.cutout:
            images = images.copy()
            cy, cx = rng.integers(0, S, size=(2, B))
            half = self.cutout // 2
            ys, xs = np.arange(S)[None, :], np.arange(S)[None, :]
            inside_y = (ys >= (cy - half)[:, None]) & (ys < (cy - half + self.cutout)[:, None])  # (B, S)
            inside_x = (xs >= (cx - half)[:, None]) & (xs < (cx - half + self.cutout)[:, None])
            images[inside_y[:, :, None] & inside_x[:, None, :]] = 0
        return np.ascontiguousarray(images)


class ImageLoader:
    """Training batches for one process: `next_step()` returns its `accum` micro-batches (images, labels)."""

    def __init__(self, data: ImageData, layout: Layout, *, mode: str = "random", seed: int = 0,
                 device: torch.device | str = "cpu", augment: ImageAugment = ImageAugment(),
                 state: dict | None = None):
        self.images, self.labels = data.train_images, np.asarray(data.train_labels, dtype=np.int64)
        self.layout, self.mode, self.augment = layout, mode, augment
        self.device = torch.device(device)
        if mode not in ("random", "sequential"):
            raise ValueError(f"unknown loader mode {mode!r}")
        if len(self.images) < layout.global_windows:
            raise DataError(f"{data.path}: {len(self.images)} training images, fewer than one optimizer step takes "
                            f"({layout.global_windows}); use a smaller train.batch_size or train.batch_tokens")
        # The epoch's permutation comes from `_order`, whose state at the epoch's start is what is saved.
        self._order = np.random.Generator(np.random.PCG64(seed))
        self._aug = np.random.Generator(np.random.PCG64([seed, 1]))
        self._epoch, self._cursor = 0, 0
        if state is not None:
            self._load(state)
        self._start_epoch(self._epoch_start if state is not None else None)

    def _start_epoch(self, order_state: dict | None) -> None:
        if order_state is not None:
            self._order.bit_generator.state = order_state
        self._epoch_start = self._order.bit_generator.state
        n = len(self.images)
        self._perm = self._order.permutation(n) if self.mode == "random" else np.arange(n)

    def _load(self, state: dict) -> None:
        if state.get("mode") != self.mode or "aug_rng" not in state:
            raise DataError(f"saved loader position is for data.loader={state.get('mode')} over "
                            f"{'images' if 'aug_rng' in state else 'tokens'}; this run reads images with {self.mode}")
        self._epoch_start = state["rng"]
        self._aug.bit_generator.state = state["aug_rng"]
        self._epoch, self._cursor = int(state["epoch"]), int(state["cursor"])

    def state_dict(self) -> dict:
        """Position after the last step returned (mode and rng in data/loader.py's form, so checks read both)."""
        return {"mode": self.mode, "rng": self._epoch_start, "aug_rng": self._aug.bit_generator.state,
                "epoch": self._epoch, "cursor": self._cursor}

    @property
    def epoch(self) -> int:
        return self._epoch

    def next_step(self, micro_steps: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        L = self.layout
        accum = L.accum if micro_steps is None else micro_steps
        if not 1 <= accum <= L.accum:
            raise ValueError(f"micro_steps={micro_steps}: expected 1..{L.accum}")
        n = accum * L.world_size * L.batch_size
        if self._cursor + n > len(self.images):
            self._epoch, self._cursor = self._epoch + 1, 0
            self._start_epoch(None)
        picks = self._perm[self._cursor : self._cursor + n]
        self._cursor += n
        # One draw per step on every rank (the generator stays alike everywhere); each block of batch_size
        # images is augmented from (that draw, its index in the global batch), whichever process takes it.
        step_seed = int(self._aug.integers(2**62)) if self.augment.enabled else 0
        batches = []
        for m in range(accum):
            block = m * L.world_size + L.rank
            mine = np.sort(picks[block * L.batch_size : (block + 1) * L.batch_size])  # file order: mmap reads
            images = np.asarray(self.images[mine])  # (B, S, S, C) uint8
            if self.augment.enabled:
                images = self.augment(images, np.random.default_rng([step_seed, block]))
            x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
            y = torch.from_numpy(self.labels[mine]).to(self.device)
            batches.append((x, y))
        return batches

    def close(self) -> None:
        pass


def image_val_batches(data: ImageData, batch_size: int, limit: int, rank: int = 0,
                      world_size: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The fixed validation set: the first `limit` val images (all by default), strided over ranks, every rank
    the same number (a sharded model needs every process in every forward)."""
    n = min(limit, len(data.val_images)) // world_size * world_size
    if n < world_size:
        raise DataError(f"{data.path}: {len(data.val_images)} val images, fewer than one per process")
    rows = np.arange(rank, n, world_size)
    batches = []
    for i in range(0, len(rows), batch_size):
        idx = rows[i : i + batch_size]
        batches.append((torch.from_numpy(np.ascontiguousarray(data.val_images[idx])),
                        torch.from_numpy(np.asarray(data.val_labels[idx], dtype=np.int64))))
    return batches
