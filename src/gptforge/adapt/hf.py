"""Hugging Face GPT-2 folders in and out: `gptforge import-hf` and `gptforge export-hf`.

gptforge's module names already are GPT-2's (transformer.h.0.attn.c_attn, ...), so the mapping is small:
GPT-2 stores its linear layers as Conv1D, (in, out), where nn.Linear wants (out, in); gptforge pads the
vocabulary to a multiple of 128 rows; and a tied head is stored once. Weights are read and written as
safetensors only: a folder holding nothing but pickled weights (`pytorch_model.bin`) is refused, because
unpickling a downloaded file can run any code it carries.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gptforge.config import Config, from_dict, load_config
from gptforge.data.tokenizer import EOT, Tokenizer
from gptforge.errors import ConfigError, GptforgeError
from gptforge.model import build_model
from gptforge.model.gpt import GPT, make_norm
from gptforge.runtime import check_fits
from gptforge.train.checkpoint import save_weights

# GPT2Config's defaults, for keys a config.json leaves out (transformers fills them in the same way).
_HF_DEFAULTS = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, n_inner=None,
                    activation_function="gelu_new", layer_norm_epsilon=1e-5, tie_word_embeddings=True,
                    scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
                    reorder_and_upcast_attn=False, add_cross_attention=False)
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_SHARD_INDEX = "model.safetensors.index.json"
_VOCAB_ROWS = ("transformer.wte.weight", "lm_head.weight")  # padded to a multiple of 128 rows in gptforge


def _hf_names(n_layer: int, tied: bool) -> list[str]:
    """Tensor names of a GPT2LMHeadModel; gptforge's state_dict uses the same ones."""
    names = ["transformer.wte.weight", "transformer.wpe.weight"]
    for i in range(n_layer):
        for layer in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
            names += [f"transformer.h.{i}.{layer}.weight", f"transformer.h.{i}.{layer}.bias"]
    names += ["transformer.ln_f.weight", "transformer.ln_f.bias"]
    return names if tied else names + ["lm_head.weight"]


def _is_conv1d(name: str) -> bool:
    return name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight"))


# ----------------------------------------------------------------------------------------------------------
# Import


def import_hf(hf_dir: str | Path, out: str | Path, *, force: bool = False) -> Path:
    """Turn a Hugging Face GPT-2-family folder into a weights-only gptforge run at `out`; returns `out`.

    The run is built under a hidden sibling name and renamed at the end, so `out` never holds half an import.
    """
    hf_dir, out = Path(hf_dir), Path(out)
    _check_out(out, force)
    cfg = _config_from_hf(hf_dir, out)
    model = build_model(cfg.model)
    model.load_state_dict(_gptforge_state(_read_weights(hf_dir), model, hf_dir))

    tokenizer = _read_tokenizer(hf_dir, cfg.model.vocab_size)
    tmp = _fresh_tmp(out)
    try:
        tok_file = None
        if tokenizer is not None:
            tok_file = tmp / ".hf-tokenizer.json"  # save_weights copies it to tokenizer.json
            tokenizer.save(tok_file)
        save_weights(tmp, model, cfg.to_dict(), step=0, tokenizer_file=tok_file,
                     extra={"source": {"kind": "hf", "path": str(hf_dir.resolve())}})
        if tok_file is not None:
            tok_file.unlink()
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _read_hf_config(hf_dir: Path) -> dict:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise GptforgeError(f"{path}: not found; expected a Hugging Face model folder with config.json")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise GptforgeError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise GptforgeError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return {**_HF_DEFAULTS, **raw}


def _config_from_hf(hf_dir: Path, out: Path) -> Config:
    """The gptforge config of a GPT-2 config.json, refusing every setting gptforge's GPT computes differently."""
    hf = _read_hf_config(hf_dir)
    where = hf_dir / "config.json"
    if hf.get("model_type") != "gpt2":
        raise GptforgeError(f"{where}: model_type={hf.get('model_type')!r}; only GPT-2 (model_type 'gpt2') "
                            "folders can be imported")
    if hf["activation_function"] not in _TANH_GELUS:
        raise GptforgeError(f"{where}: activation_function={hf['activation_function']!r} cannot be imported: "
                            f"gptforge's GELU is the tanh approximation ({' or '.join(_TANH_GELUS)})")
    refused = dict(scale_attn_weights=(False, "gptforge always scales attention by 1/sqrt(head size)"),
                   scale_attn_by_inverse_layer_idx=(True, "gptforge does not scale attention by layer"),
                   reorder_and_upcast_attn=(True, "gptforge has no reordered, upcast attention"),
                   add_cross_attention=(True, "gptforge is decoder-only, without cross-attention"))
    for key, (bad, why) in refused.items():
        if hf[key] == bad:
            raise GptforgeError(f"{where}: {key}={json.dumps(bad)} cannot be imported: {why}")
    for key in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", *(["n_inner"] if hf["n_inner"] else [])):
        if not (isinstance(hf[key], int) and not isinstance(hf[key], bool) and hf[key] > 0):
            raise GptforgeError(f"{where}: {key}: expected a positive integer, got {json.dumps(hf[key])[:60]}")
    if not (isinstance(hf["layer_norm_epsilon"], (int, float)) and hf["layer_norm_epsilon"] > 0):
        raise GptforgeError(f"{where}: layer_norm_epsilon: expected a positive number, "
                            f"got {json.dumps(hf['layer_norm_epsilon'])[:60]}")
    n_embd = hf["n_embd"]
    n_inner = hf["n_inner"] or 4 * n_embd
    model = dict(vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_layer=hf["n_layer"],
                 n_head=hf["n_head"], n_embd=n_embd, mlp_ratio=n_inner / n_embd, pos="learned",
                 norm="layernorm", mlp="gelu", bias=True, tie_embeddings=bool(hf["tie_word_embeddings"]),
                 qk_norm=False, zero_init_proj=False)
    try:
        cfg = from_dict({"model": model, "run": {"dir": str(out)}}, source=str(where))
        check_fits(cfg.model, bytes_per_param=4, device="cpu", what="fp32 weights")
    except ConfigError as e:
        raise GptforgeError(f"{where}: {e}") from None
    if cfg.model.mlp_hidden != n_inner:
        raise GptforgeError(f"{where}: n_inner={n_inner} is not expressible as model.mlp_ratio x n_embd={n_embd}")
    eps = make_norm(cfg.model, 1).eps
    if hf["layer_norm_epsilon"] != eps:
        raise GptforgeError(f"{where}: layer_norm_epsilon={hf['layer_norm_epsilon']} cannot be imported: "
                            f"gptforge's LayerNorm uses a fixed eps of {eps}")
    return cfg


def _read_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of model.safetensors, or of the shards named by model.safetensors.index.json."""
    if (hf_dir / "model.safetensors").is_file():
        files = [hf_dir / "model.safetensors"]
    elif (hf_dir / _SHARD_INDEX).is_file():
        index = hf_dir / _SHARD_INDEX
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = [hf_dir / name for name in sorted(set(weight_map.values()))]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise GptforgeError(f"{index}: not a safetensors index (expected a 'weight_map' object; {e})") from None
    else:
        pickles = sorted(p.name for p in hf_dir.iterdir() if p.suffix in _PICKLE_SUFFIXES) if hf_dir.is_dir() else []
        if pickles:
            raise GptforgeError(
                f"{hf_dir}: weights only in pickle format ({', '.join(pickles)}); gptforge loads no pickle, since "
                "unpickling can run arbitrary code. Convert them to safetensors in a trusted environment, e.g. "
                "transformers: AutoModelForCausalLM.from_pretrained(folder).save_pretrained(folder, "
                "safe_serialization=True)")
        raise GptforgeError(f"{hf_dir}: no model.safetensors or {_SHARD_INDEX} found")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            tensors.update(load_file(str(file)))
        except (SafetensorError, OSError) as e:
            raise GptforgeError(f"{file}: not a readable safetensors file ({e})") from None
    return tensors


def _gptforge_state(tensors: dict[str, torch.Tensor], model: GPT, hf_dir: Path) -> dict[str, torch.Tensor]:
    """HF tensors renamed, transposed and padded into `model`'s state_dict; refuses missing, stray or misshapen ones.

    Checkpoints saved from GPT2Model lack the `transformer.` prefix; the attention-mask buffers
    (attn.bias, attn.masked_bias) of older saves are constants, rebuilt by gptforge's attention.
    """
    m = model.config
    renamed = {}
    for name, tensor in tensors.items():
        name = name if name.startswith(("transformer.", "lm_head.")) else f"transformer.{name}"
        if not name.endswith((".attn.bias", ".attn.masked_bias")):
            renamed[name] = tensor
    if m.tie_embeddings:
        renamed.pop("lm_head.weight", None)  # some saves store the tied head too
    expected = _hf_names(m.n_layer, m.tie_embeddings)
    missing = [n for n in expected if n not in renamed]
    stray = sorted(set(renamed) - set(expected))
    if missing or stray:
        raise GptforgeError(f"{hf_dir}: the weights do not match config.json"
                            + (f"; missing: {', '.join(missing[:8])}" if missing else "")
                            + (f"; unexpected: {', '.join(stray[:8])}" if stray else ""))
    own = model.state_dict()
    state = {}
    for name in expected:
        if not renamed[name].is_floating_point():
            raise GptforgeError(f"{hf_dir}: {name} is {renamed[name].dtype}, not floating point; gptforge imports "
                                "unquantized weights (fp32, fp16 or bf16)")
        if not torch.isfinite(renamed[name]).all():
            raise GptforgeError(f"{hf_dir}: {name} holds NaN or infinite values")
        t = renamed[name].float()
        t = t.t() if _is_conv1d(name) else t
        want = own[name].shape
        if name in _VOCAB_ROWS:
            want = (m.vocab_size, *want[1:])
        if t.shape != want:
            raise GptforgeError(f"{hf_dir}: {name} has shape {tuple(renamed[name].shape)}, which does not match "
                                "config.json (n_embd, n_inner, n_positions, vocab_size)")
        if name in _VOCAB_ROWS:
            t = torch.cat([t, t.new_zeros(m.padded_vocab_size - m.vocab_size, m.n_embd)])
        state[name] = t.contiguous()
    if m.tie_embeddings:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


def _read_tokenizer(hf_dir: Path, vocab_size: int) -> Tokenizer | None:
    """The folder's tokenizer, or None when it has none; refused when it needs more ids than the model has.

    An <|endoftext|> added beyond the model's vocabulary would get a zero embedding and a logit of zero,
    far above GPT-2's usual logits: generation would emit it everywhere.
    """
    if not ((hf_dir / "tokenizer.json").is_file() or (hf_dir / "vocab.json").is_file()):
        return None
    tokenizer = Tokenizer.from_pretrained(hf_dir)
    if tokenizer.vocab_size > vocab_size:
        raise GptforgeError(f"{hf_dir}: the tokenizer uses {tokenizer.vocab_size} ids ({EOT} is id {tokenizer.eot_id}) "
                            f"but config.json vocab_size is {vocab_size}")
    return tokenizer


# ----------------------------------------------------------------------------------------------------------
# Export


def export_hf(run: str | Path, out: str | Path, *, force: bool = False) -> Path:
    """Write a run's model (newest intact checkpoint, or the checkpoint given) as a GPT2LMHeadModel folder.

    `out` gets config.json, model.safetensors and, when the run has a tokenizer, tokenizer.json with the
    tokenizer_config.json and special_tokens_map.json that transformers.AutoTokenizer reads. Biases a
    bias=False model lacks are written as zeros, which computes exactly the same function.
    """
    from gptforge.runs import load_run

    out = Path(out)
    _check_out(out, force)
    loaded = load_run(run, gpt_only="gptforge export-hf")
    m = loaded.config.model
    _check_exportable(loaded.config, loaded.checkpoint)
    state = loaded.model.state_dict()
    tensors = {}
    for name in _hf_names(m.n_layer, m.tie_embeddings):
        t = state.get(name)
        if t is None:  # a bias of a bias=False model
            t = torch.zeros(state[name.removesuffix("bias") + "weight"].shape[0])
        t = t.t() if _is_conv1d(name) else t
        t = t[:m.vocab_size] if name in _VOCAB_ROWS else t
        tensors[name] = t.detach().float().contiguous().cpu()

    eot = loaded.tokenizer.eot_id if loaded.tokenizer is not None else None
    config = dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=m.vocab_size,
                  n_positions=m.block_size, n_ctx=m.block_size, n_embd=m.n_embd, n_layer=m.n_layer,
                  n_head=m.n_head, n_inner=m.mlp_hidden, activation_function="gelu_new",
                  layer_norm_epsilon=loaded.model.transformer.ln_f.eps, resid_pdrop=m.dropout,
                  attn_pdrop=m.dropout, embd_pdrop=0.0, initializer_range=0.02, scale_attn_weights=True,
                  scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False, use_cache=True,
                  tie_word_embeddings=m.tie_embeddings, bos_token_id=eot, eos_token_id=eot)

    tmp = _fresh_tmp(out)
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _write_json(tmp / "config.json", config)
        if loaded.tokenizer is not None:
            shutil.copyfile(loaded.checkpoint / "tokenizer.json", tmp / "tokenizer.json")
            special = dict(bos_token=EOT, eos_token=EOT, unk_token=EOT)
            _write_json(tmp / "special_tokens_map.json", special)
            # PreTrainedTokenizerFast takes tokenizer.json as it is; GPT2TokenizerFast would assume GPT-2's
            # pre-tokenizer, which a gptforge tokenizer need not have.
            _write_json(tmp / "tokenizer_config.json", dict(
                tokenizer_class="PreTrainedTokenizerFast", model_max_length=m.block_size,
                clean_up_tokenization_spaces=False, **special))
            _write_json(tmp / "generation_config.json", dict(bos_token_id=eot, eos_token_id=eot))
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _check_exportable(cfg: Config, where: Path) -> None:
    """Refuse, all at once, every model setting HF GPT-2 has no way to express."""
    m = cfg.model
    wrong = [(key, value, why) for key, value, ok, why in (
        ("pos", m.pos, m.pos == "learned", "HF GPT-2 has learned absolute positions only, no rotary"),
        ("norm", m.norm, m.norm == "layernorm", "HF GPT-2 normalizes with LayerNorm"),
        ("mlp", m.mlp, m.mlp == "gelu", "HF GPT-2's MLP is GELU (tanh approximation)"),
        ("qk_norm", m.qk_norm, not m.qk_norm, "HF GPT-2 attention has no QK-norm"),
        ("logit_softcap", m.logit_softcap, m.logit_softcap == 0, "HF GPT-2 has no logit soft-capping"),
    ) if not ok]
    if wrong:
        raise GptforgeError(f"{where}: cannot export to Hugging Face GPT-2: "
                            + "; ".join(f"model.{k}={v!r} ({why})" for k, v, why in wrong))


# ----------------------------------------------------------------------------------------------------------
# Folders


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        raise GptforgeError(f"{out}: already exists and is not empty; pass --force (force=True) to replace it")


def _fresh_tmp(out: Path) -> Path:
    """An empty hidden sibling of `out` to build in; same filesystem, so the final rename is atomic."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished `tmp` to `out`; a previous `out` is set aside first and deleted only afterwards."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.rename(out, old)
    os.rename(tmp, out)
    if old.is_dir():
        shutil.rmtree(old)
    elif old.exists():
        old.unlink()


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------------------
# Command line


def run_import(args: argparse.Namespace) -> int:
    """`gptforge import-hf`: import, then say what was imported and whether a tokenizer came with it."""
    out = import_hf(args.hf_dir, args.out, force=args.force)
    m = load_config(out / "config.yaml").model
    print(f"imported {args.hf_dir} -> {out}: GPT-2, {m.n_layer} x {m.n_embd}, {m.n_head} heads, context "
          f"{m.block_size}, vocab {m.vocab_size}, {'tied' if m.tie_embeddings else 'untied'} head")
    if (out / "tokenizer.json").is_file():
        print(f"tokenizer: {out / 'tokenizer.json'}")
    else:
        print(f"no tokenizer: {args.hf_dir} has no tokenizer.json or vocab.json + merges.txt; "
              "`gptforge sample` needs one")
    return 0


def run_export(args: argparse.Namespace) -> int:
    """`gptforge export-hf`: export, then say how to load the result."""
    out = export_hf(args.run_dir, args.out, force=args.force)
    files = sorted(p.name for p in out.iterdir())
    print(f"exported {args.run_dir} -> {out}: {', '.join(files)}")
    if "tokenizer.json" not in files:
        print(f"no tokenizer: {args.run_dir} has no tokenizer.json, so none was exported")
    print(f"load it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0
