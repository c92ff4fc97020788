"""Parameter and FLOP counts of a GPT, for model summaries, MFU and throughput figures."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from gptforge.model.gpt import GPT, GPTConfig


def _meta_model(config: GPTConfig) -> nn.Module:
    """The model with this config (of its model.arch), built on the meta device: exact shapes, no memory, no
    init cost. Counting a real module instead of re-deriving its shapes keeps the counts true to gpt.py as it
    changes."""
    from gptforge.model import build_model

    with torch.device("meta"):
        return build_model(config)


def num_params(model_or_config: GPT | GPTConfig) -> dict[str, int]:
    """Parameter counts: total, embedding (token and learned position tables) and non_embedding.

    A tied head is the token embedding matrix, so it is counted once, under embedding; an untied head
    counts under non_embedding.
    """
    model = _meta_model(model_or_config) if isinstance(model_or_config, GPTConfig) else model_or_config
    total = model.num_params()
    non_embedding = model.num_params(exclude_embeddings=True)
    return {"total": total, "embedding": total - non_embedding, "non_embedding": non_embedding}


def estimated_params(config: GPTConfig) -> int:
    """The parameter count of a model of any depth without building it at that depth: the counts of its one-
    and two-layer versions (on the meta device) extended layer by layer. Exact, since the blocks are alike;
    fast even for a config of 100,000 layers, which is what it is for (to refuse what cannot fit)."""
    one, two = (num_params(dataclasses.replace(config, n_layer=n, share_layers=0))["total"] for n in (1, 2))
    return one + ((getattr(config, "share_layers", 0) or config.n_layer) - 1) * (two - one)


def flops_per_token(config: GPTConfig) -> float:
    """Training FLOPs per token: 6*N + 12*L*H*Q*T (Kaplan et al. 2020; PaLM appendix B; nanoGPT's MFU).

    N counts the weights that take part in matmuls: every nn.Linear weight in the blocks plus the head
    (padded vocabulary included: those columns are computed too; a tied head counted once). It leaves
    out the token and position lookups, biases and norm gains, whose FLOPs are negligible. Each such
    weight costs 2 FLOPs per token forward and 4 backward, hence 6*N. The second term is attention's
    score and value matmuls, QK^T and AV, which have no weights: 2 * 2 * Q*T FLOPs per head and layer
    forward for a full window of T = block_size, times 3 for forward + backward, with L = n_layer,
    H = n_head, Q = head_dim. As is customary it counts the full T x T score matrix, although a causal
    kernel computes only about half of it.
    """
    model = _meta_model(config)
    if hasattr(model, "train_flops"):  # another family counts its own (model/rnn.py, model/cnn.py)
        return float(model.train_flops())
    # A block shared by several layers (model.share_layers) is counted at every layer it runs in.
    n_matmul = sum(m.weight.numel() for _, m in model.named_modules(remove_duplicate=False) if isinstance(m, nn.Linear))
    attention = 12 * config.n_layer * config.n_head * config.head_dim * config.block_size
    return float(6 * n_matmul + attention)
