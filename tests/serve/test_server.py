"""`gptforge serve` on loopback, driven by the official `openai` client and by raw HTTP (fp32, tiny model).

One server process serves the whole module (see conftest.api). Every call has a timeout."""

import json
import subprocess
import sys
import threading
import time

import pytest

openai = pytest.importorskip("openai")
requests = pytest.importorskip("requests")

MODEL = "tiny"


def client(api, key="alice"):
    return openai.OpenAI(base_url=api.url + "/v1", api_key=api.keys[key] if key in api.keys else key,
                         max_retries=0, timeout=60)


def auth(api, key="alice") -> dict:
    return {"Authorization": f"Bearer {api.keys[key]}"}


def audit_lines(api) -> list[dict]:
    return [json.loads(line) for line in api.audit.read_text().splitlines()]


def test_completions_whole_and_streamed_say_the_same(api):
    c = client(api)
    whole = c.completions.create(model=MODEL, prompt="import json\n", max_tokens=24, temperature=0)
    chunks = list(c.completions.create(model=MODEL, prompt="import json\n", max_tokens=24, temperature=0, stream=True))

    assert whole.object == "text_completion" and whole.model == MODEL
    assert whole.choices[0].finish_reason in ("length", "stop")
    assert whole.usage.prompt_tokens >= 2  # end-of-text, then the prompt's tokens
    assert 1 <= whole.usage.completion_tokens <= 24
    assert "".join(ch.choices[0].text for ch in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_chat_whole_and_streamed_say_the_same(api):
    c = client(api)
    messages = [{"role": "system", "content": "Answer in Python."}, {"role": "user", "content": "def f(x):"}]
    whole = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    chunks = list(c.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))

    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens > 6


def test_seeded_sampling_repeats_and_concurrent_greedy_requests_match_alone(api):
    c = client(api)
    seeded = [c.completions.create(model=MODEL, prompt="class ", max_tokens=16, temperature=1.0, seed=5).choices[0].text
              for _ in range(2)]
    assert seeded[0] == seeded[1]

    prompts = ["import os", "def main():", "class Parser(", "# encoding", "return None", "for key in"]
    alone = [c.completions.create(model=MODEL, prompt=p, max_tokens=30, temperature=0).choices[0].text for p in prompts]
    together = [None] * len(prompts)

    def ask(i):
        together[i] = client(api).completions.create(model=MODEL, prompt=prompts[i], max_tokens=30,
                                                     temperature=0).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]  # more than the 4 slots
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert together == alone


def test_keys_are_required_and_a_revoked_key_is_refused_at_once(api):
    with pytest.raises(openai.AuthenticationError):
        client(api, "no-such-key").models.list()
    r = requests.get(api.url + "/v1/models", timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert requests.get(api.url + "/metrics", timeout=30).status_code == 401

    bob = client(api, "bob")
    assert [m.id for m in bob.models.list()] == [MODEL]
    subprocess.run([sys.executable, "-m", "gptforge", "keys", "revoke", "bob", "--file", str(api.key_file)],
                   check=True, timeout=60, capture_output=True)
    with pytest.raises(openai.AuthenticationError):
        bob.completions.create(model=MODEL, prompt="x", max_tokens=2)


def test_a_key_over_its_rate_limit_gets_429_with_retry_after(api):
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
    codes = [requests.post(api.url + "/v1/completions", json=body, headers=auth(api, "limited"), timeout=30)
             for _ in range(3)]
    assert [r.status_code for r in codes] == [200, 200, 429]
    assert int(codes[2].headers["retry-after"]) >= 1 and codes[2].json()["error"]["type"] == "rate_limit_error"
    with pytest.raises(openai.RateLimitError):
        client(api, "limited").completions.create(model=MODEL, prompt="x", max_tokens=2)
    assert requests.post(api.url + "/v1/completions", json=body, headers=auth(api), timeout=30).status_code == 200


BAD = [
    ("not json", b"{", 400),
    ("wrong type", {"model": MODEL, "prompt": 5}, 400),
    ("temperature out of range", {"model": MODEL, "prompt": "x", "temperature": 9}, 400),
    ("negative max_tokens", {"model": MODEL, "prompt": "x", "max_tokens": -1}, 400),
    ("max_tokens over the cap", {"model": MODEL, "prompt": "x", "max_tokens": 301}, 400),
    ("prompt longer than the context", {"model": MODEL, "prompt": "word " * 400}, 400),
    ("unknown field", {"model": MODEL, "prompt": "x", "frobnicate": True}, 400),
    ("n > 1", {"model": MODEL, "prompt": "x", "n": 2}, 400),
    ("too many stops", {"model": MODEL, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400),
    ("unknown model", {"model": "gpt-9", "prompt": "x"}, 404),
    ("no model", {"prompt": "x"}, 400),
    ("body over the cap", {"model": MODEL, "prompt": "x" * 70_000}, 413),
]
BAD_CHAT = [
    ("no messages", {"model": MODEL, "messages": []}, 400),
    ("bad role", {"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, 400),
    ("content not text", {"model": MODEL, "messages": [{"role": "user", "content": {"a": 1}}]}, 400),
    ("logprobs", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "logprobs": True}, 400),
]


def test_every_bad_body_gets_its_4xx_as_openai_errors_and_the_server_keeps_serving(api):
    for endpoint, cases in (("completions", BAD), ("chat/completions", BAD_CHAT)):
        for what, body, status in cases:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            r = requests.post(f"{api.url}/v1/{endpoint}", data=content, timeout=30,
                           headers={**auth(api), "Content-Type": "application/json"})
            assert r.status_code == status, (what, r.text)
            error = r.json()["error"]
            assert error["message"] and error["type"], what
            assert "Traceback" not in r.text and "File \"" not in r.text, what
    r = requests.get(api.url + "/v1/nowhere", headers=auth(api), timeout=30)
    assert r.status_code == 404 and "error" in r.json()
    ok = client(api).completions.create(model=MODEL, prompt="x", max_tokens=3)
    assert ok.usage.completion_tokens >= 1


def test_a_client_that_disconnects_mid_stream_frees_its_slot(api):
    body = {"model": MODEL, "prompt": "import", "max_tokens": 300, "temperature": 1.0, "stream": True, "seed": 1}
    with requests.post(api.url + "/v1/completions", json=body, headers=auth(api), stream=True, timeout=30) as r:
        assert r.status_code == 200
        next(r.iter_lines())
    deadline = time.monotonic() + 10
    while requests.get(api.url + "/healthz", timeout=30).json()["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert requests.get(api.url + "/healthz", timeout=30).json()["active"] == 0
    time.sleep(0.2)
    dropped = [x for x in audit_lines(api) if x.get("stream") and x.get("status") == 499]
    assert dropped and dropped[-1]["completion_tokens"] < 300


def test_metrics_and_the_audit_log_tell_what_happened(api):
    client(api).completions.create(model=MODEL, prompt="x", max_tokens=2)
    text = requests.get(api.url + "/metrics", headers=auth(api), timeout=30).text
    for name in ("gptforge_requests_total{", "gptforge_request_seconds_bucket{", "gptforge_time_to_first_token_seconds_bucket{",
                 "gptforge_tokens_per_second", "gptforge_queue_depth", "gptforge_active_sequences",
                 "gptforge_drift_perplexity", "gptforge_validation_perplexity", "gptforge_model_step"):
        assert name in text, name
    assert "gptforge_rejected_total{reason=\"invalid_api_key\"}" in text
    lines = audit_lines(api)
    assert {x["key"] for x in lines if "endpoint" in x} >= {"alice", "limited"}
    raw = api.audit.read_text()
    assert all(key.split("-", 2)[2] not in raw for key in api.keys.values())  # names only, never a key
    assert all(x["prompt_tokens"] >= 1 and x["latency_s"] > 0 for x in lines if x.get("status") == 200)


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe: commands on
    its fd 3, answers on its fd 4, each message JSON ended by a NUL byte)."""

    def __init__(self, profile):
        import os

        to_chrome, self._w = os.pipe()
        self._r, from_chrome = os.pipe()
        self._buffer, self._id = b"", 0

        flags = ("--headless --no-sandbox --disable-gpu --remote-debugging-pipe --no-first-run "
                 "--disable-background-networking --disable-component-update --disable-sync")
        self.proc = subprocess.Popen(  # the shell puts the two pipe ends where chromium looks for them
            ["bash", "-c", f'exec chromium {flags} --user-data-dir="$0" about:blank 3<&{to_chrome} 4>&{from_chrome}',
             str(profile)], pass_fds=(to_chrome, from_chrome), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome)
        os.close(from_chrome)
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def call(self, method, session=None, timeout=30.0, **params):
        import os
        import select

        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if session or getattr(self, "session", None):
            message["sessionId"] = session or self.session
        os.write(self._w, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply["result"]
            if not select.select([self._r], [], [], max(0.0, deadline - time.monotonic()))[0]:
                raise TimeoutError(f"chromium did not answer {method}")
            self._buffer += os.read(self._r, 1 << 20)

    def js(self, expression):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result["result"].get("value")

    def wait(self, expression, timeout=60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.05)
        raise TimeoutError(expression)

    def close(self):
        self.proc.kill()
        self.proc.wait(10)


@pytest.mark.skipif(__import__("shutil").which("chromium") is None, reason="needs Debian's chromium on PATH")
def test_the_chat_page_types_sends_and_shows_the_streamed_answer(api, tmp_path):
    browser = Browser(tmp_path / "profile")
    try:
        browser.call("Page.navigate", url=api.url + "/")
        browser.wait("document.readyState === 'complete' && !!document.getElementById('send')")
        browser.js("document.getElementById('key').focus()")
        browser.call("Input.insertText", text=api.keys["alice"])  # typed, as a user would
        browser.js("document.getElementById('temperature').value = '0'")
        browser.js("document.getElementById('prompt').focus()")  # the key box's change event fires on blur
        browser.call("Input.insertText", text="def parse(text):")
        browser.call("Input.dispatchKeyEvent", type="keyDown", key="Enter", code="Enter", windowsVirtualKeyCode=13)
        # The answer grows while it streams: seen part-way, then complete
        partial = browser.wait("(() => { const a = document.querySelector('.msg.assistant');"
                               " return a && a.textContent.length > 0 ? a.textContent : null })()")
        answer = browser.wait("(() => { const a = document.querySelector('.msg.assistant');"
                              " return a && a.dataset.done ? a.textContent : null })()")
        errors = browser.js("Array.from(document.querySelectorAll('.msg.error')).map(e => e.textContent)")
    finally:
        browser.close()
    assert errors == []
    assert answer.startswith(partial)
    expected = client(api).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "def parse(text):"}],
                                                   max_tokens=200, temperature=0).choices[0].message.content
    assert answer == expected
    assert browser.proc.returncode is not None
