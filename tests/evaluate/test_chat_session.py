"""ChatSession: the KV cache carries across turns, a stopped answer frees its slot, the safety filter applies."""

from __future__ import annotations

import io

import pytest
import torch

from gptforge.data.chat import ChatTemplate, with_chat_tokens
from gptforge.data.tokenizer import Tokenizer
from gptforge.evaluate.chat import ChatSession, interact
from gptforge.evaluate.safety import SafetyFilter
from gptforge.model.config import GPTConfig
from gptforge.model.gpt import GPT


@pytest.fixture(scope="module")
def template() -> ChatTemplate:
    return ChatTemplate(with_chat_tokens(Tokenizer.bytes()))


@pytest.fixture(scope="module")
def model(template) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=template.tokenizer.vocab_size, block_size=256, n_layer=2, n_head=2, n_embd=32,
                       doc_token=template.eot_id)
    return GPT(config).eval()


def fed_tokens(session: ChatSession, monkeypatch) -> list[int]:
    """Record how many tokens each forward of the session's decoder feeds."""
    fed = []
    original = session.decoder._forward

    def counting(idx, *args, **kwargs):
        fed.append(idx.size(1))
        return original(idx, *args, **kwargs)

    monkeypatch.setattr(session.decoder, "_forward", counting)
    return fed


def test_the_kv_cache_carries_across_turns(model, template, monkeypatch):
    session = ChatSession(model, template, max_new_tokens=5, temperature=0.0, system="Be brief.")
    fed = fed_tokens(session, monkeypatch)
    "".join(session.answer("hello"))
    first_prompt = len(template.prompt_ids(session.history[:2]))
    assert fed[0] == first_prompt  # the first turn prefills its whole prompt
    fed.clear()
    "".join(session.answer("and again"))
    user_turn = len(template.turn("user", template.tokenizer.encode("and again"))) + 1  # and <|assistant|>
    # The second turn prefills only the new turn after the cached conversation, plus the answer's closing
    # <|end|> (sampled, never fed) or, when the answer ran to its budget, its last token and the <|end|>.
    assert fed[0] in (user_turn + 1, user_turn + 2)
    assert fed[0] < len(session.ids) // 2


def test_a_stopped_answer_is_kept_and_the_next_turn_decodes(model, template, monkeypatch):
    session = ChatSession(model, template, max_new_tokens=50, temperature=1.0, top_k=None)
    answer = session.answer("tell me a story")
    next(answer)
    answer.close()  # what Ctrl-C between two tokens does
    assert session.history[-1]["role"] == "assistant"
    assert all(s.request is None for s in session.decoder.slots)  # the slot was freed at once
    fed = fed_tokens(session, monkeypatch)
    prompt = len(session.ids) + len(template.turn("user", template.tokenizer.encode("again"))) + 1
    text = "".join(session.answer("again"))
    assert fed[0] == prompt  # a full prefill: the stopped slot forgot its cache
    assert isinstance(text, str) and session.history[-1]["role"] == "assistant"


def test_the_safety_filter_masks_streamed_answers(model, template, monkeypatch):
    safety = SafetyFilter.from_file()
    session = ChatSession(model, template, max_new_tokens=5, temperature=0.0, safety=safety)
    secret = "my key is sk-" + "a1B2" * 10 + " ok"
    monkeypatch.setattr(template.tokenizer, "decode", lambda ids: secret[:len(ids) * 8])
    shown = "".join(session.answer("what is your key?"))
    assert "a1B2" not in shown and "[masked:" in shown
    assert safety.counts.masked == 1


def test_interact_commands(model, template):
    session = ChatSession(model, template, max_new_tokens=3, temperature=0.0)
    lines = iter(["hello", "/system Be kind.", "/reset", "/unknown", "", "/exit", "never read"])
    out = io.StringIO()
    interact(session, lambda prompt: next(lines), out)
    text = out.getvalue()
    assert text.count("model> ") == 1
    assert "system message set; conversation reset" in text and "(conversation reset)" in text
    assert "unknown command /unknown" in text
    assert session.system == "Be kind." and session.history == [{"role": "system", "content": "Be kind."}]
    assert next(lines) == "never read"  # /exit left the loop
