"""Hugging Face GPT-2 import and export, and the folders: logits match transformers both ways; pickles and misfits are refused."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import gptforge
from gptforge.adapt.hf import export_hf, import_hf
from gptforge.cli import main
from gptforge.config import from_dict
from gptforge.data.tokenizer import Tokenizer
from gptforge.errors import GptforgeError
from gptforge.model.gpt import GPT
from gptforge.train.checkpoint import save_weights

VOCAB = 300
TEXTS = ["def parse(text):\n    return [line.split(',') for line in text.splitlines()]\n" * 20,
         "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n" * 20]


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train_bpe(TEXTS, vocab_size=VOCAB)


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(0))


def _hf_folder(transformers, path: Path, tokenizer: Tokenizer | None, shard: bool = False, **config):
    """A random small GPT2LMHeadModel saved as safetensors, with random biases and norms so they are checked too."""
    torch.manual_seed(0)
    eot = tokenizer.eot_id if tokenizer else None
    cfg = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=64, vocab_size=VOCAB,
                                  bos_token_id=eot, eos_token_id=eot, **config)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path, safe_serialization=True, max_shard_size="40KB" if shard else "5GB")
    if tokenizer is not None:
        tokenizer.save(path / "tokenizer.json")
    return model


def _hf_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(_ids()).logits


def _gptforge_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(_ids())


@pytest.mark.parametrize("tied", [True, False])
def test_import_then_export_matches_transformers(transformers, tokenizer, tmp_path, tied):
    hf = _hf_folder(transformers, tmp_path / "hf", tokenizer, tie_word_embeddings=tied)
    assert import_hf(tmp_path / "hf", tmp_path / "run") == tmp_path / "run"
    model, tok = gptforge.load(tmp_path / "run")
    assert model.config.tie_embeddings is tied and model.config.pos == "learned" and model.config.bias
    assert (model.lm_head.weight is model.transformer.wte.weight) is tied
    assert tok.sha256 == tokenizer.sha256
    logits = _gptforge_logits(model)
    assert logits.shape == (2, 64, VOCAB)
    assert (logits - _hf_logits(hf)).abs().max() < 1e-4

    export_hf(tmp_path / "run", tmp_path / "out")
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    assert back.config.tie_word_embeddings is tied and back.config.vocab_size == VOCAB
    assert (_hf_logits(back) - logits).abs().max() < 1e-4
    assert ("lm_head.weight" in load_file(tmp_path / "out" / "model.safetensors")) is not tied
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    text = TEXTS[1][:80]
    assert hf_tok(text).input_ids == tok.encode(text)
    assert hf_tok.eos_token_id == tok.eot_id == back.config.eos_token_id


def test_sharded_import_and_export_on_the_command_line(transformers, tmp_path, capsys):
    hf = _hf_folder(transformers, tmp_path / "hf", None, shard=True)
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "hf").glob("model-*-of-*.safetensors"))) > 1

    def run(argv):
        assert main(argv) == 0
        return capsys.readouterr().out

    printed = run(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run")])
    assert "2 x 64, 4 heads, context 64, vocab 300, tied head" in printed and "no tokenizer" in printed
    model, tok = gptforge.load(tmp_path / "run")
    assert tok is None
    assert (_gptforge_logits(model) - _hf_logits(hf)).abs().max() < 1e-4

    printed = run(["export-hf", str(tmp_path / "run"), "--out", str(tmp_path / "out")])
    assert "config.json, model.safetensors" in printed and "no tokenizer" in printed
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    assert (_hf_logits(back) - _hf_logits(hf)).abs().max() < 1e-4


def test_import_original_gpt2_layout(transformers, tokenizer, tmp_path):
    """The hub's gpt2 files: names without `transformer.`, attention-mask buffers, vocab.json + merges.txt."""
    hf = _hf_folder(transformers, tmp_path / "hf", None)
    weights = tmp_path / "hf" / "model.safetensors"
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(weights).items()}
    tensors["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    save_file(tensors, weights, metadata={"format": "pt"})
    tokenizer._tok.model.save(str(tmp_path / "hf"))  # vocab.json + merges.txt
    import_hf(tmp_path / "hf", tmp_path / "run")
    model, tok = gptforge.load(tmp_path / "run")
    assert (_gptforge_logits(model) - _hf_logits(hf)).abs().max() < 1e-4
    assert tok.encode(TEXTS[0]) == tokenizer.encode(TEXTS[0])


def _gptforge_run(path: Path, tokenizer: Tokenizer, **model) -> GPT:
    """A run as gptforge training would leave it, every parameter random (zero biases would hide mistakes)."""
    cfg = from_dict({"model": {"vocab_size": tokenizer.vocab_size, "n_layer": 2, "n_head": 4, "n_embd": 64,
                               "block_size": 64, **model}})
    torch.manual_seed(0)
    gpt = GPT(cfg.model).eval()
    with torch.no_grad():
        for p in gpt.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    tok_file = path.parent / "tokenizer.json"
    tokenizer.save(tok_file)
    save_weights(path, gpt, cfg.to_dict(), step=10, tokenizer_file=tok_file)
    return gpt


@pytest.mark.parametrize("model", [dict(preset="gpt2-124m"), dict(preset="gpt2-124m", bias=False, mlp_ratio=3.0)])
def test_export_gptforge_model(transformers, tokenizer, tmp_path, model):
    gpt = _gptforge_run(tmp_path / "run", tokenizer, **model)
    assert gpt.config.padded_vocab_size > gpt.config.vocab_size
    export_hf(tmp_path / "run", tmp_path / "out")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert hf.config.vocab_size == tokenizer.vocab_size and hf.config.n_inner == gpt.config.mlp_hidden
    ids = _ids().clamp(max=tokenizer.vocab_size - 1)
    with torch.no_grad():
        assert (hf(ids).logits - gpt(ids)).abs().max() < 1e-4


def test_export_refuses_what_no_family_computes(tokenizer, tmp_path):
    _gptforge_run(tmp_path / "run", tokenizer, pos="learned", norm="rmsnorm", logit_softcap=15.0)
    with pytest.raises(GptforgeError, match=r"nearest: Apertus with model.pos=learned \(exportable: model.pos=rope\); "
                                            r"model.logit_softcap=15.0 \(exportable: model.logit_softcap=0.0\)$"):
        export_hf(tmp_path / "run", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_out_folder_is_replaced_only_with_force(transformers, tokenizer, tmp_path):
    _hf_folder(transformers, tmp_path / "hf", None)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(GptforgeError, match="already exists"):
        import_hf(tmp_path / "hf", tmp_path / "run")
    import_hf(tmp_path / "hf", tmp_path / "run", force=True)
    assert not (tmp_path / "run" / "notes.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "run"]  # no temporary folders left


class _Payload:
    """Unpickling this creates a folder: the proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.mkdir, (str(self.marker),)


def test_pickle_only_folder_is_refused_and_never_loaded(tmp_path, monkeypatch):
    hf_dir, marker = tmp_path / "hf", tmp_path / "payload-ran"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2, "n_head": 4, "n_embd": 64,
                                                    "n_positions": 64, "vocab_size": VOCAB}))
    with open(hf_dir / "pytorch_model.bin", "wb") as f:
        pickle.dump(_Payload(marker), f)

    def boom(*args, **kwargs):
        raise AssertionError("a pickle was loaded")

    for module, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(module, name, boom)
    with pytest.raises(GptforgeError, match=r"pytorch_model.bin.*gptforge loads no pickle.*safe_serialization=True"):
        import_hf(hf_dir, tmp_path / "run")
    assert not marker.exists()
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key, value", [("activation_function", "relu"), ("layer_norm_epsilon", 1e-6),
                                        ("scale_attn_by_inverse_layer_idx", True), ("reorder_and_upcast_attn", True),
                                        ("model_type", "mistral")])
def test_import_refuses_configs_that_do_not_map(tmp_path, key, value):
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2, "n_head": 4, "n_embd": 64,
                                                    key: value}))
    with pytest.raises(GptforgeError, match=rf"config.json: {key}="):
        import_hf(hf_dir, tmp_path / "run")


@pytest.mark.parametrize("key, value, words", [
    ("n_embd", "abc", "n_embd: expected a positive integer, got \"abc\""),
    ("n_embd", 0, "n_embd: expected a positive integer, got 0"),
    ("vocab_size", -1, "vocab_size: expected a positive integer, got -1"),
    ("n_layer", True, "n_layer: expected a positive integer, got true"),
    ("n_inner", 2.5, "n_inner: expected a positive integer"),
    ("layer_norm_epsilon", "x", "layer_norm_epsilon: expected a positive number"),
    ("n_layer", 100000, "parameters, whose fp32 weights alone"),
])
def test_import_refuses_values_that_are_not_sizes(tmp_path, key, value, words):
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    config = {"model_type": "gpt2", "n_layer": 2, "n_head": 4, "n_embd": 64, key: value}
    if key == "n_layer" and value == 100000:
        config.update(n_embd=1024, n_head=16)
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(GptforgeError) as err:
        import_hf(hf_dir, tmp_path / "run")
    assert "config.json" in str(err.value) and words in str(err.value)


@pytest.mark.parametrize("damage, words", [
    (lambda t: t["h.0.mlp.c_fc.weight"].fill_(float("nan")), "h.0.mlp.c_fc.weight holds NaN"),
    (lambda t: t.update({"h.0.mlp.c_fc.weight": t["h.0.mlp.c_fc.weight"].to(torch.int8)}),
     "h.0.mlp.c_fc.weight is torch.int8, not floating point"),
])
def test_import_refuses_weights_that_are_not_plain_numbers(transformers, tmp_path, damage, words):
    hf_dir = tmp_path / "hf"
    _hf_folder(transformers, hf_dir, None)
    tensors = load_file(str(hf_dir / "model.safetensors"))
    key = next(k for k in tensors if k.endswith("h.0.mlp.c_fc.weight"))
    tensors["h.0.mlp.c_fc.weight"] = tensors.pop(key)
    damage(tensors)
    save_file(tensors, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(GptforgeError, match=words.replace(".", r"\.")):
        import_hf(hf_dir, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("eot_prefix", [False, True])
def test_greedy_sample_matches_transformers_generate(transformers, tokenizer, tmp_path, capsys, eot_prefix):
    """`sample --no-eot-prefix` feeds the prompt alone, as `generate` does; by default an end-of-text token
    goes first, and `generate` given the same ids agrees again."""
    from gptforge.cli import main

    hf = _hf_folder(transformers, tmp_path / "hf", tokenizer)
    import_hf(tmp_path / "hf", tmp_path / "run")
    prompt = "def parse(text):\n"
    ids = tokenizer.encode(prompt)
    if eot_prefix:
        ids = [tokenizer.eot_id, *ids]
    hf.generation_config.eos_token_id = None  # run the full length, as --no-stop does
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=0)
    expected = prompt + tokenizer.decode(out[0, len(ids):].tolist())
    argv = ["sample", str(tmp_path / "run"), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "12",
            "--no-stop", "--safety", "off"] + ([] if eot_prefix else ["--no-eot-prefix"])
    capsys.readouterr()
    assert main(argv) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_no_eot_prefix_needs_a_prompt(transformers, tokenizer, tmp_path, capsys):
    from gptforge.cli import main

    _hf_folder(transformers, tmp_path / "hf", tokenizer)
    import_hf(tmp_path / "hf", tmp_path / "run")
    assert main(["sample", str(tmp_path / "run"), "--no-eot-prefix"]) == 2
    err = capsys.readouterr().err
    assert "--no-eot-prefix needs a non-empty --prompt" in err and "Traceback" not in err
