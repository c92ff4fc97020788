"""The command line as a user meets it: help, errors without tracebacks, sample, eval --json."""

import json
import subprocess
import sys

import pytest

from gptforge.cli import main


@pytest.fixture(scope="module")
def trained(small_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    code = main(["train", f"data.dir={small_data}", f"run.dir={run_dir}", "model.preset=tiny", "train.max_steps=30",
                 "train.max_time=null", "train.samples=1", "train.sample_tokens=20", "run.tensorboard=false"])
    assert code == 0
    return run_dir


def gptforge(*args):
    return subprocess.run([sys.executable, "-m", "gptforge", *args], capture_output=True, text=True, timeout=120)


def test_help_documents_every_subcommand_and_key():
    top = gptforge("--help")
    assert top.returncode == 0
    for name in ("prepare", "train", "sample", "eval"):
        assert name in top.stdout
    train = gptforge("train", "--help").stdout
    for key in ("data.dir", "model.n_layer", "train.batch_tokens", "train.max_time", "run.seed", "presets"):
        assert key in train
    for sub, flag in (("prepare", "--vocab-size"), ("sample", "--top-p"), ("eval", "--json")):
        assert flag in gptforge(sub, "--help").stdout


@pytest.mark.parametrize(
    "argv, words",
    [
        (["train", "model.n_layr=2"], ["model.n_layer"]),
        (["train", "model.n_embd=100", "model.n_head=3"], ["divisible"]),
        (["train", "--config", "missing.yaml"], ["missing.yaml"]),
        (["sample", "no/such/run"], ["no/such/run"]),
        (["eval", "no/such/run", "--json"], ["no/such/run"]),
    ],
)
def test_user_mistakes_exit_2_without_traceback(argv, words, tmp_path):
    result = subprocess.run([sys.executable, "-m", "gptforge", *argv], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    for word in words:
        assert word in result.stderr


def test_prepare_with_nothing_usable_exits_2(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02" * 100)
    result = gptforge("prepare", str(tmp_path / "empty.txt"), str(tmp_path / "blob.bin"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "empty" in result.stderr and "binary" in result.stderr
    assert not (tmp_path / "out").exists()


def test_sample_and_eval(trained, capsys):
    assert main(["sample", str(trained), "--prompt", "def ", "--max-new-tokens", "12", "--seed", "3"]) == 0
    first = capsys.readouterr().out
    assert first.startswith("def ")
    main(["sample", str(trained), "--prompt", "def ", "--max-new-tokens", "12", "--seed", "3"])
    assert capsys.readouterr().out == first  # a seed makes a sample repeatable

    assert main(["eval", str(trained), "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert captured.err.splitlines()[-1].startswith("eval: ") and "batches (100%)" in captured.err
    assert {"val_loss", "val_bpb", "perplexity"} <= set(result)
    assert 0 < result["val_bpb"] < 8 and result["perplexity"] > 1


def test_sample_switches_and_their_bad_values(trained, capsys):
    block = 64  # the trained fixture's context (model.preset=tiny)
    args = ["sample", str(trained), "--prompt", "def ", "--seed", "1", "--no-stop"]
    assert main([*args, "--top-k", "0", "--max-new-tokens", "4"]) == 0  # 0: no top-k filter
    assert main([*args, "--context-keep", str(block // 2), "--max-new-tokens", str(2 * block)]) == 0
    assert capsys.readouterr().out.startswith("def ")
    for bad in (["--context-keep", str(block)], ["--context-keep", "0"], ["--top-p", "1.5"], ["--temperature", "-1"],
                ["--top-k", "-3"]):
        assert main([*args, *bad]) == 2
        assert "sample: error:" in capsys.readouterr().err


def test_config_file_and_resolved_config(trained, tmp_path, small_data):
    import yaml

    saved = yaml.safe_load((trained / "config.yaml").read_text())
    assert saved["model"]["n_layer"] == 2 and saved["model"]["vocab_size"] == 512
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"preset": "tiny"}, "train": {"max_steps": 2, "max_time": None}}))
    assert main(["train", "--config", str(path), f"data.dir={small_data}", f"run.dir={tmp_path / 'r'}",
                 "train.samples=0", "run.tensorboard=false"]) == 0


def test_bias_safety_inspect_and_report_from_the_command_line(trained, tmp_path, capsys):
    assert main(["eval", str(trained), "--bias", "--n-boot", "50", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "bias" in report and "gender" in report["bias"]["attributes"]

    assert main(["sample", str(trained), "--prompt", "mail me at someone@example.com ", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr()
    assert "someone@example.com" not in out.out and "[masked:" in out.out

    assert main(["inspect", str(trained), "--prompt", "def f(x):", "--out", str(tmp_path / "look")]) == 0
    assert list((tmp_path / "look").glob("attention_layer_*.png"))

    assert main(["report", str(trained), "--out", str(tmp_path / "r.html")]) == 0
    assert "data:image/png;base64," in (tmp_path / "r.html").read_text()
