"""Every exportable switch combination computes the same logits in its transformers family (fp32, 1e-4);
every other one is refused naming its switch; each family imports back; LoRA and quantized runs export."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import gptforge
from gptforge.adapt.hf import export_hf, import_hf
from gptforge.adapt.hf_families import FAMILIES, Unexportable, choose, hf_config, to_hf
from gptforge.adapt.lora import apply_lora
from gptforge.adapt.qlinear import Int8Linear, QuantLinear
from gptforge.adapt.quantize import quantize_run
from gptforge.config import from_dict
from gptforge.data.tokenizer import Tokenizer
from gptforge.errors import GptforgeError
from gptforge.model.config import MLPS, NORMS, POSITIONS, GPTConfig
from gptforge.model.gpt import GPT
from gptforge.train.checkpoint import save_weights

VOCAB = 300
TEXTS = ["def parse(text):\n    return [line.split(',') for line in text.splitlines()]\n" * 20,
         "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n" * 20]
SHAPE = dict(vocab_size=VOCAB, block_size=32, n_layer=2, n_head=4, n_embd=64)
SWITCHES = dict(mlp=MLPS, norm=NORMS, pos=POSITIONS, qk_norm=(False, True), tie_embeddings=(True, False),
                bias=(False, True), logit_softcap=(0.0, 30.0))


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train_bpe(TEXTS, vocab_size=VOCAB)


def _ids(n: int = 32) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, n), generator=torch.Generator().manual_seed(0))


def _random_gpt(m: GPTConfig) -> GPT:
    """Every parameter random, norms and biases included: a gain of one or a zero bias would hide a mix-up."""
    torch.manual_seed(0)
    gpt = GPT(m).eval()
    with torch.no_grad():
        for p in gpt.parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if p.dim() == 1 and "norm" in _name(gpt, p) else 0.0))
    return gpt


def _name(model: nn.Module, param: torch.Tensor) -> str:
    return next(n for n, p in model.named_parameters() if p is param).replace("ln_", "norm")


def test_every_switch_combination_computes_the_same_or_is_refused_by_name(transformers):
    """All 256 combinations of the architecture switches, in memory: the family's model built from the
    exported config.json holds the exported tensors and gives gptforge's logits; the rest name each switch."""
    exported = set()
    for values in itertools.product(*SWITCHES.values()):
        m = GPTConfig(**SHAPE, **dict(zip(SWITCHES, values)))
        try:
            family = choose(m)
        except Unexportable as e:
            fewest = min(len(f.mismatches(m)) for f in FAMILIES.values())
            for nearest in (f for f in FAMILIES.values() if len(f.mismatches(m)) == fewest):
                assert f"{nearest.title} with " in str(e)
                for key, value, _ in nearest.mismatches(m):
                    shown = str(value).lower() if isinstance(value, bool) else value
                    assert f"model.{key}={shown} (exportable:" in str(e)
            continue
        gpt = _random_gpt(m)
        config = hf_config(family, m, eot=0)
        hf = getattr(transformers, config["architectures"][0])(
            transformers.AutoConfig.for_model(**{k: v for k, v in config.items() if k != "architectures"})).eval()
        missing, unexpected = hf.load_state_dict(to_hf(family, gpt.state_dict(), m), strict=False)
        assert not unexpected and missing == (["lm_head.weight"] if m.tie_embeddings else []), (family, values)
        hf.tie_weights()
        with torch.no_grad():
            assert (hf(_ids()).logits - gpt(_ids())).abs().max() < 1e-4, (family.model_type, values)
        exported.add(family.model_type)
    assert exported == set(FAMILIES)
    assert choose(GPTConfig()).model_type == "apertus"  # the default recipe exports


def test_a_refused_combination_names_its_switch_and_writes_nothing(tokenizer, tmp_path):
    _run(tmp_path / "run", tokenizer, norm="layernorm")  # rotary, LayerNorm and QK-norm: no family
    with pytest.raises(GptforgeError, match=r"nearest: Apertus with model.norm=layernorm \(exportable: model.norm="
                                            r"rmsnorm\) \| GPT-NeoX with model.qk_norm=true \(exportable: "
                                            r"model.qk_norm=false\)"):
        export_hf(tmp_path / "run", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _run(path: Path, tokenizer: Tokenizer, lora: int = 0, **model) -> GPT:
    cfg = from_dict({"model": {**SHAPE, **model}, "finetune": {"lora": {"rank": lora}}})
    gpt = _random_gpt(cfg.model)
    if lora:
        apply_lora(gpt, cfg.finetune.lora)
        for name, p in gpt.named_parameters():
            if name.endswith("lora_B"):
                nn.init.normal_(p, std=0.1)
    tok_file = path.parent / "tokenizer.json"
    tokenizer.save(tok_file)
    save_weights(path, gpt, cfg.to_dict(), step=3, tokenizer_file=tok_file)
    return gpt


@pytest.mark.parametrize("model", [dict(), dict(tie_embeddings=False), dict(mlp="swiglu"),
                                   dict(mlp="swiglu", qk_norm=False, bias=True, tie_embeddings=False),
                                   dict(qk_norm=False, mlp="gelu", bias=True),
                                   dict(qk_norm=False, norm="layernorm", tie_embeddings=False)])
def test_export_loads_without_remote_code_and_tokenizes_alike(transformers, tokenizer, tmp_path, model):
    _run(tmp_path / "run", tokenizer, **model)
    export_hf(tmp_path / "run", tmp_path / "out", report=lambda m: None)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=False).eval()
    gpt, tok = gptforge.load(tmp_path / "run")
    with torch.no_grad():
        assert (hf(_ids()).logits - gpt(_ids())).abs().max() < 1e-4
    assert hf.config.tie_word_embeddings is gpt.config.tie_embeddings
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    text = TEXTS[1][:80]
    assert hf_tok(text).input_ids == tok.encode(text) and hf_tok.decode(tok.encode(text)) == text
    assert hf_tok.eos_token_id == tok.eot_id == hf.config.eos_token_id


def test_a_lora_run_exports_merged(transformers, tokenizer, tmp_path):
    _run(tmp_path / "run", tokenizer, lora=4)
    export_hf(tmp_path / "run", tmp_path / "out", report=lambda m: None)
    merged, _ = gptforge.load(tmp_path / "run")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert (hf(_ids()).logits - merged(_ids())).abs().max() < 1e-4


def test_a_quantized_run_exports_dequantized_with_a_message(transformers, tokenizer, tmp_path, monkeypatch):
    _run(tmp_path / "run", tokenizer)
    quantize_run(tmp_path / "run", tmp_path / "int8", "int8", report=lambda m: None)
    said = []
    export_hf(tmp_path / "int8", tmp_path / "out", report=said.append)
    assert any("int8 layers dequantized to fp32" in s for s in said)
    quantized, _ = gptforge.load(tmp_path / "int8")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    # On a CPU int8 layers run a bf16 kernel; their fp32 path (dequantize, then F.linear) is the exact reference.
    monkeypatch.setattr(Int8Linear, "forward", QuantLinear.forward)
    with torch.no_grad():
        assert (hf(_ids()).logits - quantized(_ids())).abs().max() < 1e-4


def _hf_model(transformers, family: str, tied: bool, **extra):
    """A random model of a transformers family, configured through its own config class."""
    shape = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128 if family != "llama" else 192,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                 max_position_embeddings=32, rms_norm_eps=1e-6, tie_word_embeddings=tied)
    shape.update(extra)
    if family == "arcee":
        shape["hidden_act"] = "relu2"
    if family == "apertus":
        shape.update(hidden_act="relu2", rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if family == "gpt_neox":
        for key in ("num_key_value_heads", "head_dim", "rms_norm_eps"):
            del shape[key]
        shape.update(hidden_act="gelu", use_parallel_residual=False,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0})
    cls = {"llama": "Llama", "qwen3": "Qwen3", "arcee": "Arcee", "apertus": "Apertus", "gpt_neox": "GPTNeoX"}[family]
    torch.manual_seed(0)
    model = getattr(transformers, f"{cls}ForCausalLM")(getattr(transformers, f"{cls}Config")(**shape)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("family, tied", [("llama", True), ("llama", False), ("qwen3", True), ("qwen3", False),
                                          ("arcee", False), ("apertus", True), ("gpt_neox", True)])
def test_import_each_family_then_export_it_back(transformers, tmp_path, family, tied):
    hf = _hf_model(transformers, family, tied)
    hf.save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "run")
    gpt, _ = gptforge.load(tmp_path / "run")
    with torch.no_grad():
        expected = hf(_ids()).logits
        assert (gpt(_ids()) - expected).abs().max() < 1e-4
    assert gpt.config.tie_embeddings is tied and choose(gpt.config).model_type == family
    export_hf(tmp_path / "run", tmp_path / "out", report=lambda m: None)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back) is type(hf)
    with torch.no_grad():
        assert (back(_ids()).logits - expected).abs().max() < 1e-4


@pytest.mark.parametrize("family, key, value, words", [
    ("llama", "num_key_value_heads", 2, "grouped-query attention"),
    ("llama", "rms_norm_eps", 1e-5, "fixed eps of 1e-06"),
    ("llama", "rope_parameters", {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}, "unscaled"),
    ("llama", "hidden_act", "gelu", "hidden_act='gelu' cannot be imported into a Llama model"),
    ("apertus", "hidden_act", "xielu", "hidden_act='xielu'"),
    ("llama", "intermediate_size", 100, "a gated MLP's width is a multiple of 64"),
    ("qwen3", "attention_bias", True, "MLP biases, which Qwen3 lacks"),
    ("gpt_neox", "use_parallel_residual", True, "add attention, then the MLP"),
])
def test_import_refuses_what_gptforge_computes_differently(tmp_path, family, key, value, words):
    config = dict(model_type=family, vocab_size=VOCAB, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32, rms_norm_eps=1e-6,
                  hidden_act="silu")
    if family == "apertus":
        config["hidden_act"] = "relu2"
    if family == "gpt_neox":
        config.update(hidden_act="gelu", rotary_pct=1.0)
    config[key] = value
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(GptforgeError, match="config.json: " + key) as err:
        import_hf(tmp_path / "hf", tmp_path / "run")
    assert words in str(err.value)
    assert not (tmp_path / "run").exists()


def test_a_chat_run_exports_its_template_and_stops_at_end(transformers, tmp_path):
    """A chat fine-tune's tokenizer (chat tokens added, document masking on): AutoTokenizer renders a
    conversation to the ids gptforge's template gives, and generation stops at <|end|>."""
    from gptforge.data.chat import ChatTemplate, with_chat_tokens

    tok = with_chat_tokens(Tokenizer.train_bpe(TEXTS, vocab_size=VOCAB))
    _run(tmp_path / "run", tok, vocab_size=tok.vocab_size, doc_token=tok.eot_id, block_size=64)
    said = []
    export_hf(tmp_path / "run", tmp_path / "out", report=said.append)
    assert any("document masking" in s for s in said)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    messages = [{"role": "system", "content": "Answer in Python."}, {"role": "user", "content": "parse text"},
                {"role": "assistant", "content": "def parse(text):"}, {"role": "user", "content": "a class"}]
    ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    template = ChatTemplate(tok)
    assert ids == template.prompt_ids(messages)
    assert hf_tok.eos_token_id == template.end_id
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert template.end_id in hf.generation_config.eos_token_id
    gpt, _ = gptforge.load(tmp_path / "run")
    x = torch.tensor([ids])
    with torch.no_grad():  # one conversation is one document: document masking changes nothing
        assert (hf(x).logits - gpt(x)).abs().max() < 1e-4


def test_a_trained_default_run_generates_what_gptforge_sample_does(transformers, small_data, tmp_path, capsys):
    """`gptforge train` (default recipe, tiny shape) -> export-hf -> pipeline("text-generation") greedy:
    the same text as `gptforge sample --temperature 0`."""
    from gptforge.cli import main

    run = tmp_path / "run"
    assert main(["train", f"data.dir={small_data}", f"run.dir={run}", "model.preset=tiny", "train.max_steps=10",
                 "train.max_time=null", "train.batch_size=8", "eval.tokens=2048", "train.samples=0",
                 "run.tensorboard=false"]) == 0
    assert main(["export-hf", str(run), "--out", str(tmp_path / "hf")]) == 0
    assert "as ApertusForCausalLM" in capsys.readouterr().out
    prompt = "def parse(self, "
    assert main(["sample", str(run), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "16",
                 "--no-stop", "--safety", "off", "--no-eot-prefix", "--device", "cpu"]) == 0
    ours = capsys.readouterr().out.removesuffix("\n")
    generate = transformers.pipeline("text-generation", model=str(tmp_path / "hf"), device="cpu")
    generate.model.generation_config.eos_token_id = None  # run the full length, as --no-stop does
    theirs = generate(prompt, max_new_tokens=16, do_sample=False)[0]["generated_text"]
    assert theirs == ours and len(ours) > len(prompt)


def test_an_imported_llama_fine_tunes(transformers, small_data, tmp_path):
    """A small Llama-layout checkpoint with the data's tokenizer: imported, then trained by gptforge."""
    from gptforge.cli import main
    from gptforge.data.datadir import load_data_dir
    from gptforge.observe.metrics import read_metrics

    vocab = load_data_dir(small_data).vocab_size
    hf = _hf_model(transformers, "llama", False, vocab_size=vocab)
    hf.save_pretrained(tmp_path / "hf")
    Tokenizer.load(small_data / "tokenizer.json").save(tmp_path / "hf" / "tokenizer.json")
    import_hf(tmp_path / "hf", tmp_path / "llama")
    assert main(["train", f"finetune.init_from={tmp_path / 'llama'}", f"data.dir={small_data}",
                 f"run.dir={tmp_path / 'tuned'}", "train.max_steps=4", "train.max_time=null", "train.batch_size=4",
                 "eval.tokens=1024", "train.samples=0", "run.tensorboard=false", "optim.name=adamw"]) == 0
    tuned, _ = gptforge.load(tmp_path / "tuned")
    assert tuned.config.mlp == "swiglu" and choose(tuned.config).model_type == "llama"
    assert [r["step"] for r in read_metrics(tmp_path / "tuned") if "train_loss" in r][-1] == 4
