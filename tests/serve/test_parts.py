"""The server's parts on their own: the key file, the rate limiter, the text released to clients."""

import json
import os
import stat

import pytest

from gptforge.errors import GptforgeError
from gptforge.evaluate.safety import SafetyFilter, parse_lists
from gptforge.serve.keys import KeyStore, add_key, read_keys, revoke_key
from gptforge.serve.limits import Limiter
from gptforge.serve.text import TextStream


def test_a_key_is_shown_once_and_stored_as_a_salted_hash_in_a_private_file(tmp_path):
    path = tmp_path / "keys.json"
    key = add_key(path, "alice")
    other = add_key(path, "bob", rpm=5)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert key.split("-", 2)[2] not in text and other.split("-", 2)[2] not in text
    entries = read_keys(path)
    assert [e.name for e in entries] == ["alice", "bob"] and entries[1].rpm == 5
    assert entries[0].salt != entries[1].salt

    store = KeyStore(path)
    assert store.check(key).name == "alice" and store.check(other).name == "bob"
    assert store.check(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    assert store.check("gf-00000000-" + "x" * 43) is None and store.check("") is None and store.check(None) is None

    revoke_key(path, "alice")
    assert store.check(key) is None  # the store sees the file change: revocation needs no restart
    assert store.check(other).name == "bob"
    with pytest.raises(GptforgeError, match="exists"):
        add_key(path, "bob")
    with pytest.raises(GptforgeError, match="no live key"):
        revoke_key(path, "alice")


def test_a_key_file_others_can_read_or_that_is_damaged_is_refused(tmp_path):
    path = tmp_path / "keys.json"
    add_key(path, "alice")
    os.chmod(path, 0o644)
    with pytest.raises(GptforgeError, match="chmod 600"):
        read_keys(path)
    os.chmod(path, 0o600)
    path.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(GptforgeError, match="not a gptforge key file"):
        read_keys(path)
    with pytest.raises(GptforgeError, match="key name"):
        add_key(tmp_path / "k2.json", "no spaces allowed")


def test_rate_limits_refuse_with_a_wait_and_refill_over_time():
    now = [0.0]
    limiter = Limiter(rpm=2, tpm=100, clock=lambda: now[0])
    assert limiter.admit("a") is None and limiter.admit("a") is None
    assert limiter.admit("a") == 30  # one request token refills in 60 / 2 s
    assert limiter.admit("b") is None  # buckets are per key
    now[0] = 30.0
    assert limiter.admit("a") is None
    limiter.charge("b", 250)  # tokens are charged after the fact and may overdraw
    now[0] = 60.0
    assert limiter.admit("b") == 60  # -150 + 30 * 100 / 60 = -100: 60 s until the bucket is above zero
    assert limiter.admit("c", rpm=1) is None and limiter.admit("c", rpm=1) == 60  # a key's own limit


class ByteTokenizer:
    """Each id is one byte, so a multi-byte character arrives over several tokens."""

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def feed(stream: TextStream, text: str) -> list[str]:
    pieces = [stream.push(b) for b in text.encode()]
    return [p for p in pieces + [stream.finish()] if p]


def test_text_is_released_as_it_comes_and_stops_before_a_stop_string():
    stream = TextStream(ByteTokenizer(), ["STOP"])
    pieces = feed(stream, "héllo wörld STOP and more")
    assert "".join(pieces) == "héllo wörld " and stream.stopped
    assert len(pieces) > 3  # released while generating, not all at the end
    assert all("\ufffd" not in p for p in pieces)  # never half a character


def test_streamed_text_is_masked_by_the_safety_filter_even_across_pieces():
    rules, refusal = parse_lists("categories:\n  secret:\n    words: [hunter two]\n", "test")
    safety = SafetyFilter(rules)
    text = "the password is hunter two, " + "then more words follow here " * 3
    pieces = feed(TextStream(ByteTokenizer(), [], safety), text)
    assert "".join(pieces) == safety.apply(text)[0] == text.replace("hunter two", "[masked:secret]")
    assert len(pieces) > 2

    blocked = SafetyFilter(rules, mode="block")
    stream = TextStream(ByteTokenizer(), [], blocked)
    out = "".join(feed(stream, text))
    assert "hunter" not in out and "withheld" in out and stream.blocked


def test_the_drift_watch_logs_when_prompts_leave_the_band_and_when_they_return(tmp_path):
    import math

    pytest.importorskip("prometheus_client")
    from gptforge.serve.monitor import AuditLog, DriftWatch, Metrics

    metrics = Metrics(lambda: 0, lambda: 0, 4)
    audit = AuditLog(tmp_path / "audit.jsonl")
    drift = DriftWatch(val_ppl=20.0, band=2.0, metrics=metrics, audit=audit, window=1000, min_tokens=100)
    drift.observe(math.log(25.0) * 200, 200)  # in band: 25 / 20
    drift.observe(math.log(400.0) * 2000, 2000)  # far out: the window now holds only these
    drift.observe(math.log(18.0) * 1000, 1000)  # back in
    events = [json.loads(line)["event"] for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert events == ["drift_out_of_band", "drift_back_in_band"]
    values = dict(line.split() for line in metrics.render().decode().splitlines()
                  if line.startswith(("gptforge_drift", "gptforge_validation")))
    assert float(values["gptforge_drift_perplexity"]) == pytest.approx(18.0)
    assert float(values["gptforge_validation_perplexity"]) == 20.0 and values["gptforge_drift_out_of_band"] == "0.0"


def test_the_serving_precision_and_threads_follow_the_machine(monkeypatch, chat_run):
    """--precision auto serves bf16 weights where the CPU computes bf16 natively, else fp32; a CPU serving
    bf16 keeps its cache, and attends, in fp32. --threads leaves one core to the HTTP side."""
    import torch

    from gptforge.errors import ConfigError
    from gptforge.serve import main
    from gptforge.serve.host import Host

    cpu = torch.device("cpu")
    monkeypatch.setenv("GPTFORGE_CPU_NATIVE_BF16", "1")
    assert main.serving_dtype("auto", cpu) == torch.bfloat16
    monkeypatch.setenv("GPTFORGE_CPU_NATIVE_BF16", "0")
    assert main.serving_dtype("auto", cpu) == torch.float32
    assert main.serving_dtype("fp32", cpu) == torch.float32
    with pytest.raises(ConfigError, match="fp16 is for GPUs"):
        main.serving_dtype("fp16", cpu)
    for cores, threads in (({0}, 1), ({0, 1}, 1), (set(range(8)), 7)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, cores=cores: cores, raising=False)
        assert main.default_threads() == threads

    host = Host(chat_run, cpu, slots=2, dtype=torch.bfloat16, report=lambda m: None)
    try:
        engine = host.current.engine
        assert next(engine.model.parameters()).dtype == torch.bfloat16 and engine.cache.k.dtype == torch.float32
    finally:
        host.close()


@pytest.mark.parametrize("extra, message", [
    ([], "serve requires API keys"),
    (["--no-auth", "--threads", "0"], "--threads must be at least 1"),
    (["--no-auth", "--port", "70000"], r"--port must be in \[1, 65535\]"),
    (["--no-auth", "--tls-cert", "c.pem"], "TLS needs both"),
])
def test_bad_serve_options_are_refused_before_the_model_loads(tmp_path, extra, message):
    import argparse

    from gptforge.serve import main

    parser = argparse.ArgumentParser()
    main.add_arguments(parser)
    with pytest.raises(GptforgeError, match=message):
        main.check_args(parser.parse_args([str(tmp_path), *extra]))
