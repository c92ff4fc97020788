"""The commands on the other families as a new user runs them: train, eval --json, predict and report on a
cnn; train, sample and eval on an lstm; prepare --images. fp32, tiny models, a few steps each."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from gptforge.cli import main


def test_cnn_commands(tmp_path, capsys):
    run = tmp_path / "cnn"
    assert main(["train", "model.arch=cnn", f"run.dir={run}", "model.cnn_width=8", "model.cnn_stages=2",
                 "train.max_steps=3", "eval.every=0", "train.log_every=1", "speed.precision=fp32"]) == 0
    assert "accuracy" in capsys.readouterr().out
    assert main(["eval", str(run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 <= result["val_acc"] <= result["val_top5"] <= 1 and result["images"] == 359
    from gptforge.data.images import builtin_digits

    Image.fromarray(builtin_digits().val_images[0][..., 0]).save(tmp_path / "digit.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    assert main(["predict", str(run), str(tmp_path / "digit.png"), "--top", "3", "--json"]) == 0
    top = json.loads(capsys.readouterr().out)["top"]
    assert len(top) == 3 and {t["class"] for t in top} <= set("0123456789")
    assert top[0]["probability"] >= top[1]["probability"]
    assert main(["predict", str(run), str(tmp_path / "broken.png")]) == 2
    assert "broken.png: cannot be classified (unreadable)" in capsys.readouterr().err
    assert main(["report", str(run)]) == 0
    assert "Validation accuracy" in (run / "report.html").read_text()


def test_lstm_commands(small_data, tmp_path, capsys):
    run = tmp_path / "lstm"
    assert main(["train", "model.arch=gru", f"data.dir={small_data}", f"run.dir={run}", "model.preset=tiny",
                 "data.loader=sequential", "train.max_steps=2", "train.batch_size=4", "eval.tokens=1024",
                 "train.samples=0", "speed.precision=fp32"]) == 0
    assert main(["sample", str(run), "--prompt", "import ", "--max-new-tokens", "8", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("import ")
    assert main(["eval", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["val_bpb"] > 0


def test_prepare_images_command(tmp_path, capsys):
    for c in ("a", "b"):
        for i in range(3):
            (tmp_path / "src" / c).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (5, 5), (i * 40, 0, 0)).save(tmp_path / "src" / c / f"{i}.png")
    (tmp_path / "src" / "a" / "empty.jpg").write_bytes(b"")
    assert main(["prepare", "--images", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--image-size", "4"]) == 0
    assert "skipped: 1 empty" in capsys.readouterr().out
    assert main(["prepare", "--images", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o2")]) == 2
    assert "expected a folder with one subfolder of images per class" in capsys.readouterr().err


@pytest.fixture(scope="module")
def one_step_cnn(tmp_path_factory):
    run = tmp_path_factory.mktemp("cnn") / "run"
    assert main(["train", "model.arch=cnn", f"run.dir={run}", "model.cnn_width=8", "model.cnn_stages=1",
                 "train.max_steps=1", "eval.every=0", "speed.precision=fp32"]) == 0
    return run


@pytest.mark.parametrize("command", [["inspect", "--prompt", "x"], ["quantize", "--method", "int8", "--out", "q"]])
def test_gpt_only_commands_say_so_for_a_cnn(one_step_cnn, tmp_path, capsys, command):
    capsys.readouterr()
    argv = [command[0], str(one_step_cnn), *[str(tmp_path / a) if a == "q" else a for a in command[1:]]]
    assert main(argv) == 2
    assert "model.arch=cnn" in capsys.readouterr().err
