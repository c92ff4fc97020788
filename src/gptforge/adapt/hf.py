"""Hugging Face folders in and out: `gptforge import-hf` and `gptforge export-hf`.

Which transformers family computes a gptforge model, and the tensor names between them, live in
hf_families.py; this module reads and writes the folders. gptforge pads the vocabulary to a multiple of 128
rows (cut on export, padded on import) and a tied head is stored once. Weights are read and written as
safetensors only: a folder holding nothing but pickled weights (`pytorch_model.bin`) is refused, because
unpickling a downloaded file can run any code it carries.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gptforge.adapt.hf_families import FAMILIES, Family, Unexportable, Unimportable, choose, from_hf, hf_config, \
    model_keys, to_hf
from gptforge.config import Config, from_dict, load_config
from gptforge.data.tokenizer import EOT, Tokenizer
from gptforge.errors import ConfigError, GptforgeError
from gptforge.model import build_model
from gptforge.model.gpt import GPT
from gptforge.runtime import check_fits
from gptforge.train.checkpoint import save_weights

if TYPE_CHECKING:
    from gptforge.runs import LoadedRun

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_SHARD_INDEX = "model.safetensors.index.json"


# ----------------------------------------------------------------------------------------------------------
# Import


def import_hf(hf_dir: str | Path, out: str | Path, *, force: bool = False) -> Path:
    """Turn a Hugging Face folder of a family gptforge computes (hf_families.FAMILIES) into a weights-only
    gptforge run at `out`; returns `out`.

    The run is built under a hidden sibling name and renamed at the end, so `out` never holds half an import.
    """
    hf_dir, out = Path(hf_dir), Path(out)
    _check_out(out, force)
    family, cfg = _config_from_hf(hf_dir, out)
    model = build_model(cfg.model)
    model.load_state_dict(_gptforge_state(family, _read_weights(hf_dir), model, hf_dir))

    tokenizer = _read_tokenizer(hf_dir, cfg.model.vocab_size)
    tmp = _fresh_tmp(out)
    try:
        tok_file = None
        if tokenizer is not None:
            tok_file = tmp / ".hf-tokenizer.json"  # save_weights copies it to tokenizer.json
            tokenizer.save(tok_file)
        save_weights(tmp, model, cfg.to_dict(), step=0, tokenizer_file=tok_file,
                     extra={"source": {"kind": "hf", "family": family.model_type, "path": str(hf_dir.resolve())}})
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
    return raw


def _config_from_hf(hf_dir: Path, out: Path) -> tuple[Family, Config]:
    """The family and gptforge config of a config.json, refusing every setting gptforge's GPT computes differently."""
    hf = _read_hf_config(hf_dir)
    where = hf_dir / "config.json"
    try:
        model = model_keys(hf)
        cfg = from_dict({"model": model, "run": {"dir": str(out)}}, source=str(where))
        check_fits(cfg.model, bytes_per_param=4, device="cpu", what="fp32 weights")
    except (Unimportable, ConfigError) as e:
        raise GptforgeError(f"{where}: {e}") from None
    return FAMILIES[hf["model_type"]], cfg


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


def _gptforge_state(family: Family, tensors: dict[str, torch.Tensor], model: GPT,
                    hf_dir: Path) -> dict[str, torch.Tensor]:
    """HF tensors renamed, joined and padded into `model`'s state_dict; refuses missing, stray or misshapen ones.

    GPT-2 checkpoints saved from GPT2Model lack the `transformer.` prefix; the attention-mask buffers
    (attn.bias, attn.masked_bias) of older saves are constants, rebuilt by gptforge's attention.
    """
    m = model.config
    if family.model_type == "gpt2":
        tensors = {(n if n.startswith(("transformer.", "lm_head.")) else f"transformer.{n}"): t
                   for n, t in tensors.items() if not n.endswith((".attn.bias", ".attn.masked_bias"))}
    if m.tie_embeddings:
        tensors = {n: t for n, t in tensors.items() if n != "lm_head.weight"}  # some saves store the tied head too
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise GptforgeError(f"{hf_dir}: {name} is {t.dtype}, not floating point; gptforge imports "
                                "unquantized weights (fp32, fp16 or bf16)")
        if not torch.isfinite(t).all():
            raise GptforgeError(f"{hf_dir}: {name} holds NaN or infinite values")
    shapes = {n: tuple(t.shape) for n, t in to_hf(family, model.state_dict(), m).items()}  # what the family holds
    missing, stray = [n for n in shapes if n not in tensors], sorted(set(tensors) - set(shapes))
    if missing or stray:
        raise GptforgeError(f"{hf_dir}: the weights do not match config.json"
                            + (f"; missing: {', '.join(missing[:8])}" if missing else "")
                            + (f"; unexpected: {', '.join(stray[:8])}" if stray else ""))
    for name, want in shapes.items():
        if tuple(tensors[name].shape) != want:
            raise GptforgeError(f"{hf_dir}: {name} has shape {tuple(tensors[name].shape)}, which does not match "
                                f"config.json (expected {want})")
    state, _ = from_hf(family, {n: t.float() for n, t in tensors.items()}, m)
    for name in ("transformer.wte.weight", "lm_head.weight"):  # padded to a multiple of vocab_multiple rows
        if name in state:
            t = state[name]
            state[name] = torch.cat([t, t.new_zeros(m.padded_vocab_size - m.vocab_size, m.n_embd)])
    if m.tie_embeddings:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    return {n: t.contiguous() for n, t in state.items()}


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


def export_hf(run: str | Path, out: str | Path, *, force: bool = False,
              report: Callable[[str], None] = print) -> Path:
    """Write a run's model (newest intact checkpoint, or the checkpoint given) as a folder of the transformers
    family that computes it exactly (hf_families.choose); refused before anything is written when none does.

    `out` gets config.json, model.safetensors (fp32) and, when the run has a tokenizer, tokenizer.json with the
    tokenizer_config.json and special_tokens_map.json that transformers.AutoTokenizer reads. A quantized run
    is exported dequantized (`report` says so); LoRA adapters come merged, as load_run gives them.
    """
    from gptforge.runs import load_run

    out = Path(out)
    _check_out(out, force)
    loaded = load_run(run, report=report)
    family = exportable_family(loaded, report)
    m = loaded.config.model
    tensors = to_hf(family, plain_state(loaded, report), m)
    eot = loaded.tokenizer.eot_id if loaded.tokenizer is not None else None
    tmp = _fresh_tmp(out)
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _write_json(tmp / "config.json", hf_config(family, m, eot))
        if loaded.tokenizer is not None:
            _write_tokenizer(loaded, tmp)
            _write_json(tmp / "generation_config.json", dict(bos_token_id=eot, eos_token_id=_stop_ids(loaded)))
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def exportable_family(loaded: LoadedRun, report: Callable[[str], None] = print) -> Family:
    """The family that computes the run's model exactly, or a GptforgeError naming the switches that stop it.

    Document masking (model.doc_token) is no switch of any family: within one document it computes plain
    causal attention (rotary scores depend on distances only, and a document that starts the input starts at
    position 0), so the export is exact on text that holds one document, as a prompt or a conversation does;
    `report` says so."""
    m = loaded.config.model
    if m.arch != "gpt":
        raise GptforgeError(f"{loaded.checkpoint}: model.arch={m.arch!r} cannot be exported; "
                            "only model.arch=gpt maps to a Hugging Face family")
    try:
        family = choose(m)
    except Unexportable as e:
        raise GptforgeError(f"{loaded.checkpoint}: cannot export: {e}") from None
    if getattr(m, "doc_token", -1) >= 0:
        report(f"{loaded.checkpoint}: the model masks attention at token {m.doc_token} (document masking); the "
               "export attends across documents, so it computes the same only on inputs holding one document "
               f"(token {m.doc_token} first or absent), as a prompt or one conversation does")
    return family


def _stop_ids(loaded: LoadedRun) -> int | list[int]:
    """Where generation stops: end-of-text, and for a run with a chat template <|end|> too."""
    from gptforge.data.chat import ChatTemplate

    template = ChatTemplate.from_tokenizer(loaded.tokenizer)
    return loaded.tokenizer.eot_id if template is None else [template.end_id, loaded.tokenizer.eot_id]


def plain_state(loaded: LoadedRun, report: Callable[[str], None] = print) -> dict[str, torch.Tensor]:
    """The model's state_dict with quantized layers dequantized to fp32 weights (said through `report`)."""
    from gptforge.adapt.qlinear import QuantLinear

    state = dict(loaded.model.state_dict())
    quantized = [(n, mod) for n, mod in loaded.model.named_modules() if isinstance(mod, QuantLinear)]
    for name, module in quantized:
        for key in [k for k in state if k.startswith(f"{name}.")]:
            del state[key]
        state[f"{name}.weight"] = module.dequantize(torch.float32)
        if module.bias is not None:
            state[f"{name}.bias"] = module.bias
    if quantized:
        method = loaded.state.get("quantization", {}).get("method", "quantized")
        report(f"{loaded.checkpoint}: {len(quantized)} {method} layers dequantized to fp32: the export computes "
               "what the quantized run computes, at fp32 size")
    return state


def _write_tokenizer(loaded: LoadedRun, folder: Path) -> None:
    """tokenizer.json as the run has it, and the config that makes AutoTokenizer a PreTrainedTokenizerFast
    (GPT2TokenizerFast would assume GPT-2's pre-tokenizer, which a gptforge tokenizer need not have)."""
    from gptforge.data.chat import END, JINJA_TEMPLATE, ChatTemplate

    shutil.copyfile(loaded.checkpoint / "tokenizer.json", folder / "tokenizer.json")
    chat = ChatTemplate.from_tokenizer(loaded.tokenizer) is not None
    # a chat run's answer ends at <|end|>: generation stops there (generation_config.json lists it too)
    special = dict(bos_token=EOT, eos_token=END if chat else EOT, unk_token=EOT)
    _write_json(folder / "special_tokens_map.json", special)
    config = dict(tokenizer_class="PreTrainedTokenizerFast", model_max_length=loaded.config.model.block_size,
                  clean_up_tokenization_spaces=False, **special)
    if chat:
        config["chat_template"] = JINJA_TEMPLATE
    _write_json(folder / "tokenizer_config.json", config)


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
    title = FAMILIES[_read_hf_config(Path(args.hf_dir))["model_type"]].title
    print(f"imported {args.hf_dir} -> {out}: {title}, {m.n_layer} x {m.n_embd}, {m.n_head} heads, context "
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
    arch = json.loads((out / "config.json").read_text(encoding="utf-8"))["architectures"][0]
    print(f"exported {args.run_dir} -> {out} as {arch}: {', '.join(files)}")
    if "tokenizer.json" not in files:
        print(f"no tokenizer: {args.run_dir} has no tokenizer.json, so none was exported")
    print(f"load it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0
