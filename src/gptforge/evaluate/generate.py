"""Sampling text from a GPT: greedy, temperature, top-k and nucleus (top-p), with a KV cache."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

import torch

from gptforge.errors import GptforgeError
from gptforge.model.gpt import GPT, KVCache


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set every logit below the k-th largest along the last dim to -inf (ties with the k-th are kept)."""
    if k < 1:
        raise ValueError(f"top_k must be at least 1, got {k}")
    kth = torch.topk(logits, min(k, logits.size(-1)), dim=-1).values[..., -1:]  # (..., 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability reaches p.

    A token survives when the probability of the tokens ranked above it is still below p, so the most
    likely token always survives and the token that carries the total over p is kept too.
    """
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    if p == 1.0:  # keeps everything; skip it rather than trust a float cumsum to stay below 1
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (..., V)
    probs = torch.softmax(sorted_logits.float(), dim=-1)  # (..., V)
    mass_above = probs.cumsum(dim=-1) - probs  # (..., V) probability of the better-ranked tokens
    drop_sorted = mass_above >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def sample_token(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, generator: torch.Generator | None = None) -> int:
    """Pick the next token id from logits (V,): argmax at temperature 0, else a draw from the filtered softmax."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / temperature  # (V,)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    probs = torch.softmax(logits, dim=-1)  # (V,)
    return int(torch.multinomial(probs, num_samples=1, generator=generator))


@torch.no_grad()
def stream(model: GPT, prompt_ids: list[int] | torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
           eot_id: int | None = None, use_cache: bool = True, context_keep: int | None = None) -> Iterator[int]:
    """Yield up to max_new_tokens new token ids after prompt_ids, one at a time; stop after eot_id.

    The model conditions on at most block_size tokens: a longer prompt keeps its last block_size. With
    use_cache the prompt is prefilled once and each step then feeds one token. Once the cache holds
    block_size positions it cannot take another, and dropping its oldest entry would not do: every cached
    key was computed from hidden states that saw the token being dropped. What happens then is
    `context_keep`'s choice:

    - None (the default): every step re-prefills a fresh cache with the last block_size tokens, so every
      token sees a full window, as nanoGPT's cropped full recomputation does, with the same logits. Each
      token past the window costs a prefill of block_size tokens.
    - k in [1, block_size): the cache is re-prefilled with the last k tokens, and decoding goes on one
      token a step until it is full again (llama.cpp's context shift, recomputed rather than rotated, so
      it holds for every position encoding). Tokens then see between k and block_size tokens of context,
      and a prefill of k tokens is spent every block_size - k tokens.

    seed draws from a dedicated torch.Generator on the model's device, leaving the global RNG untouched.
    The model's train/eval mode is the caller's choice and is left as it is.
    """
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.dim() != 1:
            raise ValueError(f"prompt_ids must be one sequence (1-D), got shape {tuple(prompt_ids.shape)}")
        prompt_ids = prompt_ids.tolist()
    if len(prompt_ids) == 0:
        raise ValueError("the prompt needs at least one token; for unconditional sampling pass [eot_id]")
    block_size = model.config.block_size
    if context_keep is not None and not 1 <= context_keep < block_size:
        raise ValueError(f"context_keep must be in [1, block_size={block_size}), got {context_keep}")
    device = next(model.parameters()).device
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    window = deque(prompt_ids[-block_size:], maxlen=block_size)  # the context the next token conditions on
    new_cache = getattr(model, "new_cache", None)  # a recurrent model's cache is its hidden state (model/rnn.py)
    cache = (new_cache(1) if new_cache else KVCache(1, model.config)) if use_cache else None

    unseen = list(window)  # tokens the cache has not seen yet
    for _ in range(max_new_tokens):
        if cache is not None and cache.pos + len(unseen) > block_size:
            cache.reset()
            unseen = list(window)[-context_keep:] if context_keep else list(window)
        feed = unseen if cache is not None else list(window)
        idx = torch.tensor([feed], dtype=torch.long, device=device)  # (1, T)
        logits = model(idx, cache=cache)[0, -1]  # (vocab_size,)
        token = sample_token(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        yield token
        if token == eot_id:
            return
        window.append(token)
        unseen = [token]


def generate(model: GPT, prompt_ids: list[int] | torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             eot_id: int | None = None, use_cache: bool = True, context_keep: int | None = None) -> list[int]:
    """The new token ids after prompt_ids (eot_id included when sampling stopped at it); see stream()."""
    return list(stream(model, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                       seed=seed, eot_id=eot_id, use_cache=use_cache, context_keep=context_keep))


def prompt_ids(tokenizer, prompt: str, eot_prefix: bool = True) -> list[int]:
    """The token ids generation starts from: by default an end-of-text token, then the prompt's tokens.

    gptforge joins training documents with end-of-text, so every document a model has seen began right
    after one; with it in front, the prompt reads as the start of a document (and an empty prompt asks for
    a new document). Without it (`eot_prefix=False`, `sample --no-eot-prefix`) the model sees the prompt's
    tokens alone, as Hugging Face transformers' `generate` does, and greedy output matches it token for token.
    """
    ids = tokenizer.encode(prompt)
    if eot_prefix:
        return [tokenizer.eot_id, *ids]
    if not ids:
        raise GptforgeError("--no-eot-prefix needs a non-empty --prompt: there is nothing else to start from")
    return ids


def sample_texts(model: GPT, tokenizer, n: int, max_new_tokens: int, seed: int, prompt: str = "") -> list[str]:
    """Unconditional samples (each starts right after an end-of-text token) or continuations of `prompt`,
    through the default output safety filter (masking)."""
    from gptforge.evaluate.safety import SafetyFilter

    safety = SafetyFilter.from_file()
    was_training = model.training
    model.eval()
    ids = prompt_ids(tokenizer, prompt)
    texts = []
    for i in range(n):
        new = generate(model, ids, max_new_tokens, temperature=0.8, top_k=200, seed=seed + i, eot_id=tokenizer.eot_id)
        texts.append(safety.apply(prompt + tokenizer.decode(new))[0])
    model.train(was_training)
    return texts
