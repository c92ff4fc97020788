"""The batching engine: requests decoded together give the tokens each gives alone, slots free and reuse
their cache, document masking holds per row. fp32 (the suite's default), tiny random models."""

import pytest
import torch

from gptforge.evaluate.engine import Engine, Request, Sampling
from gptforge.evaluate.generate import generate
from gptforge.model.gpt import GPT, GPTConfig

BLOCK = 32


def tiny_model(pos: str = "rope", doc_token: int = -1, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=100, vocab_multiple=64, block_size=BLOCK, n_layer=2, n_head=4, n_embd=64,
                       pos=pos, tie_embeddings=False, doc_token=doc_token)
    return GPT(config).eval()


PROMPTS = [[5, 17, 42, 3], [9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [64, 0, 12], [33, 33, 7, 81, 2, 19]]


def run_together(engine: Engine, requests: list[Request]) -> None:
    for r in requests:
        engine.submit(r)
    while not all(r.done.is_set() for r in requests):
        engine.step()


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_batched_requests_give_the_tokens_each_gives_alone(pos):
    model = tiny_model(pos)
    samplings = [Sampling(temperature=0.0), Sampling(temperature=1.0, top_k=20, seed=3), Sampling(temperature=0.0),
                 Sampling(temperature=0.9, top_p=0.9, seed=11), Sampling(temperature=0.0)]
    lengths = [20, 7, 25, 40, 3]  # they finish at different steps: slots leave while others decode
    alone = [generate(model, p, n, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=s.seed)
             for p, n, s in zip(PROMPTS, lengths, samplings)]
    engine = Engine(model, slots=3)  # fewer slots than requests: two wait and join when others leave
    requests = [Request(p, n, s) for p, n, s in zip(PROMPTS, lengths, samplings)]

    run_together(engine, requests)

    assert [r.tokens for r in requests] == alone
    assert [r.finish_reason for r in requests] == ["length"] * 5
    assert len(set(alone[2])) > 4  # a varied greedy sequence, so agreement means something
    assert engine.steps < sum(lengths)  # steps were shared
    assert engine.active == 0 and engine.queued == 0


def test_a_request_past_the_window_matches_alone_while_others_decode():
    model = tiny_model("learned")
    long, short = Request([3, 1, 4], 2 * BLOCK, Sampling(temperature=0.0)), Request([2, 7], 10, Sampling(0.0))
    run_together(Engine(model, slots=2), [long, short])
    assert long.tokens == generate(model, [3, 1, 4], 2 * BLOCK, temperature=0.0, use_cache=False)
    assert short.tokens == generate(model, [2, 7], 10, temperature=0.0)


def test_a_freed_slot_prefills_only_what_its_cache_lacks():
    model = tiny_model()
    session = Engine(model, slots=1)
    first = generate(model, PROMPTS[2], 6, temperature=0.0, session=session)
    history = PROMPTS[2] + first + [7, 8]  # the next turn: the same history, then new tokens

    request = Request(history, 5, Sampling(temperature=0.0))
    tokens = list(session.iterate(request))

    assert request.cached_prompt_tokens == len(PROMPTS[2]) + len(first) - 1  # the last sampled token was never fed
    assert tokens == generate(model, history, 5, temperature=0.0)


def test_a_cancelled_request_frees_its_slot_for_the_next():
    model = tiny_model()
    engine = Engine(model, slots=1)
    hog, waiting = Request([1, 2], 1000 * BLOCK, Sampling(0.0)), Request([3], 4, Sampling(0.0))
    engine.submit(hog)
    engine.submit(waiting)
    for _ in range(3):
        engine.step()
    assert engine.active == 1 and engine.queued == 1 and not waiting.tokens
    hog.cancel()
    while not waiting.done.is_set():
        engine.step()
    assert hog.finish_reason == "cancelled" and waiting.finish_reason == "length"
    assert waiting.tokens == generate(model, [3], 4, temperature=0.0)


def test_stop_tokens_end_a_request_with_the_token_included():
    model = tiny_model()
    free = generate(model, PROMPTS[0], 10, temperature=0.0)
    request = Request(PROMPTS[0], 10, Sampling(0.0), stop_ids=frozenset([free[4]]))
    run_together(Engine(model, slots=2), [request])
    assert request.tokens == free[:free.index(free[4]) + 1] and request.finish_reason == "stop"


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_document_masking_per_row_matches_the_model(pos):
    """A prompt holding two documents: the engine's masks and positions give the model's own logits."""
    doc = 0
    model = tiny_model(pos, doc_token=doc)
    prompt = [doc, 5, 6, 7, doc, 8, 9]
    expected, context = [], list(prompt)
    with torch.no_grad():
        for _ in range(6):
            token = int(model(torch.tensor([context]))[0, -1].argmax())
            expected.append(token)
            context.append(token)
    other = Request([doc, 1, 2, 3, 4, 5, 6, 7, 8], 6, Sampling(0.0))  # decodes beside it in another row
    mixed = Request(prompt, 6, Sampling(0.0))
    run_together(Engine(model, slots=2), [other, mixed])
    assert mixed.tokens == expected


def test_bad_requests_are_refused_with_a_message():
    engine = Engine(tiny_model(), slots=1)
    with pytest.raises(ValueError, match="at least one token"):
        engine.submit(Request([], 3))
    with pytest.raises(ValueError, match="top_p"):
        engine.submit(Request([1], 3, Sampling(top_p=1.5)))
    with pytest.raises(ValueError, match="context_keep"):
        engine.submit(Request([1], 3, context_keep=BLOCK))


def test_a_failing_step_ends_its_requests_with_an_error_and_the_engine_goes_on():
    import threading

    model = tiny_model()
    engine = Engine(model, slots=2)
    broken = {"on": True}
    decode = engine._decode

    def flaky(slots):
        if broken["on"]:
            raise RuntimeError("simulated failure")
        return decode(slots)

    engine._decode = flaky
    stop = threading.Event()
    thread = threading.Thread(target=engine.run, args=(stop,), kwargs={"report": lambda m: None}, daemon=True)
    thread.start()
    try:
        first = engine.submit(Request([1, 2], 5, Sampling(0.0)))
        assert first.done.wait(30) and first.finish_reason == "error"
        broken["on"] = False
        second = engine.submit(Request([1, 2], 5, Sampling(0.0)))
        assert second.done.wait(30) and second.tokens == generate(model, [1, 2], 5, temperature=0.0)
    finally:
        stop.set()
        engine.wake()
        thread.join(10)


@pytest.mark.parametrize("doc_token", [-1, 0])
def test_a_lone_request_in_a_high_row_decodes_that_row_alone(doc_token):
    """After a busy spell a request may land in any row (prefix reuse picks it); its decode steps are then one
    row wide, not every row below it, and it gives the tokens it gives alone."""
    model = tiny_model(doc_token=doc_token)
    engine = Engine(model, slots=4)
    prompts = [[doc_token % 100, 11 + i, 12 + i, 13 + i] for i in range(4)]
    run_together(engine, [Request(p, 3, Sampling(0.0)) for p in prompts])
    widths = []
    forward = engine._forward
    engine._forward = lambda idx, *rest: widths.append(idx.shape) or forward(idx, *rest)
    lone = Request(prompts[3] + [50, 51], 12, Sampling(0.0))  # shares row 3's prefix, so it takes row 3

    run_together(engine, [lone])

    assert engine.slots[3].tokens[:len(lone.prompt)] == lone.prompt
    decodes = [shape for shape in widths if shape[1] == 1]
    assert len(decodes) == 11 and all(shape[0] == 1 for shape in decodes)
    assert lone.tokens == generate(model, lone.prompt, 12, temperature=0.0)


def test_bf16_weights_can_attend_in_an_fp32_cache(monkeypatch):
    """An engine on a CPU over bf16 weights keeps its cache in fp32 by default: every attention computes in
    fp32, and the prompts score as the fp32 model scores them, to bf16's precision."""
    import torch.nn.functional as F

    model = tiny_model()
    half = tiny_model().to(torch.bfloat16)
    seen = set()
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.add((q.dtype, k.dtype, v.dtype))
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[3], PROMPTS[4]]
    scores = []
    for engine in (Engine(model, slots=4), Engine(half, slots=4)):
        nll = {}
        requests = [Request(p, 8, Sampling(0.0), on_prompt=lambda s, n, i=i, nll=nll: nll.__setitem__(i, s / n))
                    for i, p in enumerate(prompts)]
        run_together(engine, requests)  # four rows decode together: the batched path
        assert [len(r.tokens) for r in requests] == [8] * 4 and engine.steps >= 7
        scores.append([nll[i] for i in range(4)])
    assert half.transformer.wte.weight.dtype == torch.bfloat16 and engine.cache.k.dtype == torch.float32
    assert seen == {(torch.float32,) * 3}
    assert scores[1] == pytest.approx(scores[0], rel=0.03)
