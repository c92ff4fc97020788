"""The chat template, conversation reading and accounting, chat data dirs with loss masks, and packing."""

from __future__ import annotations

import json

import jinja2
import numpy as np
import pytest
import torch

from gptforge.data.chat import CHAT_TOKENS, JINJA_TEMPLATE, ChatTemplate, with_chat_tokens
from gptforge.data.conversations import BAD_REASONS, builtin_conversation, builtin_items, messages_of, split_of
from gptforge.data.datadir import load_data_dir
from gptforge.data.loader import Layout, TokenLoader, val_batches
from gptforge.data.packing import document_bounds, pack
from gptforge.data.prepare_chat import prepare_chat
from gptforge.data.tokenizer import Tokenizer
from gptforge.errors import DataError

CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is <|assistant|> in 2 words?"},
    {"role": "assistant", "content": "A token."},
    {"role": "user", "content": "And <|end|>?"},
    {"role": "assistant", "content": "Another one."},
]


@pytest.fixture(scope="module")
def template() -> ChatTemplate:
    return ChatTemplate(with_chat_tokens(Tokenizer.bytes()))


def test_render_parses_back_and_chat_tokens_in_text_stay_text(template):
    ids, mask = template.render(CONVERSATION)
    assert ids[0] == template.eot_id and len(ids) == len(mask)
    assert template.parse(ids) == CONVERSATION
    specials = [i for i in ids if i >= 256]  # byte ids are < 256: only the template's own tokens are special
    assert specials == [template.eot_id, template.role_ids["system"], template.end_id, template.role_ids["user"],
                        template.end_id, template.role_ids["assistant"], template.end_id, template.role_ids["user"],
                        template.end_id, template.role_ids["assistant"], template.end_id]


def test_mask_covers_exactly_the_assistant_content_and_its_end(template):
    ids, mask = template.render(CONVERSATION)
    learned = template.tokenizer.decode([i for i, m in zip(ids, mask) if m])
    assert learned == "A token.<|end|>Another one.<|end|>"
    _, everything = template.render(CONVERSATION, train_on="all")
    assert everything == [0] + [1] * (len(ids) - 1)


def test_prompt_ids_end_with_the_assistant_turn_and_match_the_jinja_template(template):
    # Without special tokens written as text in a message: Hugging Face reads those as the tokens themselves.
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"},
               {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3 + 3?"}]
    ids = template.prompt_ids(history)
    assert ids[-1] == template.role_ids["assistant"] and ids[:-1] == template.render(history)[0]
    text = jinja2.Template(JINJA_TEMPLATE).render(messages=history, add_generation_prompt=True)
    # Hugging Face tokenizers read the special tokens of the rendered text as special tokens:
    inner = template.tokenizer._tok
    inner.encode_special_tokens = False
    try:
        assert inner.encode(text, add_special_tokens=False).ids == ids
    finally:
        inner.encode_special_tokens = True


def test_with_chat_tokens_keeps_every_id_and_is_idempotent():
    base = Tokenizer.bytes()
    chat = with_chat_tokens(base)
    assert chat.vocab_size == base.vocab_size + len(CHAT_TOKENS)
    assert chat.encode("def f(x): return x") == base.encode("def f(x): return x")
    assert with_chat_tokens(chat) is chat
    assert ChatTemplate.from_tokenizer(base) is None


@pytest.mark.parametrize("record, reason", [
    ([1, 2], "malformed_json"),
    ({"text": "hello"}, "unknown_shape"),
    ({"messages": "hi"}, "unknown_shape"),
    ({"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}, "unknown_role"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]}, "non_string_content"),
    ({"prompt": "q", "completion": "  "}, "empty_content"),
    ({"messages": [{"role": "user", "content": "only a question"}]}, "no_assistant"),
])
def test_each_bad_conversation_is_named_by_its_reason(record, reason):
    with pytest.raises(ValueError) as info:
        messages_of(record)
    assert info.value.reason == reason


def test_the_three_shapes_become_messages():
    assert messages_of({"prompt": "q", "completion": "a"}) == [{"role": "user", "content": "q"},
                                                              {"role": "assistant", "content": "a"}]
    assert messages_of({"instruction": "Sum", "input": "1 2", "output": "3"})[0]["content"] == "Sum\n\n1 2"
    assert messages_of({"instruction": "Sum", "output": "3"})[0]["content"] == "Sum"
    assert messages_of({"messages": CONVERSATION}) == CONVERSATION


def _write_jsonl(path, n_good):
    lines = [json.dumps({"prompt": f"What is {i} plus {i}?", "completion": f"{i} plus {i} is {2 * i}."})
             for i in range(n_good)]
    lines += ["{not json", json.dumps({"foo": 1}), json.dumps({"prompt": "q", "completion": ""}),
              json.dumps({"messages": [{"role": "wizard", "content": "x"}]}),
              json.dumps({"messages": [{"role": "user", "content": ["x"]}, {"role": "assistant", "content": "y"}]}),
              json.dumps({"messages": [{"role": "user", "content": "no answer"}]}),
              json.dumps({"prompt": "long " * 400, "completion": "a"}), ""]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    Tokenizer.bytes().save(root / "tokenizer.json")
    manifest = prepare_chat([str(_write_jsonl(root / "talk.jsonl", 120))], root / "data",
                            tokenizer=root / "tokenizer.json", max_tokens=96, val_fraction=0.2, progress=False)
    return root / "data", manifest


def test_prepare_chat_counts_every_bad_line_by_reason_and_writes_masks(chat_dir):
    path, manifest = chat_dir
    skipped = {k: v for k, v in manifest["skipped"].items() if v}
    assert skipped == {"malformed_json": 1, "unknown_shape": 1, "empty_content": 1, "unknown_role": 1,
                       "non_string_content": 1, "no_assistant": 1, "too_long": 1}
    assert manifest["skipped_examples"]["too_long"] == [f"{path.parent / 'talk.jsonl'}:127"]
    assert set(manifest["skipped"]) == set(BAD_REASONS)
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"] == 120
    data = load_data_dir(path)
    assert data.chat["train_on"] == "assistant"
    assert ChatTemplate.from_tokenizer(data.tokenizer) is not None
    assert all(shard.mask is not None and shard.mask.is_file() for shard in data.train + data.val)


def test_a_changed_mask_is_refused(chat_dir, tmp_path):
    import shutil

    path, _ = chat_dir
    copy = tmp_path / "data"
    shutil.copytree(path, copy)
    mask = copy / "train_000000.mask"
    raw = bytearray(mask.read_bytes())
    raw[-1] ^= 1
    mask.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="mask: sha256 differs"):
        load_data_dir(copy)


def test_loader_targets_are_the_assistant_tokens_only(chat_dir):
    path, _ = chat_dir
    data = load_data_dir(path)
    template = ChatTemplate(data.tokenizer)
    loader = TokenLoader(data.train, Layout(block_size=64, batch_size=8, accum=1), mode="sequential",
                         prefetch=0, eot_id=data.tokenizer.eot_id)
    (x, y), = loader.next_step()
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        assert row_x[0] == template.eot_id  # every window starts at a conversation (none is longer than one)
        for conversation in _conversations(row_x + [template.eot_id], template.eot_id):
            start, ids = conversation
            ref_ids, ref_mask = template.render(template.parse(ids))
            assert ids == ref_ids
            for i in range(1, len(ids)):  # the target of position start + i - 1 is token start + i
                expected = ids[i] if ref_mask[i] else -1
                assert row_y[start + i - 1] == expected
    loader.close()
    val = val_batches(data.val, 64, 4, 10_000, eot_id=data.tokenizer.eot_id)
    assert val and all((yy >= 0).any() for _, yy in val)


def _conversations(row, eot):
    """(start, ids) of the whole conversations in a packed row (the padding after them left out)."""
    starts = [i for i, t in enumerate(row) if t == eot]
    out = []
    for a, b in zip(starts, starts[1:]):
        if b - a > 1:
            out.append((a, row[a:b]))
    return out


def test_the_gradient_of_a_masked_target_is_zero(chat_dir):
    from gptforge.model.config import GPTConfig
    from gptforge.model.gpt import GPT

    path, _ = chat_dir
    data = load_data_dir(path)
    loader = TokenLoader(data.train, Layout(block_size=64, batch_size=4, accum=1), mode="sequential",
                         prefetch=0, eot_id=data.tokenizer.eot_id)
    (x, y), = loader.next_step()
    loader.close()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=data.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32,
                          doc_token=data.tokenizer.eot_id))
    logits = model(x).detach().requires_grad_(True)  # (B, T, V)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1)
    loss.backward()
    per_position = logits.grad.abs().sum(-1)  # (B, T)
    assert (per_position[y < 0] == 0).all()
    assert (per_position[y >= 0] > 0).all()


def test_packing_starts_windows_at_documents_and_splits_only_the_too_long():
    rng = np.random.default_rng(0)
    lengths = np.concatenate([rng.integers(2, 30, size=200), [75, 140]])  # two documents longer than a window
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    packed = pack(starts, lengths, window=64)
    long_starts = {int(starts[-2]), int(starts[-1])}
    doc_start = set(starts.tolist())
    covered = np.zeros(int(lengths.sum()), dtype=np.int64)
    for w in range(packed.windows):
        pieces = packed.pieces(w)
        assert sum(n for _, n in pieces) <= 64
        for k, (s, n) in enumerate(pieces):
            if s not in doc_start:  # a continuation: only of a long document, and only first in its window
                assert k == 0
                assert any(a < s < a + lengths[list(starts).index(a)] for a in long_starts)
            covered[s:s + n] += 1
    # Every token is in a window; the one token a continuation repeats is an input only, never a second target.
    assert (covered >= 1).all() and covered.sum() - covered.size == packed.continued
    assert packed.continued == 1 + 2  # 75 = 64 + 12 (one continuation), 140 = 64 + 64 + 14 (two)
    assert packed.fill() > 0.9


def test_document_bounds_take_tokens_before_the_first_boundary_as_a_document():
    starts, lengths = document_bounds(np.array([3, 7]), total=10)
    assert starts.tolist() == [0, 3, 7] and lengths.tolist() == [3, 4, 3]


def test_the_builtin_set_is_split_by_module_and_answers_from_docstrings():
    items = list(builtin_items())
    assert len(items) > 2000
    modules = {i["module"] for i in items}
    val = {m for m in modules if split_of(m, 0.05) == "val"}
    assert 0 < len(val) < len(modules) / 5
    item = next(i for i in items if i["module"] == "json" and i["name"] == "dumps")
    assert item["answer"].startswith("Serialize ``obj`` to a JSON formatted ``str``.")
    conversation = builtin_conversation(item)
    assert "json.dumps(obj" in conversation[0]["content"] and conversation[1]["content"] == item["answer"]
    assert not any(i["name"].startswith("_") or i["module"].startswith("test") for i in items)
