"""The shape and variant choices of a GPT (GPTConfig), without torch: the config, its validation and
`--help` read them, and none of those should wait for torch to import.

The variants a config can pick are named here (MLPS, NORMS, POSITIONS); gpt.py implements each in a registry
of the same name and refuses to import if its registry and the names here differ, so a new variant is one
name here and one entry there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

MLPS = ("gelu", "gelu_exact", "relu2", "swiglu")  # model.mlp
GATED_MLPS = frozenset({"swiglu"})  # their activation takes [gate | up]: c_fc is twice the hidden width
NORMS = ("layernorm", "rmsnorm")  # model.norm of a GPT or a recurrent model
IMAGE_NORMS = ("batchnorm", "groupnorm")  # model.norm of a convolutional model (model/cnn.py)
POSITIONS = ("learned", "rope")  # model.pos


@dataclass
class GPTConfig:
    """Architecture of a GPT. Every field is a `model.<name>` config key."""

    vocab_size: int = 8192
    """Tokenizer vocabulary size; set from the data's tokenizer at run time."""
    block_size: int = 256
    """Maximum sequence length (context window) in tokens."""
    n_layer: int = 4
    """Number of transformer blocks."""
    n_head: int = 4
    """Attention heads per block; must divide n_embd."""
    n_embd: int = 256
    """Width of the residual stream."""
    mlp: str = field(default="relu2", metadata={"choices": MLPS})
    """MLP activation: gelu (GPT-2's tanh approximation), gelu_exact (erf; about half the cost of the tanh
    form on a CPU), relu2 (squared ReLU) or swiglu."""
    mlp_ratio: float = 4.0
    """MLP hidden width as a multiple of n_embd (swiglu uses 2/3 of it, rounded up to a multiple of 64)."""
    norm: str = field(default="rmsnorm", metadata={"choices": NORMS + IMAGE_NORMS})
    """Normalization: layernorm or rmsnorm (GPT); batchnorm or groupnorm (model.arch=cnn, batchnorm by default)."""
    pos: str = field(default="rope", metadata={"choices": POSITIONS})
    """Position encoding: learned (GPT-2 style absolute embeddings) or rope (rotary)."""
    rope_theta: float = 10000.0
    """Base of the rotary frequencies."""
    qk_norm: bool = True
    """Normalize queries and keys (RMS) per head before attention."""
    tie_embeddings: bool = True
    """Share the token embedding matrix with the output head."""
    dropout: float = 0.0
    """Dropout probability on attention weights and residual branches (0 disables it)."""
    bias: bool = False
    """Bias terms in linear layers and LayerNorm."""
    logit_softcap: float = 0.0
    """Soft-cap the output logits with cap*tanh(logits/cap); 0 disables it."""
    zero_init_proj: bool = True
    """Initialize the residual output projections (attention and MLP c_proj) to zero, so every block starts
    as the identity."""
    vocab_multiple: int = 128
    """Pad the embedding and head to a multiple of this many rows (tensor-core friendly)."""
    doc_token: int = -1
    """Document masking: each occurrence of this token id starts a new document, and attention never
    crosses from one document to another (learned positions restart at each document); -1: plain causal
    attention. Set to the end-of-text id by data.document_mask and for chat data; not a key to set by hand."""
    share_layers: int = 0
    """Weight sharing (ALBERT): K distinct transformer blocks reused in a cycle over the n_layer layers (layer i
    runs block i mod K); 0 gives every layer its own block."""

    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_multiple
        return ((self.vocab_size + m - 1) // m) * m

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_hidden(self) -> int:
        hidden = int(self.mlp_ratio * self.n_embd)
        if self.mlp in GATED_MLPS:
            hidden = ((2 * hidden // 3 + 63) // 64) * 64
        return hidden

    def validate(self) -> None:
        """Raise ValueError for a shape or choice the model cannot be built with."""
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "vocab_multiple"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be at least 1, got {getattr(self, name)}")
        for f in dataclasses.fields(GPTConfig):
            allowed = f.metadata.get("choices")
            if allowed is not None and getattr(self, f.name) not in allowed:
                raise ValueError(f"model.{f.name}={getattr(self, f.name)!r} is not one of {', '.join(allowed)}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"model.mlp_ratio must be positive, got {self.mlp_ratio}")
        if self.n_embd % self.n_head != 0:
            divisors = [h for h in range(1, min(self.n_embd, 64) + 1) if self.n_embd % h == 0]
            raise ValueError(f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}; "
                             f"n_head values that divide it: {', '.join(map(str, divisors))}")
        if self.pos == "rope" and self.head_dim % 2 != 0:
            raise ValueError(f"model.pos=rope needs an even head size; n_embd/n_head = {self.head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be a probability in [0, 1), got {self.dropout}")
        if self.doc_token < -1 or self.doc_token >= self.vocab_size:
            raise ValueError(f"model.doc_token must be -1 or a token id below vocab_size={self.vocab_size}, "
                             f"got {self.doc_token}")
        if self.norm not in NORMS:
            raise ValueError(f"model.norm={self.norm} normalizes a convolutional model (model.arch=cnn); "
                             f"a GPT takes {' or '.join(NORMS)}")
        if not 0 <= self.share_layers <= self.n_layer:
            raise ValueError(f"model.share_layers: expected 0 (no sharing) up to model.n_layer={self.n_layer} "
                             f"distinct blocks, got {self.share_layers}")
        if self.logit_softcap < 0:
            raise ValueError(f"model.logit_softcap must be >= 0 (0 disables it), got {self.logit_softcap}")


@dataclass
class FamilyConfig:
    """The fields of the other model families, `model.<name>` keys like GPTConfig's: recurrent language models
    (model.arch=lstm|gru read vocab_size, block_size, n_layer, n_embd, dropout, tie_embeddings and norm from
    GPTConfig) and convolutional image models (model.arch=cnn reads these and norm)."""

    cnn_width: int = 32
    """cnn only: channels of the first stage of the ResNet; each later stage doubles them."""
    cnn_stages: int = 3
    """cnn only: stages of the ResNet; every stage after the first halves the image size."""
    cnn_blocks: int = 1
    """cnn only: residual blocks per stage (two 3x3 convolutions each)."""
    label_smoothing: float = 0.0
    """cnn only: label smoothing of the training loss (0 disables it); evaluation uses the plain loss."""
    num_classes: int = 10
    """cnn only: number of classes; set from the image data at run time."""
    image_size: int = 32
    """cnn only: height and width of the images in pixels; set from the image data at run time."""
    image_channels: int = 3
    """cnn only: colour channels of the images (1 or 3); set from the image data at run time."""

    def validate_family(self, arch: str) -> None:
        """Raise ValueError for a model of `arch` (not gpt) that cannot be built with these fields."""
        for name in ("n_layer", "n_embd", "vocab_size", "block_size") if arch in RECURRENT else ():
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be at least 1, got {getattr(self, name)}")
        if arch in RECURRENT and self.norm not in NORMS:
            raise ValueError(f"model.norm={self.norm} is for model.arch=cnn; model.arch={arch} needs no norm "
                             f"setting (leave it at {NORMS[1]})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be a probability in [0, 1), got {self.dropout}")
        if arch != "cnn":
            return
        for name in ("cnn_width", "cnn_stages", "cnn_blocks", "num_classes", "image_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be at least 1, got {getattr(self, name)}")
        if self.norm not in IMAGE_NORMS:
            raise ValueError(f"model.norm={self.norm} is for a GPT; model.arch=cnn takes {' or '.join(IMAGE_NORMS)}")
        if self.image_channels not in (1, 3):
            raise ValueError(f"model.image_channels must be 1 or 3, got {self.image_channels}")
        if self.block_size != 1:
            raise ValueError(f"model.block_size is 1 for model.arch=cnn (one image is one example, and tokens "
                             f"count images), got {self.block_size}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"model.label_smoothing must be in [0, 1), got {self.label_smoothing}")


RECURRENT = ("lstm", "gru")  # model.arch values of model/rnn.py
