"""Recurrent language models (model.arch=lstm|gru): a pure nn.Module, on the same token shards as the GPT.

Token embedding, `n_layer` stacked LSTM or GRU layers of width n_embd (torch's nn.LSTM / nn.GRU: cuDNN's
fused kernels on a GPU), dropout between layers and on the output, and a head tied to the embedding. The
interface is the GPT's: forward(idx, targets) is the loss, forward(idx) the logits, and a cache carries what
the model has seen. For a GPT that is a KVCache; here it is a RecurrentState, the hidden state after the last
token, which is all a recurrent model needs to go on: sampling feeds one token at a time through it, and
training on the sequential loader hands it from one window to the next (truncated backpropagation through
time; train/task.py detaches it between optimizer steps).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptforge.model.config import GPTConfig

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU}


class RecurrentState:
    """The hidden state after the tokens fed so far: for an LSTM (h, c), for a GRU (h,), each
    (n_layer, batch, n_embd); None before the first token (zeros). `pos` counts tokens, as KVCache's does."""

    def __init__(self, batch_size: int = 1, config: GPTConfig | None = None, **_: object):
        self.batch_size = batch_size
        self.state: tuple[torch.Tensor, ...] | None = None
        self.pos = 0

    def reset(self) -> None:
        self.state, self.pos = None, 0

    def detach(self) -> None:
        """Cut the graph behind the state (the truncation of backpropagation through time)."""
        if self.state is not None:
            self.state = tuple(s.detach() for s in self.state)


class RecurrentLM(nn.Module):
    """An LSTM or GRU language model with GPT's module names where they mean the same (transformer.wte,
    lm_head), so the optimizer groups, LoRA targets and checkpoints treat it alike."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        arch = getattr(config, "arch", "lstm")
        config.validate_family(arch)
        self.config, self.kind = config, arch
        C, V = config.n_embd, config.padded_vocab_size
        self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(V, C)))
        dropout = config.dropout if config.n_layer > 1 else 0.0  # torch applies it between layers only
        self.rnn = CELLS[arch](C, C, num_layers=config.n_layer, dropout=dropout, batch_first=True)
        self.drop = nn.Dropout(config.dropout)
        self.lm_head = nn.Linear(C, V, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        nn.init.normal_(self.transformer.wte.weight, std=0.02)
        if not config.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=0.02)
        self.head_loss = None  # the GPT's hook for a fused loss; unused here, kept for the same interface

    def new_cache(self, batch_size: int = 1) -> RecurrentState:
        """An empty state for generation (the GPT's counterpart is a KVCache)."""
        return RecurrentState(batch_size)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.transformer.wte.weight.numel()
        return n

    def train_flops(self) -> float:
        """Training FLOPs per token: 6 x the weights used once per token (every layer's input and recurrent
        matrices, and the head); the recurrence adds no weight-free matmul, unlike attention."""
        recurrent = sum(p.numel() for name, p in self.rnn.named_parameters() if name.startswith("weight"))
        return float(6 * (recurrent + self.lm_head.weight.numel()))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                cache: RecurrentState | None = None, reduction: str = "mean") -> torch.Tensor:
        """Logits (B, T, vocab_size) for token ids idx (B, T), or the loss when targets (B, T) are given
        (reduction mean, sum or none; targets of -1 ignored). With a cache, idx continues from its state
        and the cache then holds the state after idx."""
        x = self.drop(self.transformer.wte(idx))  # (B, T, C)
        state = cache.state if cache is not None else None
        if state is not None and self.kind == "gru":
            state = state[0]
        x, new = self.rnn(x, state)  # (B, T, C); the last hidden state(s), (n_layer, B, C) each
        if cache is not None:
            cache.state = new if isinstance(new, tuple) else (new,)
            cache.pos += idx.size(1)
        x = self.drop(x)
        if targets is None:
            return self.lm_head(x)[..., :self.config.vocab_size]
        logits = self.lm_head(x).flatten(0, 1)[:, :self.config.vocab_size].float()  # (B*T, vocab_size)
        loss = F.cross_entropy(logits, targets.flatten(), ignore_index=-1, reduction=reduction)
        return loss.view_as(targets) if reduction == "none" else loss
