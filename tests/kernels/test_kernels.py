"""Fused kernels against their PyTorch references: RMSNorm, RoPE, chunked linear + cross-entropy, a patched GPT.

Without CUDA the Triton kernels run through Triton's interpreter (tests/kernels/conftest.py sets
TRITON_INTERPRET=1), bf16 included; the `gpu` variants run them compiled on a CUDA device. The "reference"
variants turn the interpreter off, so the same entry points take their PyTorch paths.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gptforge.adapt.qat import apply_qat
from gptforge.config import load_config
from gptforge.errors import ConfigError
from gptforge.kernels import FusedRMSNorm, apply_kernels, fused_rotary, linear_cross_entropy, triton_available
from gptforge.kernels.fused_ce import softmax_cross_entropy_
from gptforge.kernels.rmsnorm import rms_norm
from gptforge.kernels.rope import rotary
from gptforge.model.gpt import RMS_NORM_EPS, GPT, GPTConfig, apply_rotary, rope_tables
from gptforge.observe.metrics import read_metrics
from gptforge.train.loop import train

INTERPRETER = pytest.param("cpu", id="interpreter", marks=pytest.mark.skipif(
    not triton_available("cpu"), reason="Triton's interpreter is off (TRITON_INTERPRET unset) or triton is missing"))
CUDA = pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not (torch.cuda.is_available() and triton_available("cuda")), reason="needs a CUDA device and triton")])
REFERENCE = pytest.param("reference", id="reference")
TRITON = [INTERPRETER, CUDA]
EVERY_PATH = [REFERENCE, INTERPRETER, CUDA]
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture
def device(request, monkeypatch) -> str:
    """The device to test on; "reference" is the CPU with Triton switched off."""
    if request.param == "reference":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        return "cpu"
    return request.param


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> None:
    """Float32 agrees to rounding; bf16 to about one unit in its last place (8 bits of mantissa)."""
    tol = 1e-5 if dtype == torch.float32 else 1.6e-2
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol * scale)


# ---------------------------------------------------------------------------------------------------------
# RMSNorm


@pytest.mark.parametrize("device", TRITON, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 7, 64), (3, 37, 96), (2, 5, 200), (300, 24)])
def test_rmsnorm_kernel_matches_the_reference_forward_and_backward(device, dtype, shape):
    torch.manual_seed(0)
    x = torch.randn(shape, device=device).to(dtype).requires_grad_()
    weight = (1 + 0.3 * torch.randn(shape[-1], device=device)).requires_grad_()
    dy = torch.randn(shape, device=device).to(dtype)
    y = rms_norm(x, weight, RMS_NORM_EPS)
    y.backward(dy)

    x_ref = x.detach().float().requires_grad_()
    w_ref = weight.detach().clone().requires_grad_()
    y_ref = F.rms_norm(x_ref, (shape[-1],), w_ref, RMS_NORM_EPS)  # float32 all through
    y_ref.backward(dy.float())
    assert y.dtype == dtype and x.grad.dtype == dtype and weight.grad.dtype == torch.float32
    assert_close(y, y_ref, dtype, scale=4)
    assert_close(x.grad, x_ref.grad, dtype, scale=4)
    torch.testing.assert_close(weight.grad, w_ref.grad, rtol=1e-4, atol=1e-4)  # float32 sums either way


@pytest.mark.parametrize("device", TRITON, indirect=True)
def test_rmsnorm_kernel_takes_strided_inputs_like_qk_norm(device):
    torch.manual_seed(0)
    qkv = torch.randn(2, 9, 3 * 48, device=device, requires_grad=True)
    q = qkv[..., :48].view(2, 9, 4, 12).transpose(1, 2)  # (B, nh, T, hd), strided like attention's q
    weight = torch.randn(12, device=device, requires_grad=True)
    dy = torch.randn(2, 4, 9, 12, device=device)
    rms_norm(q, weight, RMS_NORM_EPS).backward(dy)
    grads = qkv.grad.clone(), weight.grad.clone()
    qkv.grad = weight.grad = None
    F.rms_norm(q, (12,), weight, RMS_NORM_EPS).backward(dy)
    torch.testing.assert_close(grads, (qkv.grad, weight.grad), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", EVERY_PATH, indirect=True)
def test_fused_rmsnorm_module_keeps_the_weight_and_the_outputs(device):
    torch.manual_seed(0)
    norm = nn.RMSNorm(80, eps=RMS_NORM_EPS).to(device)
    nn.init.normal_(norm.weight)
    fused = FusedRMSNorm(norm)
    assert fused.weight is norm.weight and list(fused.state_dict()) == list(norm.state_dict()) == ["weight"]
    x = torch.randn(5, 11, 80, device=device)
    torch.testing.assert_close(fused(x), norm(x), rtol=1e-5, atol=1e-5)
    if device == "cpu" and not triton_available(device):
        assert torch.equal(fused(x), norm(x))  # the reference path is nn.RMSNorm's own computation


# ---------------------------------------------------------------------------------------------------------
# RoPE


@pytest.mark.parametrize("device", TRITON, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 3, 100, 64), (1, 2, 37, 24), (3, 1, 5, 6)])
def test_rope_kernel_matches_apply_rotary_forward_and_backward(device, dtype, shape):
    torch.manual_seed(0)
    B, nh, T, hd = shape
    cos, sin = (t.to(device) for t in rope_tables(T + 3, hd, 10000.0))
    cos, sin = cos[3:], sin[3:]  # positions 3.. as after a KV cache prefix: a row slice of the tables
    x = torch.randn(shape, device=device).to(dtype).requires_grad_()
    dy = torch.randn(shape, device=device).to(dtype)
    y = rotary(x, cos, sin)
    y.backward(dy)

    x_ref = x.detach().float().requires_grad_()
    y_ref = apply_rotary(x_ref, cos, sin)
    y_ref.backward(dy.float())
    assert y.dtype == dtype and y.is_contiguous() and x.grad.dtype == dtype
    assert_close(y, y_ref, dtype, scale=4)
    assert_close(x.grad, x_ref.grad, dtype, scale=4)


@pytest.mark.parametrize("device", EVERY_PATH, indirect=True)
def test_fused_rotary_takes_q_straight_from_the_qkv_split(device):
    torch.manual_seed(0)
    qkv = torch.randn(2, 70, 3 * 64, device=device, requires_grad=True)
    q = qkv[..., :64].view(2, 70, 4, 16).transpose(1, 2)  # (B, nh, T, hd), not contiguous
    cos, sin = (t.to(device) for t in rope_tables(70, 16, 10000.0))
    dy = torch.randn(2, 4, 70, 16, device=device)
    fused_rotary(q, cos, sin).backward(dy)
    grad = qkv.grad.clone()
    qkv.grad = None
    y_ref = apply_rotary(q, cos, sin)
    y_ref.backward(dy)
    torch.testing.assert_close(fused_rotary(q, cos, sin), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, qkv.grad, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Cross-entropy


def reference_ce(logits: torch.Tensor, targets: torch.Tensor, vocab: int, softcap: float, reduction: str):
    z = logits[:, :vocab].float()
    z = softcap * torch.tanh(z / softcap) if softcap > 0 else z
    return F.cross_entropy(z, targets, ignore_index=-1, reduction=reduction)


def random_targets(n: int, vocab: int, device: str) -> torch.Tensor:
    targets = torch.randint(0, vocab, (n,), device=device)
    targets[torch.rand(n, device=device) < 0.2] = -1
    return targets


@pytest.mark.parametrize("device", EVERY_PATH, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("softcap", [0.0, 4.0])
def test_softmax_minus_one_hot_in_place(device, dtype, softcap):
    torch.manual_seed(0)
    n, vocab, padded = 37, 2500, 2560  # two column blocks, the second partial; rows not a multiple of a tile
    logits = (3 * torch.randn(n, padded, device=device)).to(dtype)
    targets = random_targets(n, vocab, device)
    z = logits[:, :vocab].float().requires_grad_()
    expected = reference_ce(z, targets, vocab, softcap, "none")
    expected.sum().backward()
    before = logits.clone()

    loss = softmax_cross_entropy_(logits, targets, vocab, softcap)
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-5)
    assert_close(logits[:, :vocab], z.grad, dtype, scale=0.1)
    assert torch.equal(logits[:, vocab:], before[:, vocab:])  # the padded columns are left alone


@pytest.mark.parametrize("device", EVERY_PATH, indirect=True)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("softcap", [0.0, 6.0])
def test_chunked_cross_entropy_equals_the_full_logits_one(device, reduction, softcap):
    torch.manual_seed(0)
    n, dim, vocab, padded = 77, 32, 300, 384  # chunks of 32 tokens: the last one holds 13
    hidden = torch.randn(n, dim, device=device, requires_grad=True)
    weight = (0.3 * torch.randn(padded, dim, device=device)).requires_grad_()
    targets = random_targets(n, vocab, device)
    grad_out = torch.randn(n, device=device) if reduction == "none" else torch.tensor(1.7, device=device)

    loss = linear_cross_entropy(hidden, weight, targets, vocab, softcap, chunk_tokens=32, reduction=reduction)
    loss.backward(grad_out)
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    expected = reference_ce(hidden @ weight.T, targets, vocab, softcap, reduction)
    expected.backward(grad_out)

    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0], hidden.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1], weight.grad, rtol=1e-5, atol=1e-6)
    assert not grads[1][vocab:].any()  # padded rows of the head get no gradient


@pytest.mark.parametrize("device", EVERY_PATH, indirect=True)
def test_chunked_cross_entropy_under_bf16_autocast(device):
    torch.manual_seed(0)
    n, dim, vocab = 50, 64, 200
    hidden = torch.randn(n, dim, device=device, requires_grad=True)
    weight = (0.1 * torch.randn(256, dim, device=device)).requires_grad_()
    targets = random_targets(n, vocab, device)
    device_type = torch.device(device).type
    with torch.autocast(device_type, dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, targets, vocab, chunk_tokens=16)
        loss.backward()
        grads = hidden.grad.clone(), weight.grad.clone()
        hidden.grad = weight.grad = None
        expected = reference_ce(F.linear(hidden, weight), targets, vocab, 0.0, "mean")  # what GPT.loss computes
        expected.backward()
    assert loss.dtype == torch.float32 and grads[0].dtype == grads[1].dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(grads[0], hidden.grad, rtol=2e-2, atol=2e-4)
    torch.testing.assert_close(grads[1], weight.grad, rtol=2e-2, atol=2e-4)


@pytest.mark.parametrize("device", EVERY_PATH, indirect=True)
def test_chunked_cross_entropy_skips_gradients_nobody_needs(device):
    torch.manual_seed(0)
    hidden = torch.randn(20, 16, device=device, requires_grad=True)
    weight = torch.randn(64, 16, device=device)  # frozen, as under LoRA
    targets = random_targets(20, 64, device)
    linear_cross_entropy(hidden, weight, targets, chunk_tokens=8).backward()
    assert hidden.grad is not None and weight.grad is None
    with torch.no_grad():
        losses = linear_cross_entropy(hidden, weight, targets, chunk_tokens=8, reduction="none")
    torch.testing.assert_close(losses, reference_ce(hidden @ weight.T, targets, 64, 0.0, "none"))


# ---------------------------------------------------------------------------------------------------------
# A patched GPT


def tiny_config(**overrides) -> GPTConfig:
    fields = dict(vocab_size=100, block_size=32, n_layer=2, n_head=4, n_embd=64, vocab_multiple=64, qk_norm=True,
                  logit_softcap=10.0)
    return GPTConfig(**{**fields, **overrides})


@pytest.mark.parametrize("device", EVERY_PATH, indirect=True)
def test_patched_gpt_computes_what_the_plain_one_does(device):
    torch.manual_seed(0)
    plain = GPT(tiny_config()).to(device)
    patched = copy.deepcopy(plain)
    apply_kernels(patched, fused=True, fused_ce=True, ce_chunk_tokens=24)
    assert list(patched.state_dict()) == list(plain.state_dict())
    assert not any(isinstance(m, nn.RMSNorm) for m in patched.modules())
    assert sum(isinstance(m, FusedRMSNorm) for m in patched.modules()) == 9  # 2 per block, ln_f, 2 qk per block

    idx = torch.randint(0, 100, (2, 30), device=device)
    targets = torch.randint(0, 100, (2, 30), device=device)
    targets[0, :5] = -1
    losses = [model(idx, targets) for model in (plain, patched)]
    for model, loss in zip((plain, patched), losses):
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(plain.named_parameters(), patched.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(patched(idx, targets, reduction="none"), plain(idx, targets, reduction="none"),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(patched(idx), plain(idx), rtol=1e-5, atol=1e-5)


def test_only_what_applies_is_swapped():
    layernorm = GPT(tiny_config(norm="layernorm", pos="learned", qk_norm=False))
    apply_kernels(layernorm, fused=True, fused_ce=False, ce_chunk_tokens=8)
    assert not any(isinstance(m, FusedRMSNorm) for m in layernorm.modules())
    assert layernorm.transformer.h[0].attn.rotary is apply_rotary and layernorm.head_loss is None

    learned = GPT(tiny_config(pos="learned"))
    apply_kernels(learned, fused=True, fused_ce=False, ce_chunk_tokens=8)
    assert isinstance(learned.transformer.ln_f, FusedRMSNorm)
    assert learned.transformer.h[0].attn.rotary is apply_rotary


def test_fused_ce_refuses_a_head_it_cannot_compute():
    model = GPT(tiny_config(tie_embeddings=False))
    apply_qat(model, "int8")  # fake-quantizes the untied head
    with pytest.raises(ConfigError, match="speed.fused_ce"):
        apply_kernels(model, fused=False, fused_ce=True, ce_chunk_tokens=8)
    with pytest.raises(ConfigError, match="speed.fused_ce"):
        load_config(None, ["speed.fused_ce=true", "finetune.qat=int8", "model.tie_embeddings=false"])


# ---------------------------------------------------------------------------------------------------------
# Training

TINY = ["model.preset=tiny", "model.qk_norm=true", "model.logit_softcap=15", "model.vocab_multiple=384",
        "train.batch_size=2", "train.max_steps=3", "train.max_time=null", "train.log_every=1",
        "eval.tokens=256", "train.samples=0", "run.tensorboard=false"]


def run_losses(data, run_dir, *extra) -> list[float]:
    """The run's losses in order: validation at step 0, training at every step, validation at the end."""
    train(load_config(None, [*TINY, f"data.dir={data}", f"run.dir={run_dir}", *extra]))
    records = [r for r in read_metrics(run_dir) if "train_loss" in r or "val_loss" in r]
    return [r["train_loss"] if "train_loss" in r else r["val_loss"] for r in records]


@pytest.fixture(scope="module")
def plain_losses(small_data, tmp_path_factory) -> list[float]:
    return run_losses(small_data, tmp_path_factory.mktemp("plain") / "run")


@pytest.mark.parametrize("device", [REFERENCE, INTERPRETER], indirect=True)
def test_training_with_fused_kernels_follows_the_plain_run(device, small_data, tmp_path, plain_losses):
    fused = run_losses(small_data, tmp_path / "run", "speed.fused_kernels=true", "speed.fused_ce=true",
                       "speed.ce_chunk_tokens=50")
    assert len(fused) == len(plain_losses) == 5  # val at 0, train at 1..3, val at 3
    assert fused == pytest.approx(plain_losses, rel=1e-4)
