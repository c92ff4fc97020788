"""Typed configuration: dataclass sections, YAML files, dotted `key=value` overrides, presets, validation.

Every field is a config key `<section>.<field>`; its docstring (the string literal under it) is its help
text, shown by `gptforge train --help`. Everything is checked before any work starts: unknown keys, wrong
types and impossible values fail with a ConfigError naming the key and what it accepts.

    sections.py  the sections by concern, each field with its allowed values, each section with its check()
    rules.py     the rules between fields, and validate()
    load.py      YAML, overrides, coercion, keys of earlier versions, presets, the depth dial, saving
    help.py      the key reference of --help
"""

from gptforge.config.help import describe_keys, keys_help
from gptforge.config.load import (
    DEFAULT_MAX_TIME,
    MIGRATIONS,
    canonical_key,
    close_keys,
    depth_settings,
    from_dict,
    load_config,
    migrate,
    save_config,
)
from gptforge.config.rules import check_across, validate
from gptforge.config.sections import (
    PRESETS,
    Config,
    DataConfig,
    DebugConfig,
    DistConfig,
    EvalConfig,
    FinetuneConfig,
    GuardConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    ScheduleConfig,
    SpeedConfig,
    TrainConfig,
    choice,
)
from gptforge.errors import ConfigError

__all__ = [
    "DEFAULT_MAX_TIME", "MIGRATIONS", "PRESETS", "Config", "ConfigError", "DataConfig", "DebugConfig", "DistConfig",
    "EvalConfig", "FinetuneConfig", "GuardConfig", "LoraConfig", "ModelConfig", "OptimConfig", "RunConfig",
    "ScheduleConfig", "SpeedConfig", "TrainConfig", "canonical_key", "check_across", "choice", "close_keys",
    "depth_settings", "describe_keys", "from_dict", "keys_help", "load_config", "migrate", "save_config", "validate",
]
