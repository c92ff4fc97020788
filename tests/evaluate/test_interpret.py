"""Inspection: recomputed attention reproduces each attention module's output, rows are causal
distributions, the logit lens ends at the model's own prediction, attributions cover every token, and the
files and command-line output appear."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from gptforge.cli import build_parser
from gptforge.config import load_config
from gptforge.data.tokenizer import Tokenizer
from gptforge.errors import GptforgeError
from gptforge.evaluate.interpret import (
    inspect_run,
    recompute_attention,
    run_inspect,
    write_inspection,
)
from gptforge.model.gpt import GPT, GPTConfig
from gptforge.train.checkpoint import save_weights

PROMPT = "def add(a, b):\n    return a + b"
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
VARIANTS = {"learned": dict(pos="learned", norm="layernorm", bias=True, qk_norm=False),
            "rope": dict(pos="rope", qk_norm=False), "rope+qk_norm": dict(pos="rope", qk_norm=True)}


def tiny_model(**options) -> GPT:
    """A random model with an untied head, so its predictions are not just echoes of the input, and random
    (not zero) output projections, so every block, and attention to earlier tokens, changes the result."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=257, vocab_multiple=64, block_size=64, n_layer=2, n_head=4, n_embd=32,
                       tie_embeddings=False, **{"zero_init_proj": False, **options})
    return GPT(config).eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_recomputed_weights_reproduce_the_attention_output(variant):
    model = tiny_model(**VARIANTS[variant])
    with torch.no_grad():  # at init attention is nearly uniform, and a missed rotation would shift it by ~1e-4 only
        for block in model.transformer.h:
            block.attn.c_attn.weight.mul_(10)
    calls = []
    hooks = [block.attn.register_forward_hook(lambda m, args, out: calls.append((m, args, out)))
             for block in model.transformer.h]
    with torch.no_grad():
        model(torch.randint(0, 257, (2, 20)))
    for hook in hooks:
        hook.remove()

    assert len(calls) == 2
    for attn, (x, rope, _cache, _mask), output in calls:
        weights, v = recompute_attention(attn, x, rope)  # (B, nh, T, T), (B, nh, T, hd)
        merged = (weights @ v).transpose(1, 2).reshape(x.shape)  # (B, T, C)
        torch.testing.assert_close(attn.c_proj(merged), output, atol=1e-5, rtol=0)
        assert (rope is None) == (variant == "learned")


@pytest.fixture(scope="module", params=list(VARIANTS))
def inspected(request):
    model, tok = tiny_model(**VARIANTS[request.param]), Tokenizer.bytes()
    return model, tok, inspect_run(model, tok, PROMPT, top_k=3)


def test_attention_rows_are_causal_distributions(inspected):
    model, tok, result = inspected
    T = len(tok.encode(PROMPT)) + 1
    assert len(result["attention"]) == model.config.n_layer
    for weights in result["attention"]:
        assert weights.shape == (model.config.n_head, T, T)
        np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
        assert np.all(np.triu(weights, k=1) == 0) and np.all(weights >= 0)


def test_the_logit_lens_ends_at_the_models_own_prediction(inspected):
    model, tok, result = inspected
    ids = torch.tensor([result["ids"]])
    probs = model(ids)[0].softmax(-1)  # (T, vocab_size)
    top = probs.topk(3, dim=-1)

    lens = result["logit_lens"]
    assert [layer["layer"] for layer in lens] == ["embeddings", "block 0", "block 1"]
    final = lens[-1]["top"]
    assert [[t["id"] for t in pos] for pos in final] == top.indices.tolist()
    np.testing.assert_allclose([[t["prob"] for t in pos] for pos in final], top.values.tolist(), atol=1e-6)
    assert result["prediction"]["id"] == final[-1][0]["id"] == int(probs[-1].argmax())
    assert result["tokens"][0] == "<|endoftext|>" and "".join(result["tokens"][1:]) == PROMPT


def test_attributions_cover_every_token_and_are_non_zero(inspected):
    _, _, result = inspected
    attributions = np.array(result["attributions"])
    assert attributions.shape == (len(result["ids"]),)
    assert np.all(np.isfinite(attributions)) and np.all(attributions != 0)


def test_attributions_are_gradient_times_input():
    # With distinct tokens and an untied head, the gradient of an embedding row is that position's gradient.
    model, tok = tiny_model(pos="rope"), Tokenizer.bytes()
    result = inspect_run(model, tok, "abc")
    ids = torch.tensor(result["ids"])
    model(ids[None])[0, -1, result["prediction"]["id"]].backward()
    rows = model.transformer.wte.weight
    np.testing.assert_allclose(result["attributions"], (rows.grad[ids] * rows[ids]).sum(-1).tolist(), atol=1e-6)


def test_a_prompt_longer_than_the_context_is_refused():
    with pytest.raises(GptforgeError, match="the prompt is 100 tokens; the model's context holds 63"):
        inspect_run(tiny_model(), Tokenizer.bytes(), "x" * 100)


@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="matplotlib (the plot extra) is not installed")
def test_write_inspection_writes_one_png_per_layer_and_the_json(tmp_path):
    result = inspect_run(tiny_model(), Tokenizer.bytes(), PROMPT, top_k=3)
    paths = write_inspection(result, tmp_path / "out")

    assert [p.name for p in paths] == ["attention_layer_0.png", "attention_layer_1.png", "inspect.json"]
    for png in paths[:-1]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    data = json.loads(paths[-1].read_text())
    assert data["ids"] == result["ids"] and len(data["logit_lens"][0]["top"]) == len(result["ids"])
    assert "attention" not in data


def test_run_inspect_prints_the_tables(tmp_path, capsys):
    cfg = load_config(None, ["model.preset=tiny", "model.vocab_size=257"])
    torch.manual_seed(0)
    tokenizer_file = tmp_path / "tokenizer.json"
    Tokenizer.bytes().save(tokenizer_file)
    save_weights(tmp_path / "run", GPT(cfg.model), cfg.to_dict(), tokenizer_file=tokenizer_file)
    out = tmp_path / "maps" if HAVE_MATPLOTLIB else None

    args = build_parser().parse_args(["inspect", str(tmp_path / "run"), "--prompt", "import os", "--top-k", "2", "--device", "cpu",
                              *(["--out", str(out)] if out else [])])
    assert run_inspect(args) == 0

    printed = capsys.readouterr().out
    assert "logit lens at the last position" in printed and "block 1" in printed
    assert "gradient x input" in printed and "·" in printed  # the space before "os", made visible
    if out:
        assert (out / "inspect.json").is_file() and (out / "attention_layer_1.png").is_file()
