"""Model architectures by name: `model.arch` picks a class from ARCHITECTURES, and build_model builds it.

Nothing in this package imports the rest of gptforge: the config imports the model, not the reverse.
"""

from __future__ import annotations

from torch import nn

from gptforge.model.gpt import GPT, GPTConfig

# model.arch: name -> a module class built from the model section (a GPTConfig or a subclass of it).
ARCHITECTURES: dict[str, type[nn.Module]] = {"gpt": GPT}


def build_model(config: GPTConfig) -> nn.Module:
    """The model `config` describes, of the class its `arch` names ("gpt" for a config without one)."""
    arch = getattr(config, "arch", "gpt")
    if arch not in ARCHITECTURES:
        raise ValueError(f"model.arch={arch!r} is not one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch](config)
