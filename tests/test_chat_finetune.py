"""Chat fine-tuning end to end: a base run, conversations prepared with its tokenizer, the one training loop
with the loss mask and document masking, bitwise resume on masked data, and `gptforge chat`."""

from __future__ import annotations

import json
import os
import shutil
import random
import signal
import subprocess
import sys
import time

import pytest
import yaml

from gptforge.observe.metrics import read_metrics
from test_resume_kill import args as resume_args, assert_same_run, child

pytestmark = pytest.mark.slow


def gptforge(*argv, timeout=240, **kwargs):
    return subprocess.run([sys.executable, "-m", "gptforge", *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def random_run(data, path, tokenizer=None, **model):
    """A weights-only run of a random GPT for `data`'s vocabulary (or `tokenizer`'s, a Tokenizer) and shape."""
    import torch

    from gptforge.config import load_config
    from gptforge.data.tokenizer import Tokenizer
    from gptforge.model.gpt import GPT
    from gptforge.train.checkpoint import save_weights

    tok = tokenizer or Tokenizer.load(data / "tokenizer.json")
    path.mkdir(parents=True, exist_ok=True)
    tok.save(path.parent / f"{path.name}-tokenizer.json")
    shape = {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 32, **model}
    cfg = load_config(None, [f"data.dir={data}", f"model.vocab_size={tok.vocab_size}", "train.batch_size=4",
                             f"eval.tokens={16 * shape['block_size']}", *(f"model.{k}={v}" for k, v in shape.items())])
    torch.manual_seed(0)
    save_weights(path, GPT(cfg.model), cfg.to_dict(), tokenizer_file=path.parent / f"{path.name}-tokenizer.json")
    return path


@pytest.fixture(scope="module")
def chat_setup(small_data, tmp_path_factory):
    """A base run (random weights, the small corpus's tokenizer) and conversations prepared for it: sums, so
    that a few steps of training visibly lower the loss on the answers."""
    root = tmp_path_factory.mktemp("chat_ft")
    base = random_run(small_data, root / "base")
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
    config = yaml.safe_load((run / "config.yaml").read_text())
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


def test_lora_fine_tunes_on_conversations_through_the_same_loop(chat_setup, tmp_path):
    base, chat = chat_setup
    run = tmp_path / "lora"
    result = gptforge("train", f"finetune.init_from={base}", f"data.dir={chat}", f"run.dir={run}", "train.max_steps=40",
                      "train.max_time=null", "eval.every=40", "eval.tokens=2048", "train.samples=0",
                      "finetune.lora.rank=8", "optim.name=adamw", "optim.lr=0.01", "run.tensorboard=false")
    assert result.returncode == 0, result.stderr
    evals = [r["val_loss"] for r in read_metrics(run) if "val_loss" in r]
    assert evals[-1] < evals[0] - 0.3, evals


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


def test_chat_prompt_answers_in_the_template_format(chat_setup, tmp_path):
    base, chat = chat_setup
    run = tmp_path / "sft"
    trained = gptforge("train", f"finetune.init_from={base}", f"data.dir={chat}", f"run.dir={run}", "train.max_steps=80",
                       "train.max_time=null", "eval.every=1000", "train.samples=0", "run.tensorboard=false")
    assert trained.returncode == 0, trained.stderr
    result = gptforge("chat", run, "--prompt", "3 plus 4?", "--temperature", "0", "--max-new-tokens", "20")
    assert result.returncode == 0, result.stderr
    answer = result.stdout.strip()
    assert answer.isdigit(), answer  # an assistant turn as trained: a number, stopped at <|end|>
    with_system = gptforge("chat", run, "--prompt", "5 plus 1?", "--system", "Add.", "--temperature", "0")
    assert with_system.returncode == 0 and "<|" not in with_system.stdout


@pytest.fixture
def talkative_run(small_data, tmp_path):
    """A random-weights run with the chat tokens, large enough that an answer runs for seconds (it almost never
    says <|end|>): something to interrupt."""
    from gptforge.data.chat import with_chat_tokens
    from gptforge.data.tokenizer import Tokenizer

    tok = with_chat_tokens(Tokenizer.load(small_data / "tokenizer.json"))
    return random_run(small_data, tmp_path / "run", tok, n_layer=6, n_head=6, n_embd=384, block_size=1024)


class Terminal:
    """A real terminal: tmux running a command; type into it and read its screen."""

    def __init__(self, name: str, command: list[str]):
        self.name = name
        subprocess.run(["tmux", "new-session", "-d", "-s", name, "-x", "400", "-y", "50", *command], check=True)

    def screen(self) -> str:
        """What the terminal shows, wrapped lines joined (-J), so a word is never cut at the right edge."""
        return subprocess.run(["tmux", "capture-pane", "-p", "-J", "-S", "-200", "-t", self.name],
                              capture_output=True, text=True).stdout

    def keys(self, *keys: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", self.name, *keys], check=True)

    def wait_for(self, predicate, timeout: float = 60.0) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            screen = self.screen()
            if predicate(screen):
                return screen
            time.sleep(0.05)
        raise AssertionError(f"timed out; the screen:\n{self.screen()}")

    def alive(self) -> bool:
        return subprocess.run(["tmux", "has-session", "-t", self.name], capture_output=True).returncode == 0

    def close(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.name], capture_output=True)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_the_interactive_chat_in_a_real_terminal(talkative_run):
    term = Terminal(f"gptforge-chat-{os.getpid()}",
                    [sys.executable, "-m", "gptforge", "chat", str(talkative_run), "--max-new-tokens", "900",
                     "--safety", "off"])
    try:
        term.wait_for(lambda s: "you>" in s)  # tmux drops trailing spaces
        assert "/reset" in term.screen()  # the banner names the commands
        term.keys("tell me everything", "Enter")
        # Ctrl-C once the answer has begun to stream: that answer stops, the session stays
        term.wait_for(lambda s: len(s.split("model>")[-1].replace("\n", "")) > 40, timeout=60)
        term.keys("C-c")
        screen = term.wait_for(lambda s: "[stopped]" in s and s.rstrip().endswith("you>"), timeout=30)
        assert term.alive()
        assert screen.count("model>") == 1
        term.keys("and then?", "Enter")  # the session goes on: a second answer streams, and stops the same way
        term.wait_for(lambda s: s.count("model>") == 2 and len(s.split("model>")[-1].replace("\n", "")) > 40)
        term.keys("C-c")
        term.wait_for(lambda s: s.count("[stopped]") == 2 and s.rstrip().endswith("you>"), timeout=30)
        term.keys("/system Be brief.", "Enter")
        term.wait_for(lambda s: "system message set; conversation reset" in s)
        term.keys("/reset", "Enter")
        term.wait_for(lambda s: "(conversation reset)" in s)
        term.keys("/nope", "Enter")
        term.wait_for(lambda s: "unknown command /nope" in s)
        term.keys("C-c")  # at the prompt: a reminder, not an exit
        term.wait_for(lambda s: "(type /exit to leave)" in s)
        assert term.alive()
        term.keys("/exit", "Enter")
        deadline = time.time() + 20
        while term.alive() and time.time() < deadline:
            time.sleep(0.1)
        assert not term.alive()  # the command ended, and tmux closed its window with it
    finally:
        term.close()


def test_document_masking_for_text_pre_training(small_data, tmp_path):


    run = tmp_path / "masked"
    result = gptforge("train", f"data.dir={small_data}", f"run.dir={run}", "model.preset=tiny", "train.max_steps=3",
                      "train.max_time=null", "data.document_mask=true", "train.samples=0", "eval.tokens=512",
                      "run.tensorboard=false")
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load((run / "config.yaml").read_text())
    eot = json.loads((small_data / "manifest.json").read_text())["tokenizer"]["eot_id"]
    assert config["data"]["document_mask"] is True and config["model"]["doc_token"] == eot
    plain = tmp_path / "plain"
    assert gptforge("train", f"data.dir={small_data}", f"run.dir={plain}", "model.preset=tiny", "train.max_steps=1",
                    "train.max_time=null", "train.samples=0", "eval.tokens=512").returncode == 0
    assert yaml.safe_load((plain / "config.yaml").read_text())["model"]["doc_token"] == -1
