"""Which Hugging Face transformers family computes a gptforge model exactly, and how tensors map between them.

Every family here is a standard transformers architecture (no trust_remote_code). Each computes one slice of
gptforge's switches exactly, read from its modeling code in transformers 5:

    family   positions  norm       MLP                          QK-norm  biases
    gpt2     learned    LayerNorm  gelu / gelu_exact / relu2    no       yes (zeros when bias=false)
    llama    rope       RMSNorm    swiglu                       no       yes (attention_bias, mlp_bias)
    qwen3    rope       RMSNorm    swiglu                       yes      no
    arcee    rope       RMSNorm    relu2 / gelu / gelu_exact    no       yes (attention_bias, mlp_bias)
    apertus  rope       RMSNorm    relu2 / gelu / gelu_exact    yes      no
    gpt_neox rope       LayerNorm  gelu / gelu_exact / relu2    no       yes (zeros when bias=false)

All of them: pre-norm blocks, attention scaled by 1/sqrt(head size), rotary in the half-split (NeoX/Llama)
layout with inv_freq = theta^(-2i/hd), QK-norm an RMSNorm over head_dim with one gain shared by the heads,
applied before the rotation (as gptforge does), norm gains learnable, so no gain has to be folded into a
linear layer and a tied head stays tied. The default recipe (rope, RMSNorm, relu2, QK-norm, no biases) is
Apertus with hidden_act=relu2.

GPT-NeoX is written with use_parallel_residual=false and the whole head rotated (partial_rotary_factor 1);
its fused query_key_value holds [q | k | v] per head, where gptforge's c_attn holds all queries, then all
keys, then all values.

Not exportable: logit soft-capping (the families that cap, Gemma 2/3 and NanoChat, add norms gptforge lacks:
Gemma's post-norms, NanoChat's norm of the embeddings), RMSNorm or a gated MLP with learned positions,
LayerNorm with a gated MLP or QK-norm, and biases with QK-norm. `choose` names the switches and the nearest
families' settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from gptforge.model.config import GATED_MLPS, GPTConfig

RMS_EPS = 1e-6  # gptforge's fixed RMSNorm eps (model/gpt.py RMS_NORM_EPS), kept here so the config needs no torch
LAYERNORM_EPS = 1e-5  # nn.LayerNorm's default, which gptforge uses


@dataclass(frozen=True)
class Family:
    """A transformers family and the gptforge switch values it computes exactly."""

    model_type: str
    architecture: str
    title: str
    allowed: dict[str, tuple]  # model.<switch> -> the values this family computes
    activations: dict[str, str] = field(default_factory=dict)  # model.mlp -> the family's activation name
    norm_names: tuple[str, str] = ("input_layernorm", "post_attention_layernorm")
    mlp_bias: bool = True  # whether the family has an mlp_bias switch (Qwen3 and Apertus have none)

    def mismatches(self, m: GPTConfig) -> list[tuple[str, object, tuple]]:
        return [(k, getattr(m, k), ok) for k, ok in self.allowed.items() if getattr(m, k) not in ok]


_NON_GATED = {"relu2": "relu2", "gelu": "gelu_pytorch_tanh", "gelu_exact": "gelu"}
_BOTH, _NO, _YES, _ZERO = (False, True), (False,), (True,), (0.0,)

FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("gpt2", "GPT2LMHeadModel", "GPT-2",
           dict(pos=("learned",), norm=("layernorm",), mlp=("gelu", "gelu_exact", "relu2"), qk_norm=_NO,
                bias=_BOTH, logit_softcap=_ZERO),
           activations={"gelu": "gelu_new", "gelu_exact": "gelu", "relu2": "relu2"}),
    Family("llama", "LlamaForCausalLM", "Llama",
           dict(pos=("rope",), norm=("rmsnorm",), mlp=("swiglu",), qk_norm=_NO, bias=_BOTH, logit_softcap=_ZERO),
           activations={"swiglu": "silu"}),
    Family("qwen3", "Qwen3ForCausalLM", "Qwen3",
           dict(pos=("rope",), norm=("rmsnorm",), mlp=("swiglu",), qk_norm=_YES, bias=_NO, logit_softcap=_ZERO),
           activations={"swiglu": "silu"}, mlp_bias=False),
    Family("arcee", "ArceeForCausalLM", "Arcee",
           dict(pos=("rope",), norm=("rmsnorm",), mlp=tuple(_NON_GATED), qk_norm=_NO, bias=_BOTH,
                logit_softcap=_ZERO),
           activations=_NON_GATED),
    Family("apertus", "ApertusForCausalLM", "Apertus",
           dict(pos=("rope",), norm=("rmsnorm",), mlp=tuple(_NON_GATED), qk_norm=_YES, bias=_NO,
                logit_softcap=_ZERO),
           activations=_NON_GATED, norm_names=("attention_layernorm", "feedforward_layernorm"), mlp_bias=False),
    Family("gpt_neox", "GPTNeoXForCausalLM", "GPT-NeoX",
           dict(pos=("rope",), norm=("layernorm",), mlp=("gelu", "gelu_exact", "relu2"), qk_norm=_NO, bias=_BOTH,
                logit_softcap=_ZERO),
           activations={"gelu": "gelu_new", "gelu_exact": "gelu", "relu2": "relu2"}),
)}


class Unexportable(ValueError):
    """No family computes the config; the message names each switch and the nearest family's values."""


def choose(m: GPTConfig) -> Family:
    """The family that computes `m` exactly; else Unexportable naming, for each nearest family (fewest switches
    to change), the switches and the values it computes."""
    ranked = sorted(FAMILIES.values(), key=lambda f: len(f.mismatches(m)))  # stable: table order breaks ties
    best = ranked[0]
    if not best.mismatches(m):
        return best
    nearest = [f for f in ranked if len(f.mismatches(m)) == len(best.mismatches(m))]
    needs = " | ".join(f"{f.title} with " + "; ".join(
        f"model.{k}={_show(v)} (exportable: {' or '.join(f'model.{k}={_show(x)}' for x in ok)})"
        for k, v, ok in f.mismatches(m)) for f in nearest)
    raise Unexportable(f"no Hugging Face family computes this model exactly; nearest: {needs}")


def _show(v: object) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


# ----------------------------------------------------------------------------------------------------------
# config.json


def hf_config(family: Family, m: GPTConfig, eot: int | None) -> dict:
    """config.json of `family` for the gptforge model `m` (vocab_size the real, unpadded vocabulary)."""
    common = dict(architectures=[family.architecture], model_type=family.model_type, vocab_size=m.vocab_size,
                  tie_word_embeddings=m.tie_embeddings, bos_token_id=eot, eos_token_id=eot, pad_token_id=None,
                  use_cache=True, initializer_range=0.02, dtype="float32")
    if family.model_type == "gpt2":
        return dict(common, n_positions=m.block_size, n_ctx=m.block_size, n_embd=m.n_embd, n_layer=m.n_layer,
                    n_head=m.n_head, n_inner=m.mlp_hidden, activation_function=family.activations[m.mlp],
                    layer_norm_epsilon=LAYERNORM_EPS, resid_pdrop=m.dropout, attn_pdrop=m.dropout, embd_pdrop=0.0,
                    scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False)
    config = dict(common, hidden_size=m.n_embd, intermediate_size=m.mlp_hidden, num_hidden_layers=m.n_layer,
                  num_attention_heads=m.n_head, num_key_value_heads=m.n_head, head_dim=m.head_dim,
                  hidden_act=family.activations[m.mlp], max_position_embeddings=m.block_size,
                  rms_norm_eps=RMS_EPS, rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta},
                  attention_bias=m.bias, attention_dropout=m.dropout,
                  rope_theta=m.rope_theta, rope_scaling=None)  # how transformers 4.x reads the same rotation
    if family.mlp_bias:
        config["mlp_bias"] = m.bias
    if family.model_type == "qwen3":
        config.update(use_sliding_window=False, sliding_window=None, layer_types=["full_attention"] * m.n_layer)
    if family.model_type == "gpt_neox":
        for key in ("num_key_value_heads", "head_dim", "rms_norm_eps"):
            del config[key]
        config.update(layer_norm_eps=LAYERNORM_EPS, use_parallel_residual=False, attention_bias=True,
                      rotary_pct=1.0, rotary_emb_base=m.rope_theta,  # transformers 4.x's names
                      hidden_dropout=m.dropout, rope_parameters={**config["rope_parameters"],
                                                                 "partial_rotary_factor": 1.0})
    return config


# ----------------------------------------------------------------------------------------------------------
# Tensors: gptforge state_dict <-> the family's names. Vocabulary rows are unpadded here; hf.py pads them.


def to_hf(family: Family, state: dict[str, torch.Tensor], m: GPTConfig) -> dict[str, torch.Tensor]:
    """A plain (unquantized, LoRA-merged) gptforge state_dict -> the family's tensors, fp32, vocabulary unpadded."""
    out = {}
    for hf_name, (name, how) in _layout(family, m).items():
        t = state.get(name)
        if t is None:  # a bias of a bias=False model, for a family whose biases are always there (GPT-2, NeoX)
            t = torch.zeros(state[name.rsplit(".", 1)[0] + ".weight"].shape[0])
        out[hf_name] = _cut(t, how, m).detach().float().contiguous().cpu()
    return out


def from_hf(family: Family, tensors: dict[str, torch.Tensor], m: GPTConfig) -> tuple[dict, list[str]]:
    """The family's tensors -> gptforge names (vocabulary unpadded, fused q/k/v and gate/up joined); the missing."""
    layout = _layout(family, m)
    parts: dict[str, list] = {}
    missing = []
    for hf_name, (name, how) in layout.items():
        if hf_name not in tensors:
            missing.append(hf_name)
            continue
        parts.setdefault(name, []).append((how, tensors[hf_name]))
    state = {}
    for name, pieces in parts.items():
        pieces.sort(key=lambda p: _ORDER.get(p[0], 0))
        joined = torch.cat([p[1] for p in pieces]) if len(pieces) > 1 else pieces[0][1]
        how = pieces[0][0]
        state[name] = joined.t() if how == "conv1d" else _heads_qkv(joined, m, back=True) if how == "neox_qkv" \
            else joined
    return state, missing


def _heads_qkv(t: torch.Tensor, m: GPTConfig, back: bool = False) -> torch.Tensor:
    """gptforge's c_attn rows [all q | all k | all v] (3C, ...) <-> NeoX's [q | k | v] per head; back: NeoX's
    to gptforge's."""
    nh, hd = m.n_head, m.head_dim
    rest = t.shape[1:]
    if back:
        return t.reshape(nh, 3, hd, *rest).transpose(0, 1).reshape(t.shape)
    return t.reshape(3, nh, hd, *rest).transpose(0, 1).reshape(t.shape)


_ORDER = {"q": 0, "k": 1, "v": 2, "gate": 0, "up": 1}


def _cut(t: torch.Tensor, how: str, m: GPTConfig) -> torch.Tensor:
    """The piece `how` of gptforge tensor `t`: q/k/v thirds of c_attn, gate/up halves of a gated c_fc."""
    C, H = m.n_embd, m.mlp_hidden
    if how in ("q", "k", "v"):
        i = "qkv".index(how)
        return t[i * C:(i + 1) * C]
    if how in ("gate", "up") and m.mlp in GATED_MLPS:
        return t[:H] if how == "gate" else t[H:]
    if how == "vocab":
        return t[:m.vocab_size]
    if how == "neox_qkv":
        return _heads_qkv(t, m)
    return t.t() if how == "conv1d" else t


def _layout(family: Family, m: GPTConfig) -> dict[str, tuple[str, str]]:
    """HF tensor name -> (gptforge name, how to cut it), in the family's order; a tied head is listed once."""
    if family.model_type == "gpt2":
        return _gpt2_layout(m)
    if family.model_type == "gpt_neox":
        return _neox_layout(m)
    ln1, ln2 = family.norm_names
    names = {"model.embed_tokens.weight": ("transformer.wte.weight", "vocab")}
    kinds = ("weight", "bias") if m.bias else ("weight",)
    for i in range(m.n_layer):
        g, h = f"transformer.h.{i}", f"model.layers.{i}"
        names[f"{h}.{ln1}.weight"] = (f"{g}.ln_1.weight", "")
        for kind in kinds:
            for proj in "qkv":
                names[f"{h}.self_attn.{proj}_proj.{kind}"] = (f"{g}.attn.c_attn.{kind}", proj)
            names[f"{h}.self_attn.o_proj.{kind}"] = (f"{g}.attn.c_proj.{kind}", "")
        if m.qk_norm:
            names[f"{h}.self_attn.q_norm.weight"] = (f"{g}.attn.q_norm.weight", "")
            names[f"{h}.self_attn.k_norm.weight"] = (f"{g}.attn.k_norm.weight", "")
        names[f"{h}.{ln2}.weight"] = (f"{g}.ln_2.weight", "")
        for kind in kinds:
            if m.mlp in GATED_MLPS:
                names[f"{h}.mlp.gate_proj.{kind}"] = (f"{g}.mlp.c_fc.{kind}", "gate")
            names[f"{h}.mlp.up_proj.{kind}"] = (f"{g}.mlp.c_fc.{kind}", "up")
            names[f"{h}.mlp.down_proj.{kind}"] = (f"{g}.mlp.c_proj.{kind}", "")
    names["model.norm.weight"] = ("transformer.ln_f.weight", "")
    if not m.tie_embeddings:
        names["lm_head.weight"] = ("lm_head.weight", "vocab")
    return names


def _neox_layout(m: GPTConfig) -> dict[str, tuple[str, str]]:
    """GPTNeoXForCausalLM: LayerNorms and linear layers all with biases; q, k, v fused per head."""
    names = {"gpt_neox.embed_in.weight": ("transformer.wte.weight", "vocab")}
    layers = (("input_layernorm", "ln_1", ""), ("attention.query_key_value", "attn.c_attn", "neox_qkv"),
              ("attention.dense", "attn.c_proj", ""), ("post_attention_layernorm", "ln_2", ""),
              ("mlp.dense_h_to_4h", "mlp.c_fc", ""), ("mlp.dense_4h_to_h", "mlp.c_proj", ""))
    for i in range(m.n_layer):
        for hf, ours, how in layers:
            for kind in ("weight", "bias"):
                names[f"gpt_neox.layers.{i}.{hf}.{kind}"] = (f"transformer.h.{i}.{ours}.{kind}", how)
    names["gpt_neox.final_layer_norm.weight"] = ("transformer.ln_f.weight", "")
    names["gpt_neox.final_layer_norm.bias"] = ("transformer.ln_f.bias", "")
    if not m.tie_embeddings:
        names["lm_head.weight"] = ("lm_head.weight", "vocab")
    return names


def _gpt2_layout(m: GPTConfig) -> dict[str, tuple[str, str]]:
    """GPT2LMHeadModel: gptforge's own names; Conv1D weights stored (in, out); biases always present."""
    names = {"transformer.wte.weight": ("transformer.wte.weight", "vocab"),
             "transformer.wpe.weight": ("transformer.wpe.weight", "")}
    for i in range(m.n_layer):
        for layer in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
            conv = "conv1d" if layer.startswith(("attn", "mlp")) else ""
            names[f"transformer.h.{i}.{layer}.weight"] = (f"transformer.h.{i}.{layer}.weight", conv)
            names[f"transformer.h.{i}.{layer}.bias"] = (f"transformer.h.{i}.{layer}.bias", "")
    names["transformer.ln_f.weight"] = ("transformer.ln_f.weight", "")
    names["transformer.ln_f.bias"] = ("transformer.ln_f.bias", "")
    if not m.tie_embeddings:
        names["lm_head.weight"] = ("lm_head.weight", "vocab")
    return names


# ----------------------------------------------------------------------------------------------------------
# Import: a family's config.json -> gptforge model keys, refusing what gptforge computes differently.
# Keys a config.json leaves out take the family's transformers defaults.

_GPT2_DEFAULTS = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, n_inner=None,
                      activation_function="gelu_new", layer_norm_epsilon=1e-5, tie_word_embeddings=True,
                      scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
                      reorder_and_upcast_attn=False, add_cross_attention=False)
_LLAMA_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=None, head_dim=None, max_position_embeddings=2048,
                       rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
                       rope_theta=10000.0, rope_parameters=None, hidden_act="silu")
_DEFAULTS = {"gpt2": _GPT2_DEFAULTS, "llama": _LLAMA_DEFAULTS,
             "qwen3": dict(_LLAMA_DEFAULTS, vocab_size=151936, hidden_size=4096, intermediate_size=22016,
                           num_key_value_heads=32, max_position_embeddings=32768, use_sliding_window=False),
             "arcee": dict(_LLAMA_DEFAULTS, vocab_size=32000, hidden_size=2560, intermediate_size=18432,
                           hidden_act="relu2", max_position_embeddings=4096, rms_norm_eps=1e-5),
             "apertus": dict(_LLAMA_DEFAULTS, vocab_size=131072, intermediate_size=14336, hidden_act="xielu",
                             max_position_embeddings=65536, rms_norm_eps=1e-5, rope_theta=12000000.0),
             "gpt_neox": dict(vocab_size=50432, hidden_size=6144, num_hidden_layers=44, num_attention_heads=64,
                              intermediate_size=24576, hidden_act="gelu", max_position_embeddings=2048,
                              layer_norm_eps=1e-5, tie_word_embeddings=False, use_parallel_residual=True,
                              rope_parameters=None, rope_theta=10000.0, rotary_pct=0.25, attention_bias=True)}
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")


class Unimportable(ValueError):
    """A config.json setting gptforge's GPT computes differently; the message starts with the key."""


def model_keys(hf: dict) -> dict:
    """gptforge `model.*` keys of a Hugging Face config.json's object; Unimportable for what does not map."""
    kind = hf.get("model_type")
    if kind not in FAMILIES:
        raise Unimportable(f"model_type={kind!r}: gptforge imports {', '.join(repr(k) for k in FAMILIES)}")
    hf = {**_DEFAULTS[kind], **hf}
    keys = _gpt2_keys(hf) if kind == "gpt2" else _neox_keys(hf) if kind == "gpt_neox" else \
        _llama_keys(FAMILIES[kind], hf)
    width, name = (hf["n_inner"] or 4 * hf["n_embd"], "n_inner") if kind == "gpt2" else \
        (hf["intermediate_size"], "intermediate_size")
    built = GPTConfig(**{k: v for k, v in keys.items() if k in GPTConfig.__dataclass_fields__}).mlp_hidden
    if built != width:
        raise Unimportable(f"{name}={width} cannot be imported: gptforge's {keys['mlp']} MLP of that ratio is "
                           f"{built} wide" + (" (a gated MLP's width is a multiple of 64)" if keys["mlp"] in
                                              GATED_MLPS else ""))
    return keys


def _positive(hf: dict, *keys: str) -> None:
    for key in keys:
        v = hf[key]
        if not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
            raise Unimportable(f"{key}: expected a positive integer, got {json_short(v)}")


def json_short(v: object) -> str:
    import json

    return json.dumps(v)[:60]


def _gpt2_keys(hf: dict) -> dict:
    act = hf["activation_function"]
    mlp = "gelu" if act in _TANH_GELUS else {"gelu": "gelu_exact", "relu2": "relu2"}.get(act)
    if mlp is None:
        raise Unimportable(f"activation_function={act!r} cannot be imported: gptforge has gelu (gelu_new, "
                           "gelu_pytorch_tanh), gelu_exact (gelu) and relu2")
    refused = dict(scale_attn_weights=(False, "gptforge always scales attention by 1/sqrt(head size)"),
                   scale_attn_by_inverse_layer_idx=(True, "gptforge does not scale attention by layer"),
                   reorder_and_upcast_attn=(True, "gptforge has no reordered, upcast attention"),
                   add_cross_attention=(True, "gptforge is decoder-only, without cross-attention"))
    for key, (bad, why) in refused.items():
        if hf[key] == bad:
            raise Unimportable(f"{key}={json_short(bad)} cannot be imported: {why}")
    _positive(hf, "vocab_size", "n_positions", "n_embd", "n_layer", "n_head", *(["n_inner"] if hf["n_inner"] else []))
    eps = hf["layer_norm_epsilon"]
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise Unimportable(f"layer_norm_epsilon: expected a positive number, got {json_short(eps)}")
    if eps != LAYERNORM_EPS:
        raise Unimportable(f"layer_norm_epsilon={eps} cannot be imported: gptforge's LayerNorm uses a fixed eps "
                           f"of {LAYERNORM_EPS}")
    n_inner = hf["n_inner"] or 4 * hf["n_embd"]
    return dict(vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_layer=hf["n_layer"],
                n_head=hf["n_head"], n_embd=hf["n_embd"], mlp_ratio=n_inner / hf["n_embd"], pos="learned",
                norm="layernorm", mlp=mlp, bias=True, tie_embeddings=bool(hf["tie_word_embeddings"]),
                qk_norm=False, zero_init_proj=False, logit_softcap=0.0)


def _neox_keys(hf: dict) -> dict:
    _positive(hf, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "max_position_embeddings")
    rope = hf["rope_parameters"] or {"rope_type": "default", "rope_theta": hf["rope_theta"],
                                     "partial_rotary_factor": hf["rotary_pct"]}
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise Unimportable(f"rope_parameters.partial_rotary_factor={rope.get('partial_rotary_factor')} cannot be "
                           "imported: gptforge rotates the whole head")
    if rope.get("rope_type", "default") != "default" or not isinstance(rope.get("rope_theta"), (int, float)):
        raise Unimportable(f"rope_parameters={json_short(rope)} cannot be imported: gptforge's rotary positions "
                           "are unscaled (rope_type 'default' with a numeric rope_theta)")
    if hf["use_parallel_residual"]:
        raise Unimportable("use_parallel_residual=true cannot be imported: gptforge's blocks add attention, "
                           "then the MLP")
    if hf["layer_norm_eps"] != LAYERNORM_EPS:
        raise Unimportable(f"layer_norm_eps={hf['layer_norm_eps']} cannot be imported: gptforge's LayerNorm uses a "
                           f"fixed eps of {LAYERNORM_EPS}")
    if not hf["attention_bias"]:
        raise Unimportable("attention_bias=false cannot be imported: GPT-NeoX's MLP has biases, and gptforge's "
                           "model.bias gives attention and MLP biases together")
    act = hf["hidden_act"]
    mlp = "gelu" if act in _TANH_GELUS else {"gelu": "gelu_exact", "relu2": "relu2"}.get(act)
    if mlp is None:
        raise Unimportable(f"hidden_act={act!r} cannot be imported into a GPT-NeoX model: gptforge computes "
                           "gelu_new, gelu and relu2")
    C, heads = hf["hidden_size"], hf["num_attention_heads"]
    if C % heads:
        raise Unimportable(f"num_attention_heads={heads} does not divide hidden_size={C}")
    return dict(vocab_size=hf["vocab_size"], block_size=hf["max_position_embeddings"],
                n_layer=hf["num_hidden_layers"], n_head=heads, n_embd=C, mlp=mlp,
                mlp_ratio=hf["intermediate_size"] / C, pos="rope", norm="layernorm",
                rope_theta=float(rope["rope_theta"]), qk_norm=False, bias=True,
                tie_embeddings=bool(hf["tie_word_embeddings"]), zero_init_proj=False, logit_softcap=0.0)


def _llama_keys(family: Family, hf: dict) -> dict:
    _positive(hf, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "max_position_embeddings")
    C, heads = hf["hidden_size"], hf["num_attention_heads"]
    if hf["num_key_value_heads"] not in (None, heads):
        raise Unimportable(f"num_key_value_heads={hf['num_key_value_heads']} cannot be imported: grouped-query "
                           f"attention; gptforge has as many key/value heads as query heads ({heads})")
    if hf["head_dim"] not in (None, C // heads) or C % heads:
        raise Unimportable(f"head_dim={hf['head_dim']} cannot be imported: gptforge's head size is "
                           f"hidden_size / num_attention_heads")
    if hf["rms_norm_eps"] != RMS_EPS:
        raise Unimportable(f"rms_norm_eps={hf['rms_norm_eps']} cannot be imported: gptforge's RMSNorm uses a "
                           f"fixed eps of {RMS_EPS}")
    rope = hf["rope_parameters"] or {"rope_type": (hf.get("rope_scaling") or {}).get("rope_type", "default"),
                                     "rope_theta": hf["rope_theta"]}
    if rope.get("rope_type", "default") != "default" or not isinstance(rope.get("rope_theta"), (int, float)):
        raise Unimportable(f"rope_parameters={json_short(rope)} cannot be imported: gptforge's rotary positions "
                           "are unscaled (rope_type 'default' with a numeric rope_theta)")
    act = hf["hidden_act"]
    mlp = next((k for k, v in family.activations.items() if v == act), None)
    if mlp is None and act in _TANH_GELUS and "gelu" in family.activations:
        mlp = "gelu"
    if mlp is None:
        raise Unimportable(f"hidden_act={act!r} cannot be imported into a {family.title} model: gptforge computes "
                           + ", ".join(sorted(set(family.activations.values()))))
    bias = bool(hf["attention_bias"])
    if family.mlp_bias and bool(hf["mlp_bias"]) != bias:
        raise Unimportable(f"mlp_bias={json_short(hf['mlp_bias'])} with attention_bias={json_short(bias)} cannot "
                           "be imported: gptforge's model.bias is one switch for both")
    if bias and not family.mlp_bias:
        raise Unimportable(f"attention_bias=true cannot be imported into a {family.title} model: gptforge's "
                           f"model.bias also gives the MLP biases, which {family.title} lacks")
    if hf.get("use_sliding_window") or any(t != "full_attention" for t in hf.get("layer_types") or []):
        raise Unimportable("use_sliding_window / layer_types: gptforge attends over the full context in every layer")
    ratio = (1.5 if mlp in GATED_MLPS else 1.0) * hf["intermediate_size"] / C
    return dict(vocab_size=hf["vocab_size"], block_size=hf["max_position_embeddings"],
                n_layer=hf["num_hidden_layers"], n_head=heads, n_embd=C, mlp=mlp, mlp_ratio=ratio, pos="rope",
                norm="rmsnorm", rope_theta=float(rope["rope_theta"]), qk_norm=family.allowed["qk_norm"] == _YES,
                bias=bias, tie_embeddings=bool(hf["tie_word_embeddings"]), zero_init_proj=False,
                logit_softcap=0.0)

