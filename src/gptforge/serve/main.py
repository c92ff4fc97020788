"""`gptforge serve RUN`: check the options, load the run, start uvicorn; SIGHUP swaps weights, SIGTERM drains.

Safe defaults: it listens on 127.0.0.1, requires keys (`--keys FILE`, or `--no-auth` said out loud), and
warns when it listens on another address without TLS. uvicorn's own SIGTERM handling stops accepting
connections and lets the requests in flight finish (up to --drain-timeout) before the engines stop.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import sys
import threading
from pathlib import Path

from gptforge.errors import GptforgeError

INSTALL = 'pip install "gptforge[serve]"'


def _need_extras() -> None:
    missing = []
    for module in ("fastapi", "uvicorn", "prometheus_client"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise GptforgeError(f"gptforge serve needs {', '.join(missing)}: {INSTALL}")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_args(args) -> None:
    """Every option checked before the model loads."""
    if not Path(args.run_dir).exists():
        raise GptforgeError(f"{args.run_dir}: no such run directory or checkpoint folder")
    if args.keys is None and not args.no_auth:
        raise GptforgeError("serve requires API keys: make one with `gptforge keys add NAME --file KEYS` and pass "
                            "--keys KEYS (or --no-auth to serve without keys, e.g. behind your own gateway)")
    if args.keys is not None and args.no_auth:
        raise GptforgeError("--keys and --no-auth contradict each other; drop one")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise GptforgeError("TLS needs both --tls-cert and --tls-key")
    for path in (args.tls_cert, args.tls_key):
        if path is not None and not Path(path).is_file():
            raise GptforgeError(f"{path}: no such file")
    for name in ("slots", "max_tokens", "body_bytes", "rpm", "tpm", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise GptforgeError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if not 1 <= args.port <= 65535:
        raise GptforgeError(f"--port must be in [1, 65535], got {args.port}")
    if args.drift_band <= 1:
        raise GptforgeError(f"--drift-band must be above 1 (a ratio of perplexities), got {args.drift_band}")
    if args.watch is not None and args.watch <= 0:
        raise GptforgeError(f"--watch must be a positive number of seconds, got {args.watch}")


def audit_path(args) -> Path | None:
    if args.audit_log == "off":
        return None
    if args.audit_log is not None:
        return Path(args.audit_log)
    from gptforge.train import checkpoint

    run = Path(args.run_dir)
    base = run.parent.parent if checkpoint.is_checkpoint_folder(run) else run
    return base / "serve" / "audit.jsonl"


def serving_dtype(name: str, device):
    """--precision as the dtype the weights are served in: auto is bf16 where the device computes it
    natively (a GPU from Ampere on, a CPU with AVX512-BF16 or AMX), fp16 on an older GPU, else fp32."""
    import torch

    from gptforge.runtime import resolve_precision

    precision = resolve_precision(name, device)
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision.name, torch.float32)


def default_threads() -> int:
    """Intra-op threads on a CPU: every core but one, which the event loop (TLS, JSON, sockets) needs while
    the engine steps. On two cores, two threads made the single stream 1.5x slower (BENCHMARKS.md, Serving)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores - 1)


def build(args, report=print):
    """The Server and its FastAPI app for parsed arguments (also what the tests start)."""
    import torch

    from gptforge.evaluate.safety import safety_from_args
    from gptforge.runtime import pick_device
    from gptforge.serve.app import Limits, Server, create_app, default_model_name
    from gptforge.serve.host import Host
    from gptforge.serve.keys import KeyStore
    from gptforge.serve.limits import Limiter
    from gptforge.serve.monitor import AuditLog, DriftWatch, Metrics

    safety = safety_from_args(args)
    keys = None if args.no_auth else KeyStore(args.keys)
    if keys is not None and len(keys) == 0:
        report(f"warning: {args.keys} holds no live key yet; every request will get 401 until one is added")
    device = pick_device(args.device)
    dtype = serving_dtype(args.precision, device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads or default_threads())
    host = Host(args.run_dir, device, args.slots, dtype, report=report)
    metrics = Metrics(lambda: host.current.engine.queued, lambda: host.current.engine.active, args.slots)
    audit = AuditLog(audit_path(args))
    drift = DriftWatch(host.current.val_ppl, args.drift_band, metrics, audit)
    metrics.step.set(host.current.step)

    def swapped(served) -> None:
        metrics.step.set(served.step)
        metrics.reloads.inc()
        drift.rebase(served.val_ppl)
        audit.write({"event": "reload", "step": served.step, "checkpoint": str(served.run.checkpoint)})

    host.on_swap.append(swapped)
    server = Server(host, model_name=args.model_name or default_model_name(args.run_dir), keys=keys,
                    limiter=Limiter(args.rpm, args.tpm), safety=safety, metrics=metrics, audit=audit, drift=drift,
                    limits=Limits(max_tokens=args.max_tokens, body_bytes=args.body_bytes))
    return server, create_app(server)


def run_serve(args) -> int:
    _need_extras()
    check_args(args)
    import uvicorn

    say = lambda m: print(f"gptforge serve: {m}", file=sys.stderr, flush=True)  # noqa: E731
    # The engine thread and the event loop share the GIL: hand it over within 1 ms rather than Python's 5 ms
    sys.setswitchinterval(0.001)
    server, app = build(args, report=say)
    host = server.host
    tls = args.tls_cert is not None
    if not _is_loopback(args.host) and not tls:
        say(f"warning: listening on {args.host} without TLS: keys and text cross the network in the clear; "
            "pass --tls-cert and --tls-key")
    stop_watch = threading.Event()
    if args.watch:
        threading.Thread(target=host.watch, args=(args.watch, stop_watch), daemon=True, name="watch").start()

    def on_hup(signum, frame):
        threading.Thread(target=_reload, args=(host, say), daemon=True, name="reload").start()

    signal.signal(signal.SIGHUP, on_hup)
    # uvicorn handles SIGTERM (stop accepting, let requests finish) and then raises it again to the handler it
    # found: with this one in place the process ends by returning, with status 0, once drained.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    config = uvicorn.Config(app, host=args.host, port=args.port, ssl_certfile=args.tls_cert, ssl_keyfile=args.tls_key,
                            log_level="warning", timeout_graceful_shutdown=args.drain_timeout, access_log=False)
    scheme = "https" if tls else "http"
    say(f"serving {server.model_name} (step {host.current.step}, {args.slots} slots) on {scheme}://{args.host}:"
        f"{args.port}; keys {'off' if server.keys is None else args.keys}; audit log {server.audit.path or 'off'}")
    try:
        uvicorn.Server(config).run()
    finally:
        stop_watch.set()
        host.close()
    say("stopped")
    return 0


def _reload(host, say) -> None:
    try:
        if not host.reload():
            say(f"SIGHUP: no newer checkpoint; still serving step {host.current.step}")
    except Exception as e:  # a damaged or incompatible checkpoint must not take the server down
        say(f"SIGHUP: reload failed, still serving step {host.current.step}: {e}")


def add_arguments(p) -> None:
    """The options of `gptforge serve` (cli.py declares the subcommand)."""
    p.add_argument("run_dir", metavar="RUN", help="run directory (newest intact checkpoint) or a checkpoint folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--keys", metavar="FILE", help="API key file made by `gptforge keys add` (required unless --no-auth)")
    p.add_argument("--no-auth", action="store_true", help="serve without API keys (only behind your own gateway)")
    p.add_argument("--tls-cert", metavar="FILE", help="PEM certificate: serve HTTPS")
    p.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert")
    p.add_argument("--model-name", help="the model id clients ask for (default: the run folder's name)")
    p.add_argument("--slots", type=int, default=16, help="sequences decoded together, each with its own KV cache "
                   "row (default: 16); more requests wait in a queue")
    p.add_argument("--max-tokens", type=int, default=512, help="the most tokens one request may generate (default: 512)")
    p.add_argument("--body-bytes", type=int, default=1 << 20, help="largest request body (default: 1 MiB)")
    p.add_argument("--rpm", type=int, default=None, help="requests per minute per key (default: unlimited; "
                   "`keys add --rpm` sets one key's)")
    p.add_argument("--tpm", type=int, default=None, help="generated tokens per minute per key (default: unlimited)")
    p.add_argument("--audit-log", metavar="FILE", help="JSONL audit log, or 'off' (default: RUN/serve/audit.jsonl)")
    p.add_argument("--drift-band", type=float, default=2.0, help="log a drift event when the served prompts' "
                   "perplexity is over BAND times (or under 1/BAND of) the validation perplexity (default: 2)")
    p.add_argument("--watch", type=float, metavar="SECONDS", help="poll the run for a newer checkpoint and swap it "
                   "in (as SIGHUP does)")
    p.add_argument("--drain-timeout", type=int, default=30, help="on SIGTERM, seconds to let requests in flight "
                   "finish (default: 30)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="the dtype the weights are served in (default: auto, bf16 where the device computes it "
                   "natively, else fp32; fp16 on GPUs without bf16)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the matmuls (default: all cores "
                   "but one, which the HTTP side needs)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
