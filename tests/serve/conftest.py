"""A tiny trained run whose tokenizer has the chat tokens, and a real `gptforge serve` process on loopback.

Each server is a subprocess on 127.0.0.1 and a free port, started with a timeout and stopped (SIGTERM,
then SIGKILL) by its fixture whatever the test did, so no test leaves a process behind or waits forever.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture(scope="session")
def chat_run(small_data, tmp_path_factory) -> Path:
    """A few training steps of model.preset=tiny on data whose tokenizer has the chat tokens."""
    from gptforge.config import load_config
    from gptforge.data.chat import with_chat_tokens
    from gptforge.data.tokenizer import Tokenizer
    from gptforge.fileio import sha256_file
    from gptforge.train.loop import train

    root = tmp_path_factory.mktemp("serve")
    data = root / "data"
    shutil.copytree(small_data, data)
    tok = with_chat_tokens(Tokenizer.load(data / "tokenizer.json"))
    tok.save(data / "tokenizer.json")
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["tokenizer"].update(sha256=sha256_file(data / "tokenizer.json"), vocab_size=tok.vocab_size)
    (data / "manifest.json").write_text(json.dumps(manifest))
    run = root / "run"
    cfg = load_config(None, [f"data.dir={data}", "model.preset=tiny", "train.max_steps=4", "train.batch_size=4",
                             "eval.tokens=1024", "train.samples=0", f"run.dir={run}", "train.device=cpu"])
    train(cfg)
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_key(path: Path, name: str, *extra: str) -> str:
    out = subprocess.run([sys.executable, "-m", "gptforge", "keys", "add", name, "--file", str(path), *extra],
                         capture_output=True, text=True, timeout=60, env=env(), check=True)
    return out.stdout.strip()


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}


class ServerProcess:
    def __init__(self, run: Path, keys: Path | None, *args: str, tls: tuple[Path, Path] | None = None,
                 log: Path | None = None):
        self.port = free_port()
        self.scheme = "https" if tls else "http"
        self.url = f"{self.scheme}://127.0.0.1:{self.port}"
        self.log = log or run.parent / f"server-{self.port}.log"
        cmd = [sys.executable, "-m", "gptforge", "serve", str(run), "--port", str(self.port), *args]
        cmd += ["--keys", str(keys)] if keys is not None else ["--no-auth"]
        if tls:
            cmd += ["--tls-cert", str(tls[0]), "--tls-key", str(tls[1])]
        self.logfile = open(self.log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.logfile, stderr=subprocess.STDOUT, env=env())
        self.wait_ready(tls[0] if tls else None)

    def wait_ready(self, cert, timeout: float = 90.0) -> None:
        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if requests.get(self.url + "/healthz", timeout=2, verify=str(cert) if cert else True).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log.read_text()}")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.logfile.close()
        return self.proc.returncode


@pytest.fixture
def start_server():
    """start_server(run, keys, *args, tls=...) -> ServerProcess, each stopped at the end of the test."""
    started = []

    def start(*args, **kwargs) -> ServerProcess:
        server = ServerProcess(*args, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def keyring(tmp_path_factory):
    """make(path, name, *flags) -> a new key, through `gptforge keys add`."""
    return make_key


@pytest.fixture(scope="module")
def api(chat_run, tmp_path_factory):
    """One server for a module's tests: keys alice (no limits), bob (revoked by a test), limited (2 per minute);
    4 slots, at most 300 tokens a request, a 64 KiB body cap; fp32 weights, for the tests that compare tokens
    batched and alone exactly."""
    root = tmp_path_factory.mktemp("api")
    keys = root / "keys.json"
    names = {name: make_key(keys, name, *flags) for name, flags in
             (("alice", ()), ("bob", ()), ("limited", ("--rpm", "2")))}
    server = ServerProcess(chat_run, keys, "--slots", "4", "--max-tokens", "300", "--body-bytes", "65536",
                           "--audit-log", str(root / "audit.jsonl"), "--model-name", "tiny", "--precision", "fp32",
                           log=root / "server.log")
    server.keys, server.key_file, server.audit = names, keys, root / "audit.jsonl"
    yield server
    server.stop()
