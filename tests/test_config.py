import pytest
import yaml

from gptforge.config import PRESETS, ConfigError, describe_keys, from_dict, keys_help, load_config, save_config


def test_defaults_validate_and_roundtrip(tmp_path):
    cfg = load_config()
    save_config(cfg, tmp_path / "config.yaml")
    again = from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert again == cfg


def test_overrides_are_typed():
    cfg = load_config(None, ["model.n_layer=3", "train.lr=1e-3", "train.max_steps=1_000", "model.bias=true",
                             "train.max_time=null", "data.dir=some/dir"])
    assert cfg.model.n_layer == 3 and isinstance(cfg.model.n_layer, int)
    assert cfg.train.lr == 1e-3 and cfg.train.max_steps == 1000
    assert cfg.model.bias is True and cfg.train.max_time is None and cfg.data.dir == "some/dir"


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  n_layer: 5\ntrain:\n  lr: 0.01\n")
    cfg = load_config(path, ["train.lr=0.02"])
    assert cfg.model.n_layer == 5 and cfg.train.lr == 0.02


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
        (["train.lr=fast"], ["train.lr", "float"]),
        (["train.max_steps=2.5"], ["train.max_steps", "integer"]),
        (["model.mlp=relu"], ["model.mlp", "gelu", "relu2", "swiglu"]),
        (["model.preset=huge"], ["model.preset", "tiny", "gpt2-124m"]),
        (["train.precision=int8"], ["train.precision", "bf16"]),
        (["train.max_time=null"], ["budget"]),
        (["model.dropout=1.5"], ["model.dropout"]),
        (["train.lr=-1"], ["train.lr", "positive"]),
        (["train.eval_tokens=10"], ["train.eval_tokens", "block_size"]),
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
    for key in ("data.dir", "train.batch_tokens", "train.max_time", "run.deterministic", "model.block_size"):
        assert key in text


def test_keys_of_earlier_versions_still_load():
    """A run saved before train.skip_nonfinite became guard.enabled still loads, with its meaning kept."""
    saved = load_config().to_dict()
    del saved["guard"]
    saved["train"]["skip_nonfinite"] = False
    assert from_dict(saved).guard.enabled is False
