"""Model architectures by name: `model.arch` picks a class from ARCHITECTURES, and build_model builds it.

ARCHITECTURES holds "module:Class" paths, imported when a model is built, so that the config can list and
check the names without importing torch. Nothing in this package imports the rest of gptforge: the config
imports the model, not the reverse.
"""

from __future__ import annotations

import importlib
from typing import Any

# model.arch: name -> the module class built from the model section (a GPTConfig or a subclass of it).
ARCHITECTURES: dict[str, str] = {
    "gpt": "gptforge.model.gpt:GPT",
    "lstm": "gptforge.model.rnn:RecurrentLM",
    "gru": "gptforge.model.rnn:RecurrentLM",
    "cnn": "gptforge.model.cnn:ResNet",
}
# What each architecture reads: token shards (language models) or labelled images.
IMAGE_ARCHITECTURES = frozenset({"cnn"})


def architecture(name: str) -> type:
    """The class `model.arch=name` builds."""
    if name not in ARCHITECTURES:
        raise ValueError(f"model.arch={name!r} is not one of {', '.join(ARCHITECTURES)}")
    module, _, cls = ARCHITECTURES[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def build_model(config: Any):
    """The model `config` describes, of the class its `arch` names ("gpt" for a config without one)."""
    return architecture(getattr(config, "arch", "gpt"))(config)
