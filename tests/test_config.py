import dataclasses

import pytest
import yaml

from gptforge import model as model_registry
from gptforge.config import (
    DEFAULT_MAX_TIME,
    MIGRATIONS,
    PRESETS,
    Config,
    ConfigError,
    TrainConfig,
    describe_keys,
    from_dict,
    keys_help,
    load_config,
    migrate,
    save_config,
    validate,
)
from gptforge.config.sections import choices_of


def test_defaults_validate_and_roundtrip(tmp_path):
    cfg = load_config()
    save_config(cfg, tmp_path / "config.yaml")
    again = from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert again == cfg


def test_overrides_are_typed():
    cfg = load_config(None, ["model.n_layer=3", "optim.lr=1e-3", "train.max_steps=1_000", "model.bias=true",
                             "train.max_time=null", "data.dir=some/dir"])
    assert cfg.model.n_layer == 3 and isinstance(cfg.model.n_layer, int)
    assert cfg.optim.lr == 1e-3 and cfg.train.max_steps == 1000
    assert cfg.model.bias is True and cfg.train.max_time is None and cfg.data.dir == "some/dir"


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  n_layer: 5\ntrain:\n  lr: 0.01\n")
    cfg = load_config(path, ["optim.lr=0.02"])
    assert cfg.model.n_layer == 5 and cfg.optim.lr == 0.02


def test_preset_applies_first_and_explicit_keys_win():
    cfg = load_config(None, ["model.n_layer=3", "model.preset=gpt2-124m"])
    assert cfg.model.n_embd == 768 and cfg.model.block_size == 1024 and cfg.model.pos == "learned"
    assert cfg.model.n_layer == 3


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_validates(name):
    load_config(None, [f"model.preset={name}"])


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["model.n_layr=3"], ["model.n_layr", "model.n_layer"]),
        (["modle.n_layer=3"], ["modle", "model"]),
        (["model.n_embd=100", "model.n_head=3"], ["model.n_embd", "model.n_head", "divisible"]),
        (["train.batch_tokens=1000"], ["train.batch_tokens", "4096"]),
        (["optim.lr=fast"], ["optim.lr", "finite number"]),
        (["train.max_steps=2.5"], ["train.max_steps", "integer"]),
        (["model.mlp=relu"], ["model.mlp", "gelu", "relu2", "swiglu"]),
        (["model.preset=huge"], ["model.preset", "tiny", "gpt2-124m"]),
        (["speed.precision=int8"], ["speed.precision", "bf16"]),
        (["train.max_time=null"], ["budget"]),
        (["model.dropout=1.5"], ["model.dropout"]),
        (["optim.lr=-1"], ["optim.lr", "positive"]),
        (["eval.tokens=10"], ["eval.tokens", "block_size"]),
        (["n_layer"], ["key=value"]),
        (["model=3"], ["model", "section"]),
    ],
)
def test_bad_values_name_the_key(overrides, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    for word in words:
        assert word in str(err.value)


def test_bad_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_batch_tokens_derives_accumulation():
    cfg = load_config(None, ["train.batch_size=4", "model.block_size=32", "train.batch_tokens=512"])
    assert cfg.grad_accum_steps(1) == 4 and cfg.grad_accum_steps(2) == 2
    assert cfg.tokens_per_step(1) == cfg.tokens_per_step(2) == 512


def test_every_key_is_documented():
    rows = describe_keys()
    missing = [key for key, _, text in rows if not text.strip()]
    assert not missing, f"keys without help text: {missing}"
    text = keys_help()
    for key in ("data.dir", "train.batch_tokens", "train.max_time", "run.deterministic", "model.block_size",
                "optim.lr", "schedule.warmup_steps", "speed.precision", "eval.every", "finetune.lora.rank"):
        assert key in text


def test_help_lists_the_choices_of_every_field_that_has_them():
    """The choices on the fields are what --help shows; there is no other list to keep in step."""
    shown = {key: text for key, _, text in describe_keys()}
    for key, allowed in _fields_with_choices(Config, ""):
        assert all(value in shown[key] for value in allowed), key
    assert "[adamw|muon]" in shown["optim.name"] and "[cosine|wsd|constant]" in shown["schedule.name"]


def _fields_with_choices(cls, prefix):
    for f in dataclasses.fields(cls):
        if isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):
            yield from _fields_with_choices(f.default_factory, f"{prefix}{f.name}.")
        elif choices_of(f) is not None:
            yield f"{prefix}{f.name}", choices_of(f)


def test_the_config_names_exactly_the_variants_the_registries_build(monkeypatch):
    from gptforge.model import gpt
    from gptforge.train.optim import OPTIMIZERS

    assert choices_of(_field(Config, "model", "mlp")) == tuple(gpt.MLPS)
    from gptforge.model import cnn

    assert choices_of(_field(Config, "model", "norm")) == tuple(gpt.NORMS) + tuple(cnn.NORMS)
    assert choices_of(_field(Config, "model", "pos")) == tuple(gpt.POSITIONS)
    assert choices_of(_field(Config, "optim", "name")) == tuple(OPTIMIZERS)
    monkeypatch.setitem(model_registry.ARCHITECTURES, "other", "gptforge.model.gpt:GPT")
    assert load_config(None, ["model.arch=other"]).model.arch == "other"
    assert "|other]" in keys_help() and "[gpt|" in keys_help()
    with pytest.raises(ConfigError, match="model.arch: 'gtp' is not one of: gpt, lstm, gru, cnn, other. Did you mean gpt"):
        load_config(None, ["model.arch=gtp"])


def test_a_variant_named_on_one_side_only_is_refused(monkeypatch):
    from gptforge.model import config as names
    from gptforge.model import gpt

    gpt.check_registries()
    monkeypatch.setattr(names, "MLPS", (*names.MLPS, "geglu"))
    with pytest.raises(ImportError, match="model/config.py names gelu, gelu_exact, relu2, swiglu, geglu"):
        gpt.check_registries()


def _field(cls, section, name):
    kind = {f.name: f.default_factory for f in dataclasses.fields(cls)}[section]
    return {f.name: f for f in dataclasses.fields(kind)}[name]


def test_build_model_builds_the_class_arch_names():
    cfg = load_config(None, ["model.preset=tiny"])
    from gptforge.model.gpt import GPT

    assert type(model_registry.build_model(cfg.model)) is GPT
    with pytest.raises(ValueError, match="model.arch"):
        model_registry.build_model(dataclasses.replace(cfg.model, arch="nope"))


def test_bad_choice_suggests_the_closest_value():
    with pytest.raises(ConfigError, match=r"model.mlp: 'relu' is not one of: gelu, gelu_exact, relu2, swiglu. "
                                          r"Did you mean relu2\?"):
        load_config(None, ["model.mlp=relu"])
    with pytest.raises(ConfigError, match="speed.precision: 'bf61'.*Did you mean bf16"):
        load_config(None, ["speed.precision=bf61"])


def test_validate_checks_choices_of_configs_built_in_code():
    cfg = load_config()
    with pytest.raises(ConfigError, match="optim.name: 'sgd' is not one of: adamw, muon"):
        validate(dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, name="sgd")))


def test_an_unknown_key_suggests_where_the_field_lives_now():
    with pytest.raises(ConfigError, match="optim.warmup_steps'. Did you mean schedule.warmup_steps"):
        load_config(None, ["optim.warmup_steps=3"])
    with pytest.raises(ConfigError, match="train.lrr'. Did you mean optim.lr"):
        load_config(None, ["train.lrr=3"])


def test_keys_of_earlier_versions_still_load():
    """A run saved before train.skip_nonfinite became guard.enabled still loads, with its meaning kept."""
    saved = load_config().to_dict()
    del saved["guard"]
    saved["train"]["skip_nonfinite"] = False
    assert from_dict(saved).guard.enabled is False


def test_old_keys_are_aliases_of_the_new_ones():
    old = load_config(None, ["train.lr=0.01", "train.optimizer=adamw", "train.eval_every=5", "train.lora.rank=4",
                             "train.schedule=cosine", "train.precision=fp32", "train.fused_optimizer=false",
                             "train.eval_tokens=4096", "train.init_from=runs/a"])
    new = load_config(None, ["optim.lr=0.01", "optim.name=adamw", "eval.every=5", "finetune.lora.rank=4",
                             "schedule.name=cosine", "speed.precision=fp32", "optim.fused=false",
                             "eval.tokens=4096", "finetune.init_from=runs/a"])
    assert old == new
    assert new.optim.lr == 0.01 and new.eval.every == 5 and new.finetune.lora.rank == 4


def test_a_saved_old_layout_config_loads_as_the_new_layout():
    old = from_dict({"train": {"optimizer": "adamw", "lr": 0.01, "eval_every": 5, "lora": {"rank": 2}}})
    new = from_dict({"optim": {"name": "adamw", "lr": 0.01}, "eval": {"every": 5}, "finetune": {"lora": {"rank": 2}}})
    assert old == new and old.finetune.lora.rank == 2


def test_a_whole_saved_config_in_the_old_layout_round_trips(tmp_path):
    """Every key as an old run wrote it (state.json config): the same Config, saved back in the new layout."""
    cfg = load_config(None, ["optim.name=adamw", "optim.lr=0.02", "schedule.warmup_steps=3", "eval.every=7",
                             "finetune.lora.rank=2", "train.max_steps=9"])
    saved = _old_layout(cfg.to_dict())
    assert "optim" not in saved and saved["train"]["lr"] == 0.02 and "arch" not in saved["model"]
    assert from_dict(saved) == cfg
    save_config(from_dict(saved), tmp_path / "config.yaml")
    written = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert written["optim"]["lr"] == 0.02 and "lr" not in written["train"] and written["finetune"]["lora"]["rank"] == 2


def _old_layout(tree):
    """The tree as versions before the sections by concern wrote it: everything in train, no model.arch."""
    tree = {section: dict(values) for section, values in tree.items()}
    del tree["model"]["arch"]
    del tree["speed"]["channels_last"]  # added since, with the model families
    for old, new in MIGRATIONS.items():
        section, name = new.split(".", 1)
        if old.startswith("train.") and section != "guard" and name in tree.get(section, {}):
            tree["train"][old.split(".", 1)[1]] = tree[section].pop(name)
    for section in ("optim", "schedule", "speed", "eval", "finetune"):
        assert not tree.pop(section), section
    return tree


def test_migrate_moves_old_keys_in_a_raw_tree_and_leaves_it_alone():
    raw = {"train": {"optimizer": "muon", "max_steps": 3, "lora": {"rank": 2}}, "finetune": {"lora": {"alpha": 4.0}}}
    assert migrate(raw) == {"train": {"max_steps": 3}, "optim": {"name": "muon"},
                            "finetune": {"lora": {"rank": 2, "alpha": 4.0}}}
    assert raw["train"]["optimizer"] == "muon"  # a copy: the input is untouched
    assert migrate({"model": {"n_layer": 2}})["model"]["arch"] == "gpt"  # runs before model.arch were GPTs


def test_later_keys_win_whichever_name_they_use(tmp_path):
    old_file, new_file = tmp_path / "old.yaml", tmp_path / "new.yaml"
    old_file.write_text("train:\n  lr: 0.01\n")
    new_file.write_text("optim:\n  lr: 0.01\n")
    assert load_config(old_file, ["optim.lr=0.02"]).optim.lr == 0.02
    assert load_config(new_file, ["train.lr=0.02"]).optim.lr == 0.02
    assert load_config(None, ["train.lr=0.02", "optim.lr=0.03"]).optim.lr == 0.03
    assert from_dict({"train": {"lr": 0.01}, "optim": {"lr": 0.02}}).optim.lr == 0.02  # one tree: the new name wins


# ----------------------------------------------------------------------------------------------------------
# Budgets


def test_the_default_budget_applies_only_when_no_budget_is_given():
    assert TrainConfig().max_time is None
    assert load_config().train.max_time == DEFAULT_MAX_TIME == 300.0
    steps = load_config(None, ["train.max_steps=5000"]).train
    assert (steps.max_steps, steps.max_time, steps.max_tokens) == (5000, None, None)
    tokens = load_config(None, ["train.max_tokens=100000"]).train
    assert (tokens.max_tokens, tokens.max_time) == (100000, None)
    assert load_config(None, ["train.max_time=60"]).train.max_time == 60.0


def test_the_default_budget_reads_yaml_and_saved_configs_too(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_steps: 50\n")
    assert load_config(path).train.max_time is None
    cfg = load_config(None, ["train.max_steps=50"])
    assert from_dict(cfg.to_dict()) == cfg  # a saved run keeps exactly its budget


def test_depth_dial_budget_is_the_only_limit_unless_one_is_given():
    dial = load_config(None, ["model.depth=4"]).train
    assert dial.max_tokens is not None and dial.max_time is None and dial.max_steps is None
    timed = load_config(None, ["model.depth=4", "train.max_time=600"]).train
    assert (timed.max_time, timed.max_tokens) == (600.0, None)
    stepped = load_config(None, ["model.depth=4", "train.max_steps=10"]).train
    assert (stepped.max_steps, stepped.max_tokens, stepped.max_time) == (10, None, None)
    assert load_config(None, ["model.depth=4"]).optim.lr == round(3e-3 * (384 / 256) ** 0.5, 6)  # in optim now


# ----------------------------------------------------------------------------------------------------------
# Bad input, all of it reported before any work, none of it a traceback


@pytest.mark.parametrize("override, words", [
    ("optim.lr=nan", ["optim.lr", "finite number", "nan"]),
    ("optim.lr=1e999", ["optim.lr", "finite number"]),
    ("train.max_time=nan", ["train.max_time", "finite number"]),
    ("train.max_time=inf", ["train.max_time", "finite number"]),
    ("run.seed=-1", ["run.seed", "from 0 to 4294967295", "-1"]),
    ("run.seed=1e23", ["run.seed", "from 0 to 4294967295"]),
])
def test_values_no_run_can_use_are_refused(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    for word in words:
        assert word in str(err.value)


def test_a_yaml_file_nested_thousands_deep_is_a_clear_error(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("train: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match="deep.yaml: nested too deeply"):
        load_config(path)


def test_a_yaml_file_that_is_not_utf8_is_a_clear_error(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("run:\n  dir: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml: not UTF-8 text \(byte 0xe9 at offset 15\)"):
        load_config(path)


def test_every_mistake_of_a_file_is_reported_at_once_with_its_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  max_steps: many\n  batch_size: 0\noptim:\n  lr: -1\n  beta1: 2\n"
                    "model:\n  n_layr: 4\nschedule:\n  name: linear\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    problems = err.value.problems
    assert len(problems) == 6, problems
    expected = {2: "train.max_steps: expected an integer", 3: "train.batch_size: expected a positive",
                5: "optim.lr: expected a positive", 6: "optim.beta1", 8: "unknown config key 'model.n_layr'",
                10: "schedule.name: 'linear' is not one of"}
    for line, words in expected.items():
        assert any(p.startswith(f"{path}:{line}: {words}") for p in problems), (line, problems)
    assert str(err.value).startswith("6 problems in the config:")


def test_an_override_is_reported_as_the_override_not_as_the_file_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.01\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["optim.lr=-2", "optim.weight_decay=-1"])
    assert sorted(err.value.problems) == ["optim.lr: expected a positive number, got -2.0",
                                          "optim.weight_decay: expected >= 0, got -1.0"]


def test_a_model_too_large_for_the_machine_fails_before_allocating():
    from gptforge.runtime import check_fits

    cfg = load_config(None, ["model.n_embd=1000000", "model.n_head=1000"])
    with pytest.raises(ConfigError, match=r"parameters, whose .* need [\d,.]+ GiB, more than the [\d,.]+ GiB of cpu"):
        check_fits(cfg.model, bytes_per_param=12, device="cpu", what="weights")
    small = load_config(None, ["model.preset=tiny"])
    check_fits(small.model, bytes_per_param=12, device="cpu", what="weights")


def test_estimated_params_equals_the_built_model():
    from gptforge.model.flops import estimated_params, num_params

    for overrides in (["model.preset=tiny"], ["model.n_layer=5", "model.tie_embeddings=false"]):
        model = load_config(None, overrides).model
        assert estimated_params(model) == num_params(model)["total"]
