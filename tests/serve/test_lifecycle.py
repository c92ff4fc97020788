"""A server's life: HTTPS with a certificate made here, a checkpoint swapped in under load (SIGHUP) with no
request lost, SIGTERM draining what is in flight; and a run without a chat template, behind a filter."""

import json
import shutil
import signal
import ssl
import subprocess
import threading
import time

import pytest

openai = pytest.importorskip("openai")
requests = pytest.importorskip("requests")


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a self-signed certificate")
    root = tmp_path_factory.mktemp("tls")
    cert, key = root / "cert.pem", root / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def write_newer_checkpoint(run, step: int) -> None:
    """The run's weights, nudged, saved as a newer checkpoint (as a training run would)."""
    import torch

    from gptforge.runs import load_run
    from gptforge.train.checkpoint import save_weights

    loaded = load_run(run, report=lambda m: None)
    with torch.no_grad():
        for p in loaded.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_weights(run, loaded.model, loaded.config.to_dict(), step=step, tokenizer_file=loaded.checkpoint / "tokenizer.json",
                 extra={"last_val": loaded.state.get("last_val")})


def test_https_sighup_swap_under_load_and_sigterm_drain(chat_run, certificate, tmp_path, keyring, start_server):
    run = tmp_path / "run"
    shutil.copytree(chat_run, run, ignore=shutil.ignore_patterns("run.lock"))
    keys = tmp_path / "keys.json"
    key = keyring(keys, "alice")
    server = start_server(run, keys, "--slots", "4", "--model-name", "tiny", "--audit-log", str(tmp_path / "audit.jsonl"),
                          tls=certificate)
    cert = str(certificate[0])
    c = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60,
                      http_client=openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=cert)))

    # HTTPS: the client verifies the certificate made above; plain HTTP to the same port gets no answer
    assert c.completions.create(model="tiny", prompt="x", max_tokens=3).usage.completion_tokens >= 1
    with pytest.raises(requests.RequestException):
        requests.get(server.url.replace("https", "http") + "/healthz", timeout=10)
    old_step = c.models.list().data[0].model_extra["step"]

    # SIGHUP under load: 8 clients stream 40 tokens each, 3 times; a newer checkpoint is swapped in meanwhile
    results, errors = [], []

    def client_loop():
        try:
            for _ in range(3):
                chunks = list(c.completions.create(model="tiny", prompt="def", max_tokens=40, temperature=1.0,
                                                   stream=True, stream_options={"include_usage": True}))
                results.append((chunks[-1].usage.completion_tokens, chunks[-2].choices[0].finish_reason,
                                chunks[-1].system_fingerprint))
        except Exception as e:  # noqa: BLE001 - every failure is counted below
            errors.append(repr(e))

    threads = [threading.Thread(target=client_loop) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    write_newer_checkpoint(run, old_step + 1)
    server.proc.send_signal(signal.SIGHUP)
    for t in threads:
        t.join(180)
    assert errors == []
    assert len(results) == 24
    # each answered in full: 40 tokens, or fewer ending at an end-of-text token it sampled
    assert all((n == 40 and reason == "length") or (n <= 40 and reason == "stop") for n, reason, _ in results)
    assert sum(reason == "length" for _, reason, _ in results) > 12
    deadline = time.monotonic() + 30
    while c.models.list().data[0].model_extra["step"] != old_step + 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert c.models.list().data[0].model_extra["step"] == old_step + 1
    after = c.completions.create(model="tiny", prompt="x", max_tokens=2)
    assert after.system_fingerprint == f"gptforge-step-{old_step + 1}"
    events = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("event") == "reload"] == [old_step + 1]

    # SIGTERM while a stream is in flight: it is answered to the end, then the process exits cleanly
    stream = c.completions.create(model="tiny", prompt="import", max_tokens=200, temperature=1.0, stream=True,
                                  stream_options={"include_usage": True})
    first = next(iter(stream))
    server.proc.send_signal(signal.SIGTERM)
    rest = list(stream)  # a connection cut by the shutdown would raise here
    assert first.choices and rest[-2].choices[0].finish_reason in ("length", "stop")  # stop: an end-of-text token
    assert rest[-1].usage.completion_tokens == 200 or rest[-2].choices[0].finish_reason == "stop"
    assert server.proc.wait(60) == 0
    last = json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[-1])
    assert last["status"] == 200 and last["completion_tokens"] == rest[-1].usage.completion_tokens


def test_a_run_without_chat_tokens_gets_a_clear_error_and_every_answer_passes_the_filter(small_data, tmp_path,
                                                                                         start_server):
    import torch

    from gptforge.config import load_config
    from gptforge.model.gpt import GPT
    from gptforge.train.checkpoint import save_weights

    cfg = load_config(None, [f"data.dir={small_data}", "model.preset=tiny", "model.vocab_size=512"])
    torch.manual_seed(0)
    save_weights(tmp_path / "plain", GPT(cfg.model), cfg.to_dict(), step=3, tokenizer_file=small_data / "tokenizer.json")
    lists = tmp_path / "lists.yaml"
    lists.write_text("categories:\n  everything:\n    patterns: ['\\S+']\n")  # masks every word it sees
    server = start_server(tmp_path / "plain", None, "--safety-lists", str(lists), "--audit-log", "off")
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)

    with pytest.raises(openai.BadRequestError, match="no chat template"):
        c.chat.completions.create(model="plain", messages=[{"role": "user", "content": "hi"}])
    whole = c.completions.create(model="plain", prompt="import", max_tokens=30, temperature=0).choices[0].text
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(model="plain", prompt="import", max_tokens=30,
                                                                          temperature=0, stream=True))
    words = whole.split()
    assert words and all(w == "[masked:everything]" for w in words)
    assert streamed.split() == words
    metrics = requests.get(server.url + "/metrics", timeout=30).text
    assert 'gptforge_safety_actions_total{action="masked"} 2.0' in metrics
