"""Weight-only int8 and int4 quantization of the transformer blocks' linear layers.

What is quantized: every nn.Linear inside the blocks (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj),
and with int8 an untied lm_head too. The token (and position) embeddings, the norms and a head tied to the
embedding keep their dtype: a tied head *is* the embedding table, and quantizing it would quantize every
token's input embedding as well. int4 leaves an untied head alone too, since its error lands directly on
the logits.

    int8  symmetric, one fp32 scale per output channel: W ~ qweight * scales[:, None], qweight in [-127, 127].
    int4  asymmetric, per group of `group_size` consecutive input weights: W ~ q * scale + zero with q in
          [0, 15] and zero the group's minimum, stored as fp32. On the blocks of the default model trained
          for 5 minutes this gave 28-35% lower squared error than symmetric 4-bit at group sizes 32 to 128:
          it spends all 16 levels on the group's actual range. Two codes share a byte: column 2j in the low nibble, 2j + 1 in the high one.

A quantized run is a weights-only run whose state.json carries the spec {"method", "group_size", "modules"};
`gptforge.inference.load_checkpoint` calls `build_quantized` with it before loading the weights, so
`gptforge.load`, `sample` and `eval` work on it as on any run. torchao is not used: on a CPU with torch 2.13,
torchao 0.18's int4 weight-only path needs the separate `mslk` kernel package, and plain PyTorch covers int8.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gptforge.errors import GptforgeError
from gptforge.inference import LoadedRun, load_checkpoint
from gptforge.train.checkpoint import save_weights

METHODS = ("int8", "int4")

# ----------------------------------------------------------------------------------------------------------
# The arithmetic (shared with fake quantization in qat.py, so training sees exactly what inference computes)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) weight -> int8 codes (out, in) and fp32 per-channel scales (out,): scale = absmax / 127."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)  # (out,); an all-zero row keeps a usable scale
    q = (w / scales[:, None]).round().clamp(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (qweight.float() * scales[:, None]).to(dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes in [0, 15], (out, in) with in even -> uint8 (out, in / 2): even columns low nibble, odd high."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: uint8 (out, in / 2) -> codes uint8 (out, in)."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, in) weight -> packed codes (out, in / 2), scales and zeros (out, in / group_size), both fp32."""
    out_features, in_features = weight.shape
    w = weight.detach().float().view(out_features, in_features // group_size, group_size)
    zeros = w.amin(dim=-1)  # (out, groups): the value code 0 stands for
    scales = ((w.amax(dim=-1) - zeros) / 15).clamp(min=1e-12)  # a constant group keeps a usable scale
    q = ((w - zeros[..., None]) / scales[..., None]).round().clamp(0, 15)
    return pack_int4(q.view(out_features, in_features)), scales, zeros


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    dtype: torch.dtype) -> torch.Tensor:
    q = unpack_int4(qweight).float()  # (out, in)
    groups = q.view(q.shape[0], scales.shape[1], -1)  # (out, n_groups, group_size)
    return (groups * scales[..., None] + zeros[..., None]).view_as(q).to(dtype)


def fake_quantize(weight: torch.Tensor, method: str, group_size: int) -> torch.Tensor:
    """The weight as a quantized model will see it: quantized, then dequantized to the weight's dtype."""
    if method == "int8":
        return dequantize_int8(*quantize_int8(weight), weight.dtype)
    return dequantize_int4(*quantize_int4(weight, group_size), weight.dtype)


# ----------------------------------------------------------------------------------------------------------
# Modules


class QuantLinear(nn.Module):
    """Base of the frozen quantized linear layers: buffers only (nothing here trains), nn.Linear's shape attributes."""

    def __init__(self, in_features: int, out_features: int, bias: bool, device: torch.device | str | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(QuantLinear):
    """int8 weights with one scale per output channel.

    On a CPU this runs torch's int8 weight-only kernel with bf16 activations (W8A16) and unit scales, and
    applies the fp32 scales to its result, so they are not rounded to bf16. The kernel is vectorised only
    for bf16 inputs; with fp32 inputs it is a scalar loop (on the AVX2 EPYC this was measured on: 9 times
    slower than its bf16 path for one row, 35 times slower than dequantize-then-matmul for 256 rows). In
    torch 2.13 it also crashed (segfault) with bf16 rows of 12, 63 or 100 inputs, so layers whose
    in_features is not a multiple of 32, and every other device, dequantize to the input's dtype instead.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None):
        super().__init__(in_features, out_features, bias, device)
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.device)
        m.qweight, m.scales = quantize_int8(linear.weight)
        if linear.bias is not None:
            m.bias = linear.bias.detach().clone()
        return m

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int8(self.qweight, self.scales, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or self.in_features % 32:
            return super().forward(x)
        ones = torch.ones(self.out_features, dtype=torch.bfloat16)
        y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features).bfloat16(), self.qweight, ones)  # (rows, out)
        y = (y.float() * self.scales).to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class Int4Linear(QuantLinear):
    """int4 weights, asymmetric per group of `group_size` input weights, two codes per byte.

    The forward dequantizes to the input's dtype and calls F.linear: plain PyTorch on every device.
    """

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool = False, device=None):
        super().__init__(in_features, out_features, bias, device)
        self.group_size = group_size
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, groups, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, groups, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int) -> Int4Linear:
        m = cls(linear.in_features, linear.out_features, group_size, linear.bias is not None, linear.weight.device)
        m.qweight, m.scales, m.zeros = quantize_int4(linear.weight, group_size)
        if linear.bias is not None:
            m.bias = linear.bias.detach().clone()
        return m

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int4(self.qweight, self.scales, self.zeros, dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"


_MODULES: dict[str, type[QuantLinear]] = {"int8": Int8Linear, "int4": Int4Linear}


# ----------------------------------------------------------------------------------------------------------
# Models


def block_linears(model: nn.Module) -> list[str]:
    """Names of the nn.Linear layers inside the transformer blocks (nn.Linear subclasses included)."""
    return [name for name, m in model.named_modules() if name.startswith("transformer.h.") and isinstance(m, nn.Linear)]


def target_names(model: nn.Module, method: str) -> list[str]:
    """The layers `method` quantizes: the block linears, plus an untied lm_head for int8 (module docstring)."""
    names = block_linears(model)
    if method == "int8" and not model.config.tie_embeddings and isinstance(model.lm_head, nn.Linear):
        names.append("lm_head")
    return names


def check_method(model: nn.Module, names: list[str], method: str, group_size: int) -> None:
    """Raise GptforgeError unless `method` is known and, for int4, group_size splits every layer's rows evenly."""
    if method not in METHODS:
        raise GptforgeError(f"quantization method {method!r} is not one of: {', '.join(METHODS)}")
    if not names:
        raise GptforgeError("the model has no full-precision linear layers in its blocks to quantize (already quantized?)")
    if method != "int4":
        return
    if not isinstance(group_size, int) or group_size < 2 or group_size % 2:
        raise GptforgeError(f"--group-size must be a positive even number (two 4-bit codes per byte), got {group_size}")
    for name in names:
        width = model.get_submodule(name).in_features
        if width % group_size:
            divisors = [g for g in (32, 64, 128, 256) if width % g == 0]
            raise GptforgeError(f"--group-size {group_size} does not divide in_features={width} of {name}; "
                                f"choose one that does, e.g. {', '.join(map(str, divisors)) or 'a smaller even number'}")


@torch.no_grad()
def quantize_model(model: nn.Module, method: str, group_size: int = 64) -> dict:
    """Replace the target linears of `model` (in place) by quantized ones; return the spec saved with the run."""
    names = target_names(model, method)
    check_method(model, names, method, group_size)
    args = (group_size,) if method == "int4" else ()
    for name in names:
        replace_module(model, name, _MODULES[method].from_linear(model.get_submodule(name), *args))
    return {"method": method, "group_size": group_size if method == "int4" else None, "modules": names}


def build_quantized(model: nn.Module, spec: dict) -> None:
    """Swap the layers a spec names for empty quantized ones of the same shape, so the quantized weights
    load strictly. Used when loading a quantized run: the spec comes from its state.json."""
    try:
        method, group_size, names = spec["method"], spec["group_size"], list(spec["modules"])
        check_method(model, names, method, group_size)
        layers = {name: model.get_submodule(name) for name in names}
    except (KeyError, TypeError, AttributeError) as e:
        raise GptforgeError(f"quantization spec {spec!r} does not fit this model ({type(e).__name__}: {e}); "
                            "expected {'method', 'group_size', 'modules'} naming linear layers") from None
    for name, linear in layers.items():
        args = (linear.in_features, linear.out_features) + ((group_size,) if method == "int4" else ())
        replace_module(model, name, _MODULES[method](*args, bias=linear.bias is not None, device=linear.weight.device))


def linear_bytes(model: nn.Module) -> int:
    """Bytes held by the linear layers (weights or codes, scales, zero points, biases); a tied head is the
    embedding table and is not counted."""
    tied = model.transformer.wte.weight
    return sum(t.numel() * t.element_size()
               for m in model.modules() if isinstance(m, (nn.Linear, QuantLinear))
               for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)) if t is not tied)


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` where the submodule called `name` is."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


# ----------------------------------------------------------------------------------------------------------
# Runs and the command line


def check_output(out: Path, source: Path, force: bool) -> None:
    """Refuse a non-empty `out` unless forced (then empty it), and never write over the source run."""
    out, src = out.resolve(), source.resolve()
    if out == src or out in src.parents:
        raise GptforgeError(f"--out {out} would overwrite the source {source}; choose another folder")
    if out.exists() and not out.is_dir():
        raise GptforgeError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise GptforgeError(f"--out {out}: already exists and is not empty; pass --force to replace it")
        shutil.rmtree(out)


def output_config(loaded: LoadedRun, out: Path) -> dict:
    """The source run's config for a run at `out` of its loaded weights, in which LoRA adapters are merged."""
    cfg = loaded.config
    finetune = dataclasses.replace(cfg.finetune, lora=dataclasses.replace(cfg.finetune.lora, rank=0))
    return dataclasses.replace(cfg, finetune=finetune, run=dataclasses.replace(cfg.run, dir=str(out))).to_dict()


def source_info(run: Path, loaded: LoadedRun) -> dict:
    return {"run": str(run), "checkpoint": str(loaded.checkpoint), "step": loaded.state["step"]}


def quantize_run(run: str | Path, out: str | Path, method: str, group_size: int = 64, force: bool = False,
                 report: Callable[[str], None] = print) -> Path:
    """Quantize the newest checkpoint of `run` into a weights-only run at `out`; returns `out`."""
    run, out = Path(run), Path(out)
    loaded = load_checkpoint(run, "cpu", report=report)
    if "quantization" in loaded.state:
        raise GptforgeError(f"{loaded.checkpoint} is already quantized ({loaded.state['quantization']['method']}); "
                            "quantize the full-precision run instead")
    model = loaded.model
    before = linear_bytes(model)
    spec = quantize_model(model, method, group_size)  # in memory: bad arguments fail before --out is touched
    check_output(out, run, force)
    tokenizer = loaded.checkpoint / "tokenizer.json"
    save_weights(out, model, output_config(loaded, out), step=loaded.state["step"],
                 tokenizer_file=tokenizer if tokenizer.is_file() else None,
                 extra={"quantization": spec, "source": source_info(run, loaded)})
    after = linear_bytes(model)
    report(f"wrote {out}: {method} on {len(spec['modules'])} linear layers; linear weights "
           f"{before / 1e6:.2f} MB -> {after / 1e6:.2f} MB ({before / after:.2f}x smaller)")
    return out


def add_quantize_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory (newest intact checkpoint) or a checkpoint folder")
    parser.add_argument("--method", required=True, choices=METHODS,
                        help="int8: per-channel symmetric; int4: grouped asymmetric, two weights per byte")
    parser.add_argument("--out", required=True, metavar="DIR", help="the quantized run to write")
    parser.add_argument("--group-size", type=int, default=64,
                        help="int4 only: input weights sharing a scale and zero point; must divide every "
                        "layer's in_features (default: 64)")
    parser.add_argument("--force", action="store_true", help="replace DIR if it exists")


def run_quantize(args: argparse.Namespace) -> int:
    quantize_run(args.run_dir, args.out, args.method, args.group_size, args.force)
    return 0
