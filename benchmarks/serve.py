"""`gptforge serve` under load, beside Hugging Face transformers' `generate` on the same model, same run.

    flock -x /tmp/cpu.lock python benchmarks/serve.py [--requests 500] [--tokens 64] [--precision auto]
        [--json benchmarks/results/serve_cpu.json]

A GPT-2 style model (learned positions, LayerNorm, GELU, no QK-norm: what `export-hf` writes; random
weights, as speed does not depend on their values) is saved as a run, exported with `gptforge export-hf`,
and decoded three ways:
- transformers: GPT2LMHeadModel.generate, greedy, one prompt at a time, --tokens new tokens (min_new_tokens
  keeps it from stopping early), in fp32 and in bf16, seven runs each after a warm-up; the baseline is the
  best run of the faster dtype;
- the engine in this process (the serving dtype, the server's thread count): one stream, and 16 rows
  decoding together, the median of seven runs each: what the server's HTTP side starts from;
- gptforge serve (--precision, default auto; API key, safety filter on; on 127.0.0.1): for 1, 4, 16 and 32
  concurrent clients, each client streams requests of --tokens tokens (`"stream": true`; the prompt and
  greedy decoding are chosen to run to length) until --requests requests have been answered at that level.
  The load generator is one asyncio process (aiohttp) on the same machine.
Reported per level: p50/p99 latency, p50/p99 time to first token, aggregate tokens/s, errors. Targets:
single stream >= 2x transformers' tokens/s; 16 clients >= 6x the single stream's aggregate; zero errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TARGET_SINGLE_VS_HF = 2.0
TARGET_16_VS_SINGLE = 6.0
LEVELS = (1, 4, 16, 32)
MODEL_KEYS = ["model.pos=learned", "model.norm=layernorm", "model.mlp=gelu", "model.qk_norm=false", "model.bias=true",
              "model.logit_softcap=0", "model.n_layer=4", "model.n_head=4", "model.n_embd=256", "model.block_size=256"]


def make_run(root: Path) -> tuple[Path, Path]:
    from gptforge.config import load_config
    from gptforge.data.tokenizer import Tokenizer
    from gptforge.model import build_model
    from gptforge.train.checkpoint import save_weights

    tok = Tokenizer.bytes()
    tok_file = root / "tokenizer.json"
    tok.save(tok_file)
    cfg = load_config(None, [*MODEL_KEYS, f"model.vocab_size={tok.vocab_size}"])
    torch.manual_seed(0)
    run = root / "run"
    save_weights(run, build_model(cfg.model), cfg.to_dict(), step=0, tokenizer_file=tok_file)
    hf = root / "hf"
    subprocess.run([sys.executable, "-m", "gptforge", "export-hf", str(run), "--out", str(hf)], check=True,
                   env=_env(), capture_output=True, timeout=300)
    return run, hf


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src")}


def hf_tokens_per_s(hf: Path, prompt: list[int], tokens: int, dtype: torch.dtype, runs: int = 7) -> list[float]:
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(hf, dtype=dtype).eval()
    ids = torch.tensor([prompt])
    kwargs = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)
    rates = []
    with torch.no_grad():
        model.generate(ids, **kwargs)
        for _ in range(runs):
            t = time.perf_counter()
            out = model.generate(ids, **kwargs)
            rates.append(tokens / (time.perf_counter() - t))
    assert out.shape[1] - len(prompt) == tokens
    return rates


def engine_tokens_per_s(run: Path, prompt: list[int], tokens: int, precision: str, rows: int, runs: int = 7) -> float:
    """The median rate of the serving engine in this process: `rows` greedy requests decoding together."""
    from gptforge.evaluate.engine import Engine, Request, Sampling
    from gptforge.runs import load_run
    from gptforge.serve.main import default_threads, serving_dtype

    device = torch.device("cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(default_threads())
    model = load_run(run, device, report=lambda m: None).model.to(serving_dtype(precision, device))
    engine = Engine(model, slots=max(LEVELS))  # as the server builds it
    rates = []
    for i in range(runs + 1):
        requests = [engine.submit(Request(prompt + [r], tokens, Sampling(temperature=0))) for r in range(rows)]
        start = time.perf_counter()
        while not all(r.done.is_set() for r in requests):
            engine.step()
        if i:  # the first is a warm-up
            rates.append(rows * tokens / (time.perf_counter() - start))
    torch.set_num_threads(threads)
    return statistics.median(rates)


async def one_request(session, url: str, key: str, prompt: str, tokens: int) -> dict:
    body = {"model": "bench", "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, usage, done = None, None, False
    async with session.post(url, json=body, headers={"Authorization": f"Bearer {key}"}) as r:
        if r.status != 200:
            return {"error": f"HTTP {r.status}"}
        async for raw in r.content:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter()
            if chunk.get("usage"):
                usage = chunk["usage"]
    end = time.perf_counter()
    if not done or usage is None:
        return {"error": "stream ended early"}
    return {"latency": end - start, "ttft": (first or end) - start, "tokens": usage["completion_tokens"]}


async def load(url: str, key: str, clients: int, requests: int, tokens: int) -> dict:
    import aiohttp

    results: list[dict] = []
    remaining = [requests]
    prompts = ["def main():", "import os\n", "class Config:", "for i in range(", "return {", "# The server"]

    async def client(i: int, session) -> None:
        while remaining[0] > 0:
            remaining[0] -= 1
            try:
                results.append(await one_request(session, url, key, prompts[i % len(prompts)], tokens))
            except Exception as e:  # noqa: BLE001 - counted as an error
                results.append({"error": repr(e)})

    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=clients)) as session:
        await one_request(session, url, key, "warm up", 8)
        start = time.perf_counter()
        await asyncio.gather(*(client(i, session) for i in range(clients)))
        wall = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    lat = sorted(r["latency"] for r in ok)
    ttft = sorted(r["ttft"] for r in ok)

    def pct(xs, q):
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None

    return {"clients": clients, "requests": len(results), "errors": len(results) - len(ok),
            "error_examples": sorted({r["error"] for r in results if "error" in r})[:3],
            "tokens": sum(r["tokens"] for r in ok), "wall_s": wall,
            "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
            "latency_p50_s": pct(lat, 0.5), "latency_p99_s": pct(lat, 0.99),
            "ttft_p50_s": pct(ttft, 0.5), "ttft_p99_s": pct(ttft, 0.99),
            "latency_mean_s": statistics.fmean(lat) if lat else None}


def start_server(run: Path, keys: Path, slots: int, extra: list[str] = ()) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "gptforge", "serve", str(run), "--keys", str(keys), "--port",
                             str(port), "--slots", str(slots), "--model-name", "bench", "--audit-log", "off",
                             "--max-tokens", "1024", *extra], env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    import urllib.request

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(proc.stderr.read().decode())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=500, help="requests answered per concurrency level")
    p.add_argument("--tokens", type=int, default=64, help="tokens generated per request")
    p.add_argument("--precision", default="auto", help="the server's --precision (default: auto)")
    p.add_argument("--json", default=str(ROOT / "benchmarks/results/serve_cpu.json"))
    args = p.parse_args()
    from gptforge.observe.environment import environment
    from gptforge.serve.keys import add_key
    from gptforge.serve.main import default_threads, serving_dtype

    dtype = str(serving_dtype(args.precision, torch.device("cpu"))).removeprefix("torch.")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run, hf = make_run(root)
        prompt = [0] + list(b"def main():")
        hf_runs = {name: hf_tokens_per_s(hf, prompt, args.tokens, dt)
                   for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16))}
        for name, rates in hf_runs.items():
            print(f"transformers generate, 1 stream, {name}: best {max(rates):.1f} tokens/s, "
                  f"median {statistics.median(rates):.1f}")
        hf_dtype = max(hf_runs, key=lambda name: max(hf_runs[name]))
        hf_tps = max(hf_runs[hf_dtype])
        engine = {rows: engine_tokens_per_s(run, prompt, args.tokens, args.precision, rows) for rows in (1, 16)}
        print(f"engine in this process ({dtype}, {default_threads()} threads): 1 stream {engine[1]:.1f} tokens/s, "
              f"16 rows {engine[16]:.1f} tokens/s")
        keys = root / "keys.json"
        key = add_key(keys, "bench")
        proc, base = start_server(run, keys, slots=max(LEVELS), extra=["--precision", args.precision])
        levels = []
        try:
            for clients in LEVELS:
                result = asyncio.run(load(base + "/v1/completions", key, clients, max(args.requests, clients),
                                          args.tokens))
                levels.append(result)
                print(f"{clients:3d} clients: {result['tokens_per_s']:8.1f} tokens/s | latency p50 "
                      f"{result['latency_p50_s']:.3f} s p99 {result['latency_p99_s']:.3f} s | ttft p50 "
                      f"{result['ttft_p50_s']:.3f} s p99 {result['ttft_p99_s']:.3f} s | errors {result['errors']}")
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    single = levels[0]["tokens_per_s"]
    at16 = next(r for r in levels if r["clients"] == 16)["tokens_per_s"]
    verdict = {"single_vs_hf": single / hf_tps, "single_vs_hf_target": TARGET_SINGLE_VS_HF,
               "c16_vs_single": at16 / single, "c16_vs_single_target": TARGET_16_VS_SINGLE,
               "errors": sum(r["errors"] for r in levels)}
    verdict["met"] = (verdict["single_vs_hf"] >= TARGET_SINGLE_VS_HF and verdict["c16_vs_single"] >= TARGET_16_VS_SINGLE
                      and verdict["errors"] == 0)
    print(f"single stream / transformers ({hf_dtype}, best run): {verdict['single_vs_hf']:.2f}x (target >= "
          f"{TARGET_SINGLE_VS_HF}x); 16 clients / single stream: {verdict['c16_vs_single']:.2f}x (target >= "
          f"{TARGET_16_VS_SINGLE}x); errors {verdict['errors']}; targets {'met' if verdict['met'] else 'NOT met'}")
    record = {"benchmark": "serve", "model": MODEL_KEYS, "tokens_per_request": args.tokens,
              "requests_per_level": args.requests, "server_precision": args.precision, "server_dtype": dtype,
              "server_threads": default_threads(), "transformers_runs_tokens_per_s": hf_runs,
              "transformers_baseline": {"dtype": hf_dtype, "tokens_per_s": hf_tps},
              "engine_in_process_tokens_per_s": {"1": engine[1], "16": engine[16]}, "levels": levels,
              "verdict": verdict, "environment": environment(torch.device("cpu"), args.precision, 1)}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=1))
    print(f"wrote {args.json}")
    return 0 if verdict["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
