"""GPT: a pure nn.Module. Nothing here knows about devices, precision or processes.

The variants a config can pick are small registries, MLPS, NORMS and POSITIONS, keyed by the names
model/config.py lists for GPTConfig's mlp, norm and pos fields (the config needs the names without torch).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptforge.model import config as names
from gptforge.model.config import GATED_MLPS, GPTConfig


RMS_NORM_EPS = 1e-6


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm whose gain is used in the input's dtype. Under bf16 autocast the activations arrive in bf16
    while the gain stays fp32; torch's fused rms_norm needs both alike and otherwise falls back to its
    composite ops with a warning (and returns fp32). Casting the gain keeps the fused path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, gain_like(self.weight, x), self.eps)


def gain_like(weight: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """`weight` in `x`'s dtype (a no-op when they agree); the cast is differentiable, so the fp32 gain learns."""
    return weight if weight is None or weight.dtype == x.dtype else weight.to(x.dtype)


# model.norm: (config, dim) -> a norm with a learnable gain initialised to one. RMSNorm has a fixed eps
# rather than torch's dtype-dependent default, so fp32 and bf16 runs normalise alike.
NORMS: dict[str, Callable[[GPTConfig, int], nn.Module]] = {
    "layernorm": lambda config, dim: nn.LayerNorm(dim, bias=config.bias),
    "rmsnorm": lambda config, dim: RMSNorm(dim, eps=RMS_NORM_EPS),
}


def make_norm(config: GPTConfig, dim: int) -> nn.Module:
    """The norm config.norm names (LayerNorm has a bias iff config.bias)."""
    return NORMS[config.norm](config, dim)


def rope_tables(block_size: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, each (block_size, head_dim // 2), in float32.

    Computed in float32 whatever the model's dtype: in bf16 the angle pos * freq loses all fractional
    precision after a few hundred positions.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (hd/2,)
    angles = torch.outer(torch.arange(block_size, dtype=torch.float32), inv_freq)  # (block_size, hd/2)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x[..., i], x[..., i + hd/2]) by its position's angle (GPT-NeoX / Llama half-split layout).

    x is (B, n_head, T, hd); cos and sin are (T, hd/2) and broadcast over batch and heads. The rotation
    runs in x's dtype, so under autocast it costs no float32 copies of q and k.
    """
    x1, x2 = x.chunk(2, dim=-1)  # (B, nh, T, hd/2) each
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # (B, nh, T, hd)


class KVCache:
    """Keys and values of the positions decoded so far, so each new token costs one position, not the prefix.

    Per layer, k and v are (batch_size, n_head, max_len, head_dim): `cache.k[layer]`. Attention writes the
    keys of a chunk of T new tokens at [pos, pos + T) and attends over [0, pos + T); GPT.forward then
    advances `pos` by T. The storage is allocated once, on the first write, on `device` and in `dtype`;
    either left as None is taken from the first keys written, so a cache follows the model's device and
    autocast dtype without being told.
    """

    def __init__(self, batch_size: int, config: GPTConfig, max_len: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        max_len = config.block_size if max_len is None else max_len
        if not 1 <= max_len <= config.block_size:
            raise ValueError(f"KVCache max_len must be in [1, block_size={config.block_size}], got {max_len}")
        self.batch_size = batch_size
        self.max_len = max_len
        self.shape = (config.n_layer, batch_size, config.n_head, max_len, config.head_dim)
        self.device = device
        self.dtype = dtype
        self.k: torch.Tensor | None = None  # (n_layer, B, nh, max_len, hd) once allocated
        self.v: torch.Tensor | None = None
        self.doc: torch.Tensor | None = None  # (B, max_len) document ids, for a model with document masking
        self.pos = 0

    def reset(self) -> None:
        """Forget every position; the storage is kept and overwritten by the next prefill."""
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nh, T, hd) at [pos, pos + T) of `layer`; return that layer's keys and values up to pos + T."""
        if self.k is None:
            self.k = torch.empty(self.shape, device=k.device if self.device is None else self.device,
                                 dtype=k.dtype if self.dtype is None else self.dtype)
            self.v = torch.empty_like(self.k)
        end = self.pos + k.size(2)
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        # .to is a no-op unless the cache was given a dtype other than the one attention computes in.
        return self.k[layer, :, :, :end].to(k.dtype), self.v[layer, :, :, :end].to(v.dtype)  # (B, nh, end, hd)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx  # which slot of a KVCache this layer owns
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # fused q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.is_residual_proj = True
        self.resid_dropout = nn.Dropout(config.dropout)
        # qk_norm: RMSNorm over head_dim with one learnable gain shared by all heads (as in OLMo 2 and
        # Qwen 3). Without the gain, |q| = |k| = sqrt(hd) would cap every attention logit at sqrt(hd)
        # and stop a head from ever attending sharply.
        self.q_norm = RMSNorm(config.head_dim, eps=RMS_NORM_EPS) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, eps=RMS_NORM_EPS) if config.qk_norm else None
        self.rotary = apply_rotary  # (x, cos, sin) -> x rotated; gptforge.kernels may swap in a fused kernel
        self.flex = flex_attention  # (q, k, v, block_mask) -> y; gptforge.train.techniques may compile it

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: KVCache | None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """mask: None for causal attention, or which keys each query may see, (B, 1, T, past + T) bool."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # (B, T, C) each
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hd)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = self.rotary(q, *rope), self.rotary(k, *rope)

        past = 0 if cache is None else cache.pos
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, nh, past + T, hd)
            q = q.to(k.dtype)  # a cache may hand back keys in a wider dtype to attend in; else a no-op
        if mask is not None and not isinstance(mask, torch.Tensor):  # a flex-attention BlockMask
            y = self.flex(q, k, v, block_mask=mask)  # (B, nh, T, hd)
            return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))
        if mask is None and past > 0 and T > 1:
            mask = causal_mask(T, past, x.device)  # (T, past + T)
        # No mask and past == 0: plain causal attention. One new token (T == 1) may attend to everything cached.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and past == 0,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, nh, T, hd)
        y = y.transpose(1, 2).contiguous().view(B, T, C).to(x.dtype)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


def causal_mask(T: int, past: int, device: torch.device) -> torch.Tensor:
    """(T, past + T) bool: new token i (at position past + i) sees every cached position and new ones <= i."""
    return torch.ones(T, past + T, dtype=torch.bool, device=device).tril(diagonal=past)


def document_mask(idx: torch.Tensor, doc_token: int, cache: KVCache | None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Document masking for token ids idx (B, T): (the attention mask, each token's position in its document).

    Each doc_token starts a new document (it belongs to the one it starts), so a token's document is the
    count of doc_tokens up to it. Query i may see key j when j is not later and in the same document. With
    a cache the ids of cached positions come from it and the new ones are stored in it. The mask is None
    when every key of every row is in one document: plain causal attention is then the same and faster.
    """
    B, T = idx.shape
    past = 0 if cache is None else cache.pos
    doc = (idx == doc_token).long().cumsum(1)  # (B, T)
    if cache is not None:
        if cache.doc is None:
            cache.doc = torch.zeros(cache.batch_size, cache.max_len, dtype=torch.long, device=idx.device)
        if past:
            doc = doc + cache.doc[:, past - 1:past]
        cache.doc[:, past:past + T] = doc
        keys = cache.doc[:, :past + T]  # (B, past + T)
    else:
        keys = doc
    positions = _positions_in_documents(keys)[:, past:]  # (B, T)
    # One document everywhere: plain causal attention is the same, and faster. Asking costs a host sync, free
    # on a CPU; a GPU (where training goes through flex attention anyway) and compile keep the mask instead.
    if idx.device.type == "cpu" and not torch.compiler.is_compiling() and bool((keys == keys[:, :1]).all()):
        return None, positions
    same = doc[:, :, None] == keys[:, None, :]  # (B, T, past + T)
    return (same & causal_mask(T, past, idx.device))[:, None], positions  # (B, 1, T, past + T)


def _positions_in_documents(doc: torch.Tensor) -> torch.Tensor:
    """(B, S) document ids -> each token's position within its document."""
    index = torch.arange(doc.size(1), device=doc.device)
    starts = torch.cat([torch.ones_like(doc[:, :1], dtype=torch.bool), doc[:, 1:] != doc[:, :-1]], dim=1)
    return index - torch.where(starts, index, 0).cummax(dim=1).values  # (B, S)


def flex_document_mask(idx: torch.Tensor, doc_token: int) -> tuple[object, torch.Tensor]:
    """document_mask as a flex-attention BlockMask, for a forward without a cache: blocks of 128 x 128
    positions where no query sees a key are skipped, instead of an SDPA mask of B x T x T booleans."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, T = idx.shape
    doc = (idx == doc_token).long().cumsum(1)  # (B, T)

    def same_document(b, h, q, kv):
        return (doc[b, q] == doc[b, kv]) & (q >= kv)

    return create_block_mask(same_document, B, None, T, T, device=idx.device), _positions_in_documents(doc)


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask) -> torch.Tensor:
    """PyTorch's flex attention, eager (a reference; gptforge.train.techniques compiles it on a GPU)."""
    from torch.nn.attention.flex_attention import flex_attention as flex

    return flex(q, k, v, block_mask=block_mask)


class _ReLUSquared(torch.autograd.Function):
    """relu(x)^2 whose backward is grad * 2 relu(x), from the one saved tensor. Autograd of
    `F.relu(x).square()` chains the square's backward and the relu's (a threshold pass) instead; forward and
    backward together took about half as long this way on a CPU (4096 x 1536, fp32)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        r = torch.relu(x)
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (r,) = ctx.saved_tensors
        return grad * (r + r)


def relu_squared(x: torch.Tensor) -> torch.Tensor:
    return _ReLUSquared.apply(x)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's GELU: the tanh approximation."""
    return F.gelu(x, approximate="tanh")


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """[gate | up] (B, T, 2 * hidden), side by side from one matmul -> silu(gate) * up (B, T, hidden)."""
    gate, up = h.chunk(2, dim=-1)  # (B, T, hidden) each
    return F.silu(gate) * up


# model.mlp: the activation between the MLP's two linear layers.
MLPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": gelu_tanh,
    "gelu_exact": F.gelu,
    "relu2": relu_squared,
    "swiglu": swiglu,
}


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.kind = config.mlp
        self.activation = MLPS[config.mlp]
        hidden = config.mlp_hidden
        width = 2 * hidden if config.mlp in GATED_MLPS else hidden
        self.c_fc = nn.Linear(config.n_embd, width, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.c_proj.is_residual_proj = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.activation(self.c_fc(x))  # (B, T, hidden); c_fc gives 2 * hidden for a gated one
        return self.dropout(self.c_proj(h))  # (B, T, C)


class LearnedPositions:
    """model.pos=learned (GPT-2): a learned table of absolute positions, transformer.wpe, added to the token
    embeddings."""

    @staticmethod
    def build(model: GPT) -> None:
        model.transformer.wpe = nn.Embedding(model.config.block_size, model.config.n_embd)

    @staticmethod
    def encode(model: GPT, x: torch.Tensor, past: int,
               positions: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        """Token embeddings x (B, T, C) of positions [past, past + T), or of `positions` (B, T) when given
        (document masking: positions within each document) -> (x plus positions, no rotary)."""
        if positions is None:
            positions = torch.arange(past, past + x.size(1), device=x.device)
        return x + model.transformer.wpe(positions), None


class RotaryPositions:
    """model.pos=rope: no parameters; attention rotates queries and keys by tables of cos and sin (float32,
    non-persistent buffers rebuilt by the constructor)."""

    @staticmethod
    def build(model: GPT) -> None:
        c = model.config
        cos, sin = rope_tables(c.block_size, c.head_dim, c.rope_theta)
        model.register_buffer("rope_cos", cos, persistent=False)  # (block_size, hd/2)
        model.register_buffer("rope_sin", sin, persistent=False)  # (block_size, hd/2)

    @staticmethod
    def encode(model: GPT, x: torch.Tensor, past: int,
               positions: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Token embeddings x (B, T, C) of positions [past, past + T) -> (x, the rotary tables of those positions).

        `positions` is ignored: a rotary attention score depends only on how far apart query and key are,
        so under document masking a document sees the same scores wherever it starts in the window."""
        end = past + x.size(1)
        return x, (model.rope_cos[past:end], model.rope_sin[past:end])  # (T, hd/2) each


# model.pos: how positions enter the model; build() adds its parameters or buffers, encode() applies them.
POSITIONS: dict[str, type] = {"learned": LearnedPositions, "rope": RotaryPositions}


def check_registries() -> None:
    """Refuse a variant added on one side only: each registry must implement exactly the names
    model/config.py gives the config."""
    for registry, named in ((MLPS, names.MLPS), (NORMS, names.NORMS), (POSITIONS, names.POSITIONS)):
        if tuple(registry) != named:
            raise ImportError(f"gpt.py implements {', '.join(registry)}; model/config.py names {', '.join(named)}")


check_registries()


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: KVCache | None, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope, cache, mask)  # (B, T, C)
        x = x + self.mlp(self.ln_2(x))  # (B, T, C)
        return x


class GPT(nn.Module):
    """A decoder-only transformer language model.

    Module names follow nanoGPT and GPT-2 (transformer.wte, transformer.h.0.attn.c_attn, lm_head, ...),
    so GPT-2 weights map one to one onto a learned/layernorm/gelu/bias config.

    Saving: with tie_embeddings, state_dict() lists the one shared matrix twice, as transformer.wte.weight
    and lm_head.weight. safetensors.torch.save_file refuses shared tensors; use
    safetensors.torch.save_model(model, path) and load_model(model, path), which store the matrix once
    and re-tie it on load. The rotary tables are non-persistent buffers, rebuilt by the constructor and
    never saved.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(config.padded_vocab_size, config.n_embd)))
        self.positions = POSITIONS[config.pos]
        self.positions.build(self)  # right after wte: GPT-2's parameter order, wte then wpe
        # model.share_layers=K: K distinct blocks, layer i runs block i mod K; the list holds each block at every
        # layer it serves, so parameters() counts it once and its gradient sums over those layers.
        blocks = [Block(config, i) for i in range(config.share_layers or config.n_layer)]
        self.transformer.h = nn.ModuleList(blocks[i % len(blocks)] for i in range(config.n_layer))
        self.transformer.ln_f = make_norm(config, config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        # (model, hidden, targets, reduction) -> loss, set from outside (gptforge.kernels) to replace loss().
        self.head_loss = None
        # Document masking through flex attention instead of an SDPA mask; set from outside
        # (gptforge.train.techniques, on a GPU), used for forwards without a cache.
        self.flex_documents = False

    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2 init: N(0, 0.02), zero biases, and residual output projections scaled by 1/sqrt(2 * n_layer)
        so the residual stream's variance does not grow with depth (two residual additions per layer);
        with zero_init_proj those projections start at zero (modded-nanogpt)."""
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "is_residual_proj", False):
                if self.config.zero_init_proj:
                    std = 0.0
                std /= math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count, the tied matrix counted once. exclude_embeddings drops the token and learned
        position tables (with tied embeddings that removes the head too: it is the same matrix)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Embedding))
        return n

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                cache: KVCache | None = None, reduction: str = "mean") -> torch.Tensor:
        """Logits (B, T, vocab_size) for token ids idx (B, T), or the loss when targets (B, T) are given.

        With a cache, idx continues the cached sequence: positions start at cache.pos, and cache.pos
        advances by T. reduction is 'mean' or 'sum' (scalars) or 'none' (per-token losses, (B, T));
        targets equal to -1 are ignored.
        """
        B, T = idx.shape
        past = 0 if cache is None else cache.pos
        if past + T > self.config.block_size:
            raise ValueError(f"sequence of {past + T} tokens ({past} cached + {T} new) exceeds "
                             f"block_size={self.config.block_size}")
        if cache is not None and (B != cache.batch_size or past + T > cache.max_len):
            raise ValueError(f"batch of {B} x {T} tokens does not fit a KVCache of batch_size={cache.batch_size}, "
                             f"max_len={cache.max_len} holding {past} positions")

        mask = positions = None
        if self.config.doc_token >= 0 and self.flex_documents and cache is None:
            mask, positions = flex_document_mask(idx, self.config.doc_token)  # BlockMask, (B, T)
        elif self.config.doc_token >= 0:
            mask, positions = document_mask(idx, self.config.doc_token, cache)  # (B, 1, T, past + T), (B, T)
        x, rope = self.positions.encode(self, self.transformer.wte(idx), past, positions)  # (B, T, C); rotary or None
        x = self.run_blocks(x, rope, cache, mask)  # (B, T, C)
        x = self.transformer.ln_f(x)  # (B, T, C)
        if cache is not None:
            cache.pos += T

        if targets is None:
            return self.logits(x)
        return self.loss(x, targets, reduction)

    def run_blocks(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, cache,
                   mask: torch.Tensor | None) -> torch.Tensor:
        """The transformer blocks over the residual stream x (B, T, C). With share_layers a shared block serves
        several layers, so it takes each layer's slot of the cache in turn."""
        for i, block in enumerate(self.transformer.h):
            if cache is not None and self.config.share_layers:
                block.attn.layer_idx = i
            x = block(x, rope, cache, mask)  # (B, T, C)
        return x

    def _softcap(self, logits: torch.Tensor) -> torch.Tensor:
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits / cap) if cap > 0 else logits

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states (B, T, C) -> logits (B, T, vocab_size) over the real vocabulary, in the head's
        output dtype (autocast decides); the padded columns are dropped as a view."""
        logits = self.lm_head(hidden)[..., :self.config.vocab_size]  # (B, T, vocab_size)
        return self._softcap(logits)

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Final hidden states (B, T, C) and targets (B, T) -> cross entropy, computed in float32.

        The one place that turns hidden states into a loss, so a fused chunked linear + cross-entropy can
        replace it without touching forward: when head_loss is set, it computes the loss instead.
        """
        if self.head_loss is not None:
            return self.head_loss(self, hidden, targets, reduction)
        logits = self.lm_head(hidden).flatten(0, 1)  # (B*T, padded_vocab)
        if self.config.padded_vocab_size != self.config.vocab_size:
            logits = logits[:, :self.config.vocab_size]  # (B*T, vocab_size), a strided view, no copy
        logits = self._softcap(logits.float())
        loss = F.cross_entropy(logits, targets.flatten(), ignore_index=-1, reduction=reduction)
        return loss.view_as(targets) if reduction == "none" else loss
