"""Text augmentation of training batches, for small data sets where a model sees the same text many times.

Applied by the training loop to each training micro-batch (x, y) on its device, after the loader and before
the forward pass; evaluation batches never pass through here. Both kinds are off by default.

    token noise    (data.aug_token_noise = p) each INPUT token is replaced, with probability p, by a token id
                   drawn uniformly from the vocabulary. The targets stay the real text: the model learns to
                   predict the true next token from a slightly corrupted context.
    span deletion  (data.aug_span_delete = p) with probability p a sequence loses one span of its window:
                   length L uniform in [1, max(1, T // 8)], start uniform such that at least one token stays
                   before and after it. The loader's window w holds T + 1 tokens (x = w[:-1], y = w[1:]); the
                   span is cut out of w and the rest shifts left, so x and y are rebuilt from the shorter text
                   and every target is the true next token of the edited input: plain language modelling on a
                   text with a gap. The window is now T + 1 - L tokens long; to keep shapes fixed the last L
                   positions are padding whose targets are -1, which the loss ignores (and which earlier
                   positions never see: attention is causal).

Random numbers come from torch's global generator of the batch's device (or a `generator` given), whose state
every checkpoint already saves: a resumed run draws the same augmentations, bit for bit.
"""

from __future__ import annotations

import torch

from gptforge.errors import ConfigError

Batch = tuple[torch.Tensor, torch.Tensor]


def token_noise(x: torch.Tensor, p: float, vocab_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """x with each token replaced, with probability p, by a uniformly random id in [0, vocab_size)."""
    hit = torch.rand(x.shape, device=x.device, generator=generator) < p
    noise = torch.randint(0, vocab_size, x.shape, device=x.device, dtype=x.dtype, generator=generator)
    return torch.where(hit, noise, x)


def delete_spans(x: torch.Tensor, y: torch.Tensor, p: float, generator: torch.Generator | None = None) -> Batch:
    """(x, y) with one random span deleted from the window of each sequence with probability p (see the
    module docstring); the freed positions at the end get target -1."""
    B, T = x.shape
    if T < 2:  # no room for a span with a token on each side
        return x, y
    window = torch.cat([x[:, :1], y], dim=1)  # (B, T+1): the tokens the loader read
    device = x.device
    hit = torch.rand(B, device=device, generator=generator) < p
    length = torch.randint(1, max(1, T // 8) + 1, (B,), device=device, generator=generator)
    # start in [1, T - length]: the span lies inside w[1:T], so w[0] and w[T] are kept
    start = 1 + (torch.rand(B, device=device, generator=generator) * (T - length)).long()
    length = length * hit  # 0: this sequence is left as it is
    pos = torch.arange(T + 1, device=device)
    source = pos + length[:, None] * (pos >= start[:, None])  # (B, T+1): where each kept token comes from
    edited = window.gather(1, source.clamp(max=T))
    targets = edited[:, 1:].masked_fill(source[:, 1:] > T, -1)
    return edited[:, :-1], targets


class Augmenter:
    """The augmentations of a run, applied to each training micro-batch; a no-op when both are off."""

    def __init__(self, span_delete: float = 0.0, token_noise: float = 0.0, vocab_size: int = 0,
                 generator: torch.Generator | None = None):
        for key, value in (("data.aug_span_delete", span_delete), ("data.aug_token_noise", token_noise)):
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{key}: expected a probability in [0, 1), got {value}")
        if token_noise and vocab_size < 1:
            raise ConfigError("data.aug_token_noise needs the vocabulary size to draw random tokens from")
        self.span_delete, self.token_noise, self.vocab_size = span_delete, token_noise, vocab_size
        self.generator = generator

    @classmethod
    def from_config(cls, data_cfg, vocab_size: int) -> Augmenter:
        return cls(data_cfg.aug_span_delete, data_cfg.aug_token_noise, vocab_size)

    @property
    def enabled(self) -> bool:
        return bool(self.span_delete or self.token_noise)

    def apply(self, x: torch.Tensor, y: torch.Tensor) -> Batch:
        """One micro-batch: span deletion first (it needs the loader's untouched window), then token noise."""
        if self.span_delete:
            x, y = delete_spans(x, y, self.span_delete, self.generator)
        if self.token_noise:
            x = token_noise(x, self.token_noise, self.vocab_size, self.generator)
        return x, y

    def __call__(self, batches: list[Batch]) -> list[Batch]:
        if not self.enabled:
            return batches
        return [self.apply(x, y) for x, y in batches]
