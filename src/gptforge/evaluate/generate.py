"""Sampling text from a GPT: greedy, temperature, top-k and nucleus (top-p), with a KV cache.

stream() and generate() run one request on the batching engine (evaluate/engine.py), the same path the
server decodes many on; the filters and sample_token live there too."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

import torch

from gptforge.errors import GptforgeError
from gptforge.evaluate.engine import Engine, Request, Sampling, sample_token, top_k_filter, top_p_filter
from gptforge.model.gpt import GPT

__all__ = ["generate", "prompt_ids", "sample_texts", "sample_token", "stream", "top_k_filter", "top_p_filter"]


def stream(model: GPT, prompt_ids: list[int] | torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
           eot_id: int | None = None, use_cache: bool = True, context_keep: int | None = None,
           session: Engine | None = None) -> Iterator[int]:
    """Yield up to max_new_tokens new token ids after prompt_ids, one at a time; stop after eot_id.

    The model conditions on at most block_size tokens: a longer prompt keeps its last block_size. With
    use_cache the prompt is prefilled once and each step then feeds one token. Once the cache holds
    block_size positions it cannot take another, and dropping its oldest entry would not do: every cached
    key was computed from hidden states that saw the token being dropped. What happens then is
    `context_keep`'s choice:

    - None (the default): every step re-prefills the cache with the last block_size tokens, so every
      token sees a full window, as nanoGPT's cropped full recomputation does, with the same logits. Each
      token past the window costs a prefill of block_size tokens.
    - k in [1, block_size): the cache is re-prefilled with the last k tokens, and decoding goes on one
      token a step until it is full again (llama.cpp's context shift, recomputed rather than rotated, so
      it holds for every position encoding). Tokens then see between k and block_size tokens of context,
      and a prefill of k tokens is spent every block_size - k tokens.

    `session`, an Engine kept across calls (`Engine(model, slots=1)`), keeps its cache between them: a
    prompt that extends the tokens it already holds (a chat's history plus a new turn) prefills only the
    new part. Without one, each call decodes on a fresh one-slot engine. use_cache=False recomputes the
    whole window every token instead (the reference the cache is tested against).

    seed draws from a dedicated torch.Generator on the model's device, leaving the global RNG untouched.
    The model's train/eval mode is the caller's choice and is left as it is.
    """
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.dim() != 1:
            raise ValueError(f"prompt_ids must be one sequence (1-D), got shape {tuple(prompt_ids.shape)}")
        prompt_ids = prompt_ids.tolist()
    if len(prompt_ids) == 0:
        raise ValueError("the prompt needs at least one token; for unconditional sampling pass [eot_id]")
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    recurrent = getattr(model, "new_cache", None) is not None  # its cache is a hidden state (model/rnn.py)
    if recurrent or not use_cache:
        yield from _one_by_one(model, list(prompt_ids), max_new_tokens, sampling, eot_id, context_keep,
                               recurrent and use_cache)
        return
    engine = session if session is not None else Engine(model, slots=1)
    if engine.model is not model:
        raise ValueError("the session's engine decodes another model")
    stop = frozenset() if eot_id is None else frozenset([eot_id])
    yield from engine.iterate(Request(list(prompt_ids), max_new_tokens, sampling, stop, context_keep))


@torch.no_grad()
def _one_by_one(model: GPT, prompt: list[int], max_new_tokens: int, sampling: Sampling, eot_id: int | None,
                context_keep: int | None, recurrent: bool) -> Iterator[int]:
    """stream() outside the engine: a recurrent model fed one token at a time through its hidden state
    (model.new_cache), or a GPT without a cache, a full forward over the window for every token."""
    block_size = model.config.block_size
    if context_keep is not None and not 1 <= context_keep < block_size:
        raise ValueError(f"context_keep must be in [1, block_size={block_size}), got {context_keep}")
    sampling.check()
    device = next(model.parameters()).device
    seed = sampling.seed
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    window = deque(prompt[-block_size:], maxlen=block_size)  # the context the next token conditions on
    cache = model.new_cache(1) if recurrent else None
    unseen = list(window)  # tokens the recurrent state has not seen yet
    for _ in range(max_new_tokens):
        if cache is not None and cache.pos + len(unseen) > block_size:  # past the window: start it again
            cache.reset()
            unseen = list(window)[-context_keep:] if context_keep else list(window)
        feed = unseen if cache is not None else list(window)
        logits = model(torch.tensor([feed], dtype=torch.long, device=device), cache=cache)[0, -1]  # (vocab_size,)
        token = sample_token(logits, temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                             generator=generator)
        yield token
        if token == eot_id:
            return
        window.append(token)
        unseen = [token]


def generate(model: GPT, prompt_ids: list[int] | torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             eot_id: int | None = None, use_cache: bool = True, context_keep: int | None = None,
             session: Engine | None = None) -> list[int]:
    """The new token ids after prompt_ids (eot_id included when sampling stopped at it); see stream()."""
    return list(stream(model, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                       seed=seed, eot_id=eot_id, use_cache=use_cache, context_keep=context_keep, session=session))


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
