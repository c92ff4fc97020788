"""Chat fine-tuning end to end: a base run, conversations prepared with its tokenizer, the one training loop
with the loss mask and document masking, bitwise resume on masked data, and `gptforge chat`."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys

import pytest

from gptforge.observe.metrics import read_metrics
from conftest import random_weights_run
from test_resume_kill import args as resume_args, assert_same_run, child

pytestmark = pytest.mark.slow


def gptforge(*argv, timeout=240, **kwargs):
    return subprocess.run([sys.executable, "-m", "gptforge", *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout, **kwargs)


@pytest.fixture(scope="module")
def chat_setup(small_data, tmp_path_factory):
    """A base run (random weights, the small corpus's tokenizer) and conversations prepared for it: sums, so
    that a few steps of training visibly lower the loss on the answers."""
    root = tmp_path_factory.mktemp("chat_ft")
    base = random_weights_run(small_data, root / "base")
    rng = random.Random(0)
    lines = []
    for _ in range(400):
        a, b = rng.randrange(10), rng.randrange(10)
        lines.append(json.dumps({"messages": [{"role": "user", "content": f"{a} plus {b}?"},
                                              {"role": "assistant", "content": f"{a + b}"}]}))
    (root / "sums.jsonl").write_text("\n".join(lines) + "\n")
    result = gptforge("prepare", "--format", "chat", root / "sums.jsonl", "--out", root / "chat",
                      "--tokenizer", small_data / "tokenizer.json", "--max-tokens", 32, "--val-fraction", 0.2, "--quiet")
    assert result.returncode == 0, result.stderr
    return base, root / "chat"


def test_fine_tuning_on_conversations_lowers_the_loss_on_the_answers(chat_setup, tmp_path):
    base, chat = chat_setup
    run = tmp_path / "sft"
    result = gptforge("train", f"finetune.init_from={base}", f"data.dir={chat}", f"run.dir={run}", "train.max_steps=60",
                      "train.max_time=null", "eval.every=20", "eval.tokens=2048", "train.samples=1",
                      "train.sample_tokens=8", "run.tensorboard=false")
    assert result.returncode == 0, result.stderr
    evals = [r["val_loss"] for r in read_metrics(run) if "val_loss" in r]
    assert evals[-1] < evals[0] - 0.5, evals
    config = json.loads(json.dumps(__import__("yaml").safe_load((run / "config.yaml").read_text())))
    assert config["model"]["doc_token"] == json.loads((chat / "manifest.json").read_text())["tokenizer"]["eot_id"]
    assert config["model"]["vocab_size"] == 512 + 4  # the base vocabulary and the four chat tokens
    # eval counts the assistant's tokens only: the answers are one or two tokens and <|end|> each
    out = gptforge("eval", run, "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["counted"] == "assistant tokens"
    assert report["val_loss"] == pytest.approx(evals[-1], rel=1e-4)
    conversations = json.loads((chat / "manifest.json").read_text())["splits"]["val"]["documents"]
    assert conversations * 2 <= report["tokens"] <= conversations * 3
    # the end-of-training sample answers a held-out question
    sample = json.loads((run / "samples.jsonl").read_text().splitlines()[-1])["sample"]
    assert " plus " in sample and "\n-> " in sample


def test_a_base_run_without_chat_tokens_gets_a_clear_message(chat_setup):
    base, _ = chat_setup
    result = gptforge("chat", base, "--prompt", "hi")
    assert result.returncode == 2
    assert "has no chat template" in result.stderr and "prepare --format chat" in result.stderr
    assert "Traceback" not in result.stderr


def test_sigkill_resumes_bitwise_on_masked_data(chat_setup, tmp_path):
    _, chat = chat_setup
    steps = 10
    ref = tmp_path / "ref"
    code, out = child(resume_args(chat, ref, steps))
    assert code == 0, out
    run = tmp_path / "killed"
    code, _ = child(resume_args(chat, run, steps), kill_when_step=4, delay=0.05)
    assert code == -signal.SIGKILL
    code, out = child(resume_args(chat, run, steps))
    assert code == 0, out
    assert_same_run(ref, run, steps)
