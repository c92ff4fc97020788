"""`gptforge export-gguf RUN --out model.gguf [--dtype f32|f16|q8_0]`: a run as a GGUF file for llama.cpp,
written with the `gguf` package (llama.cpp's own writer and tensor-name tables).

The run's Hugging Face family (hf_families.choose) picks llama.cpp's architecture, and the family's tensors
are renamed by gguf's TensorNameMap, as llama.cpp's convert_hf_to_gguf.py does:

    family   llama.cpp arch  notes
    gpt2     gpt2            GELU (tanh) MLP only; fused attn_qkv and biases as GPT-2 has them
    llama    llama           q/k rows permuted to llama.cpp's interleaved rotary pairs (its NORM rope type)
    qwen3    qwen3           NeoX rotary (half-split, as gptforge): no permutation
    arcee    arcee           relu2 MLP only; q/k permuted like llama
    apertus  apertus         relu2 MLP only, as llama.cpp's xIELU with alpha_p = 1, alpha_n = beta = 0:
                             xielu(x) = alpha_p x^2 + beta x for x > 0, (expm1(min(x, eps)) - x) alpha_n + beta x
                             otherwise, where llama.cpp takes softplus of the stored alpha_p and alpha_n, so
                             alpha_p is stored as log(e - 1) and alpha_n as -100 (softplus = 3.7e-44)

Biases are refused outside GPT-2 (llama.cpp's loaders of the others take none for the MLP). The output
head is always written (output.weight), tied or not, so no loader has to know about tying. The tokenizer
goes in as llama.cpp's "gpt2" byte-level BPE (tokens, types, merges, the GPT-2 pre-tokenizer), with
<|endoftext|> as BOS and EOS, and the chat template where the run's tokenizer has one. Norms, biases and
1-D tensors stay f32 in every --dtype; q8_0 applies to matrices whose rows are a multiple of 32.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from gptforge.adapt.hf import exportable_family, plain_state
from gptforge.adapt.hf_families import RMS_EPS, LAYERNORM_EPS, Family, to_hf
from gptforge.errors import GptforgeError

DTYPES = ("f32", "f16", "q8_0")
ARCHS = {"gpt2": "GPT2", "llama": "LLAMA", "qwen3": "QWEN3", "arcee": "ARCEE", "apertus": "APERTUS"}
_PERMUTED = ("llama", "arcee")  # llama.cpp's NORM rope type: rotary pairs are adjacent values
XIELU_ALPHA_P = math.log(math.e - 1)  # softplus of it is 1
XIELU_ALPHA_N = -100.0  # softplus of it is 3.7e-44: the negative branch vanishes


def _gguf():
    try:
        import gguf
    except ImportError:
        raise GptforgeError("export-gguf needs the gguf package: pip install 'gptforge[gguf]'") from None
    return gguf


def export_gguf(run: str | Path, out: str | Path, dtype: str = "f16", *, force: bool = False,
                report: Callable[[str], None] = print) -> Path:
    """Write the run's model and tokenizer to the GGUF file `out` (atomically: a temporary name, then a rename)."""
    from gptforge.runs import load_run

    gguf = _gguf()
    if dtype not in DTYPES:
        raise GptforgeError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    out = Path(out)
    if out.exists() and not force:
        raise GptforgeError(f"{out}: already exists; pass --force to replace it")
    loaded = load_run(run, report=report)
    family = exportable_family(loaded, report)
    m = loaded.config.model
    _check_gguf(family, m, loaded.checkpoint)
    if loaded.tokenizer is None:
        raise GptforgeError(f"{loaded.checkpoint}: the run has no tokenizer.json; a GGUF file carries its tokenizer")
    tensors = gguf_tensors(family, plain_state(loaded, report), m)
    arch = gguf.MODEL_ARCH[ARCHS[family.model_type]]
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
    try:
        writer.add_name(Path(run).name or "gptforge")
        writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
        _hyperparameters(writer, family, m)
        _tokenizer(writer, gguf, loaded, m.vocab_size)
        for name, array in tensors.items():
            data, qtype = _encode(gguf, array, dtype)
            writer.add_tensor(name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def _check_gguf(family: Family, m, where: Path) -> None:
    if family.model_type not in ARCHS:
        raise GptforgeError(f"{where}: cannot export to GGUF: the model is {family.title}'s layout, which export-gguf "
                            f"does not write; it writes {', '.join(ARCHS)} (for LayerNorm with rotary positions, "
                            "model.norm=rmsnorm gives Arcee or Apertus)")
    if family.model_type == "gpt2" and m.mlp != "gelu":
        raise GptforgeError(f"{where}: cannot export to GGUF: model.mlp={m.mlp} with GPT-2's layout; llama.cpp's "
                            "gpt2 computes model.mlp=gelu only")
    if family.model_type in ("arcee", "apertus") and m.mlp != "relu2":
        raise GptforgeError(f"{where}: cannot export to GGUF: model.mlp={m.mlp} with {family.title}'s layout; "
                            f"llama.cpp's {family.model_type} computes model.mlp=relu2 only")
    if family.model_type != "gpt2" and m.bias:
        raise GptforgeError(f"{where}: cannot export to GGUF: model.bias=true with {family.title}'s layout; "
                            "exportable: model.bias=false")


def gguf_tensors(family: Family, state: dict[str, torch.Tensor], m) -> dict[str, np.ndarray]:
    """The family's tensors under llama.cpp's names, fp32 numpy, (out, in) as ggml wants them."""
    gguf = _gguf()
    hf = to_hf(family, state, m)
    if m.tie_embeddings:
        hf["lm_head.weight"] = hf["model.embed_tokens.weight" if family.model_type != "gpt2"
                                  else "transformer.wte.weight"]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[ARCHS[family.model_type]], m.n_layer)
    out = {}
    for name, t in hf.items():
        if family.model_type == "gpt2" and name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            t = t.t()  # HF GPT-2 stores Conv1D (in, out); ggml wants (out, in) like nn.Linear
        if family.model_type in _PERMUTED and name.endswith(("q_proj.weight", "k_proj.weight")):
            t = _interleave_rotary(t, m.n_head)
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise GptforgeError(f"gguf has no llama.cpp name for {name} in {family.model_type}")
        out[new] = t.contiguous().numpy()
    return out


def _interleave_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a q or k projection, each head's [first half | second half] -> pairs side by side, so llama.cpp's
    adjacent-pair rotation computes the half-split rotation gptforge and Llama use."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _hyperparameters(writer, family: Family, m) -> None:
    writer.add_context_length(m.block_size)
    writer.add_embedding_length(m.n_embd)
    writer.add_block_count(m.n_layer)
    writer.add_feed_forward_length(m.mlp_hidden)
    writer.add_head_count(m.n_head)
    writer.add_vocab_size(m.vocab_size)
    if family.model_type == "gpt2":
        writer.add_layer_norm_eps(LAYERNORM_EPS)
        return
    writer.add_head_count_kv(m.n_head)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_rope_freq_base(m.rope_theta)
    writer.add_rope_dimension_count(m.head_dim)
    writer.add_key_length(m.head_dim)
    writer.add_value_length(m.head_dim)
    if family.model_type == "apertus":
        writer.add_xielu_alpha_p([XIELU_ALPHA_P] * m.n_layer)
        writer.add_xielu_alpha_n([XIELU_ALPHA_N] * m.n_layer)
        writer.add_xielu_beta([0.0] * m.n_layer)
        writer.add_xielu_eps([-1e-6] * m.n_layer)


def _tokenizer(writer, gguf, loaded, vocab_size: int) -> None:
    """llama.cpp's "gpt2" BPE: every id up to the model's vocabulary (ids the tokenizer lacks as unused)."""
    raw = json.loads((loaded.checkpoint / "tokenizer.json").read_text(encoding="utf-8"))
    tok = loaded.tokenizer._tok
    special = {a["id"] for a in raw.get("added_tokens", []) if a.get("special")}
    tokens, types = [], []
    for i in range(vocab_size):
        piece = tok.id_to_token(i)
        tokens.append(piece if piece is not None else f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED if piece is None else
                     gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in raw["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    eot = loaded.tokenizer.eot_id
    writer.add_bos_token_id(eot)
    writer.add_eos_token_id(eot)
    writer.add_add_bos_token(True)  # gptforge's documents each follow <|endoftext|>
    from gptforge.data.chat import JINJA_TEMPLATE, ChatTemplate

    chat = ChatTemplate.from_tokenizer(loaded.tokenizer)
    if chat is not None:  # an answer ends at <|end|>: llama.cpp stops at an end-of-turn token
        writer.add_chat_template(JINJA_TEMPLATE)
        writer.add_eot_token_id(chat.end_id)


def _encode(gguf, array: np.ndarray, dtype: str) -> tuple[np.ndarray, object]:
    """The tensor in the file's dtype; 1-D tensors stay f32, q8_0 needs rows of a multiple of 32 values."""
    q = gguf.GGMLQuantizationType
    if array.ndim < 2 or dtype == "f32":
        return array.astype(np.float32), q.F32
    if dtype == "f16":
        return array.astype(np.float16), q.F16
    if array.shape[-1] % 32:
        return array.astype(np.float16), q.F16
    return gguf.quants.quantize(array.astype(np.float32), q.Q8_0), q.Q8_0


def run_export_gguf(args: argparse.Namespace) -> int:
    """`gptforge export-gguf`: export, then say what was written."""
    out = export_gguf(args.run_dir, args.out, args.dtype, force=args.force)
    print(f"exported {args.run_dir} -> {out} ({out.stat().st_size / 2**20:.1f} MiB, {args.dtype}); "
          f"run it with llama.cpp: llama-cli -m {out}")
    return 0
