"""Training-step speed side by side with nanoGPT: same model shape, context, batch, data and device, one run.

nanoGPT (karpathy/nanoGPT) is fetched separately and never part of this repository: pass its checkout with
--nanogpt. The script
- converts gptforge's token shards (the built-in corpus, or --data DIR) to nanoGPT's raw uint16
  train.bin / val.bin in a temporary folder outside both checkouts, and links it in as
  NANOGPT/data/<--dataset> (the link is removed at the end; an existing entry of that name is never touched);
- runs nanoGPT's train.py with its own loop (compiled only with --compile True), and reads its
  "iter N: loss X, time Y ms" lines;
- runs gptforge's real training step (gptforge.bench.step.bench, what `gptforge bench` times) twice on the
  same shape: like for like, with nanoGPT's architecture (learned positions, LayerNorm, exact GELU, no
  biases, tied head) and nanoGPT's optimizer (AdamW, betas 0.9 / 0.95, weight decay 0.1); and gptforge's
  default recipe (rotary positions, RMSNorm, relu^2, QK-norm, Muon), which does more work per step to learn
  more per step;
- prints tokens/s of each and the ratios, with gptforge's split of its step (forward, backward, optimizer),
  and writes benchmarks/results/nanogpt_speed_<device>.json.

Like for like: the same vocabulary (nanoGPT's is set to gptforge's padded one through the meta.pkl it reads;
written here, never read), fp32 on a CPU (nanoGPT never autocasts on a CPU), bf16 autocast on a GPU, and
--compile on both sides or neither. Known differences: nanoGPT reads each batch inline, gptforge builds
batches ahead in a background thread (data.prefetch); gptforge's AdamW is the fused one
(optim.fused), nanoGPT's is fused on CUDA only. Those are part of the step each of them gives its
users. The first --warmup iterations of each are not timed. Run it on an otherwise idle machine.

--interleaved: instead of running train.py, nanoGPT's model and optimizer are imported from the checkout
and stepped in this process, in turn with gptforge's (run_interleaved), and the record adds each round's
ratio. Where the machine's speed drifts (shared cores: on the 2-core machine of BENCHMARKS.md, the same
step took from 3.4 to 4.7 s within one run), back-to-back blocks charge the drift to whoever ran during it;
interleaving charges it to all alike.

    python benchmarks/nanogpt_speed.py --nanogpt PATH/TO/nanoGPT [--interleaved] [--compile True] [--device cpu]
                                       [--batch-size 16] [--iters 20]
"""

from __future__ import annotations

import argparse
import os
import pickle  # written for the peer only: nanoGPT reads its vocabulary size from meta.pkl; nothing is loaded
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from gptforge.bench.step import bench, write_json
from gptforge.config import load_config
from gptforge.data.shards import open_shard
from gptforge.observe.environment import environment
from gptforge.train.builder import resolve_data

ITER_LINE = re.compile(r"^iter (\d+): loss ([-\d.naif]+), time ([\d.]+)ms", re.MULTILINE)
PARAMS_LINE = re.compile(r"number of parameters: ([\d.]+)M")
NANOGPT_ARCH = ["model.pos=learned", "model.norm=layernorm", "model.mlp=gelu_exact", "model.bias=false",
                "model.tie_embeddings=true", "model.dropout=0.0", "model.qk_norm=false", "model.logit_softcap=0.0",
                "model.zero_init_proj=false", "optim.name=adamw", "optim.beta1=0.9", "optim.beta2=0.95",
                "optim.weight_decay=0.1"]


def write_peer_data(shards: list, out: Path) -> int:
    """Concatenate token shards into one raw uint16 file (the 1024-byte shard headers dropped); tokens written."""
    total = 0
    with open(out, "wb") as f:
        for info in shards:
            tokens = open_shard(info.path)
            for start in range(0, tokens.size, 1 << 24):  # in pieces: a shard may be larger than memory
                f.write(np.asarray(tokens[start:start + (1 << 24)], dtype="<u2").tobytes())
            total += tokens.size
    if out.stat().st_size != 2 * total:
        sys.exit(f"{out}: wrote {out.stat().st_size} bytes for {total} tokens")
    return total


def link_dataset(nanogpt: Path, dataset: str, folder: Path) -> Path:
    link = nanogpt / "data" / dataset
    if link.exists() or link.is_symlink():
        sys.exit(f"{link} exists already; choose another --dataset (this script only removes what it made)")
    link.parent.mkdir(exist_ok=True)
    link.symlink_to(folder, target_is_directory=True)
    return link


def run_nanogpt(nanogpt: Path, args: argparse.Namespace, out_dir: Path, dtype: str) -> tuple[list[str], str]:
    iters = args.warmup + args.iters  # nanoGPT runs iterations 0..max_iters
    cmd = [
        sys.executable, "train.py", f"--dataset={args.dataset}", f"--out_dir={out_dir}", f"--device={args.device}",
        f"--compile={args.compile}", f"--dtype={dtype}", f"--n_layer={args.n_layer}", f"--n_head={args.n_head}",
        f"--n_embd={args.n_embd}", f"--block_size={args.block_size}", f"--batch_size={args.batch_size}",
        "--gradient_accumulation_steps=1", "--dropout=0.0", "--bias=False", f"--max_iters={iters - 1}",
        f"--eval_interval={10 ** 9}", "--eval_iters=1", "--log_interval=1", "--always_save_checkpoint=False",
        "--wandb_log=False", "--init_from=scratch",
    ]
    proc = subprocess.run(cmd, cwd=nanogpt, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"nanoGPT failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return cmd, proc.stdout


def parse_nanogpt(log: str) -> tuple[list[float], float | None]:
    """Per-iteration times in seconds, in iteration order, and the parameter count nanoGPT printed."""
    times = [float(m.group(3)) / 1000 for m in ITER_LINE.finditer(log)]
    params = PARAMS_LINE.search(log)
    return times, float(params.group(1)) * 1e6 if params else None


def build_peer(nanogpt: Path, n_layer: int, n_head: int, n_embd: int, block_size: int, vocab: int, device):
    """nanoGPT's model (imported from its checkout's model.py) on `device`, and its AdamW from its own
    configure_optimizers with train.py's defaults (weight decay 0.1, lr 6e-4, betas 0.9 / 0.95)."""
    sys.path.insert(0, str(nanogpt))
    from model import GPT as PeerGPT, GPTConfig as PeerConfig  # nanoGPT's model.py

    peer = PeerGPT(PeerConfig(block_size=block_size, vocab_size=vocab, n_layer=n_layer, n_head=n_head,
                              n_embd=n_embd, dropout=0.0, bias=False)).to(device)
    return peer, peer.configure_optimizers(0.1, 6e-4, (0.9, 0.95), device.type)


def run_interleaved(nanogpt: Path, train_bin: Path, args: argparse.Namespace, vocab: int,
                    variants: dict[str, list[str]]) -> tuple[dict, dict]:
    """nanoGPT's model and optimizer, imported from its checkout, stepped in this process in turn with
    gptforge's steps: round i runs nanoGPT's step i, then each gptforge variant's step i. A machine whose
    speed drifts (shared cores, clocks) then slows all of them alike, where back-to-back blocks of steps
    would charge the drift to whichever ran during it. nanoGPT's step is its train.py loop body: get_batch
    (random windows of the uint16 file, pinned and copied non-blocking on CUDA), forward under its autocast
    context, backward, clip at 1.0, AdamW from its configure_optimizers, zero_grad; compiled as train.py
    compiles it with --compile True."""
    import contextlib

    import torch

    from gptforge.bench.step import StepRig
    from gptforge.parallel.world import running_world

    device = torch.device(args.device)
    torch.manual_seed(1337)
    peer, optimizer = build_peer(nanogpt, args.n_layer, args.n_head, args.n_embd, args.block_size, vocab, device)
    params = peer.get_num_params()
    if args.compile == "True":
        peer = torch.compile(peer)
    ctx = (contextlib.nullcontext() if device.type == "cpu"
           else torch.amp.autocast(device_type=device.type, dtype=torch.bfloat16))
    tokens = np.memmap(train_bin, dtype=np.uint16, mode="r")

    def get_batch():
        ix = torch.randint(len(tokens) - args.block_size, (args.batch_size,))
        x = torch.stack([torch.from_numpy(tokens[i:i + args.block_size].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(tokens[i + 1:i + 1 + args.block_size].astype(np.int64)) for i in ix])
        if device.type == "cuda":
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)

    def peer_step() -> float:
        t0 = time.perf_counter()
        x, y = get_batch()
        with ctx:
            _, loss = peer(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(peer.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # train.py reads the loss back every iteration it logs (log_interval=1 here)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    peer_times = []
    with running_world("auto") as world:
        rigs = {name: StepRig(load_config(None, overrides), world) for name, overrides in variants.items()}
        try:
            print(f"interleaved: {args.warmup} + {args.iters} rounds of nanoGPT, {', '.join(rigs)} ...", flush=True)
            for i in range(args.warmup + args.iters):
                peer_times.append(peer_step())
                for rig in rigs.values():
                    rig.step(timed=i >= args.warmup)
        finally:
            for rig in rigs.values():
                rig.close()
        records = {name: rig.record() for name, rig in rigs.items()}
    peer_record = {"step_times_s": peer_times[args.warmup:], "warmup_times_s": peer_times[:args.warmup],
                   "params_printed": params,
                   "mode": "in-process, interleaved"}
    return peer_record, records


def checkout_commit(path: Path) -> str | None:
    """The commit of a git checkout at exactly this folder (not of a repository that merely contains it)."""
    git = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=path, capture_output=True, text=True)
    lines = git.stdout.split()
    if git.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != path:
        return None
    return lines[1]


def placeholders(argv: list[str]) -> list[str]:
    """The command line with the folders of this machine replaced by names: NANOGPT, DATA, OUT."""
    names = {"--nanogpt": "NANOGPT", "--data": "DATA", "--out": "OUT"}
    out, hide = [], None
    for arg in argv:
        key = arg.split("=", 1)[0]
        if hide:
            out.append(hide)
            hide = None
        elif key in names and "=" in arg:
            out.append(f"{key}={names[key]}")
        else:
            out.append(arg)
            hide = names.get(arg)
    return out


def summary(step_s: list[float], tokens_per_step: int) -> dict:
    median = statistics.median(step_s)
    return {"step_times_s": step_s, "median_step_s": median, "tokens_per_sec": tokens_per_step / median}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nanogpt", required=True, type=Path, help="a checkout of karpathy/nanoGPT")
    parser.add_argument("--nanogpt-commit", default=None, help="its commit, for a checkout without .git")
    parser.add_argument("--dataset", default="gptforge_speed", help="name of the data folder linked into NANOGPT/data")
    parser.add_argument("--data", default=None, help="gptforge prepared data dir (default: the built-in corpus)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--compile", default="False", choices=("False", "True"), help="torch.compile on both sides")
    parser.add_argument("--n-layer", type=int, default=6)
    parser.add_argument("--n-head", type=int, default=6)
    parser.add_argument("--n-embd", type=int, default=384)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--iters", type=int, default=20, help="timed iterations of each (default: 20)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed iterations first (default: 5)")
    parser.add_argument("--interleaved", action="store_true",
                        help="step nanoGPT's model in this process, in turn with gptforge's (see run_interleaved)")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/nanogpt_speed_<device>.json")
    args = parser.parse_args()
    nanogpt = args.nanogpt.resolve()
    if not (nanogpt / "train.py").is_file() or not (nanogpt / "model.py").is_file():
        sys.exit(f"{args.nanogpt}: not a nanoGPT checkout (no train.py / model.py)")
    if args.warmup < 1 or args.iters < 1:
        sys.exit("--warmup and --iters must be at least 1")
    device_type = args.device.split(":")[0]
    # nanoGPT never autocasts on a CPU; on a GPU it runs bf16 autocast (with TF32 for what stays fp32)
    dtype, precision = ("float32", "fp32") if device_type == "cpu" else ("bfloat16", "bf16")

    shape = [f"model.n_layer={args.n_layer}", f"model.n_head={args.n_head}", f"model.n_embd={args.n_embd}",
             f"model.block_size={args.block_size}"]
    common = [*shape, f"train.batch_size={args.batch_size}", f"speed.precision={precision}",
              f"speed.compile={args.compile.lower()}", f"train.device={args.device}"]
    if args.data:
        common.append(f"data.dir={args.data}")
    base = load_config(None, common)
    data = resolve_data(base)
    vocab = load_config(None, [*common, f"model.vocab_size={data.vocab_size}"]).model.padded_vocab_size
    if vocab > 1 << 16:
        sys.exit(f"a vocabulary of {vocab} does not fit nanoGPT's uint16 token files")
    tokens_per_step = args.batch_size * args.block_size

    variants = {"gptforge_like_for_like": [*common, *NANOGPT_ARCH], "gptforge_default": common}
    with tempfile.TemporaryDirectory(prefix="gptforge-nanogpt-") as tmp:
        folder = Path(tmp) / "data"
        folder.mkdir()
        train_tokens = write_peer_data(data.train, folder / "train.bin")
        val_tokens = write_peer_data(data.val, folder / "val.bin")
        if args.interleaved:
            peer, records = run_interleaved(nanogpt, folder / "train.bin", args, vocab, variants)
            cmd = None
        else:
            with open(folder / "meta.pkl", "wb") as f:
                pickle.dump({"vocab_size": vocab}, f)
            link = link_dataset(nanogpt, args.dataset, folder)
            try:
                print(f"nanoGPT: {args.warmup} + {args.iters} iterations ...", flush=True)
                cmd, log = run_nanogpt(nanogpt, args, Path(tmp) / "out", dtype)
            finally:
                link.unlink()
            peer_times, peer_params = parse_nanogpt(log)
            if len(peer_times) != args.warmup + args.iters:
                sys.exit(f"nanoGPT printed {len(peer_times)} iteration lines, expected {args.warmup + args.iters}:\n"
                         f"{log[-2000:]}")
            peer = {"step_times_s": peer_times[args.warmup:], "warmup_times_s": peer_times[:args.warmup],
                    "params_printed": peer_params}
            records = {}
            for name, overrides in variants.items():
                print(f"{name}: {args.warmup} + {args.iters} steps ...", flush=True)
                records[name] = bench(load_config(None, overrides), steps=args.iters, warmup=args.warmup)
    peer.update(summary(peer["step_times_s"], tokens_per_step))

    ours = {}
    for name, record in records.items():
        shown = ["data.dir=DATA" if o.startswith("data.dir=") else o for o in variants[name]]
        ours[name] = {**summary(record["step_times_s"], record["tokens_per_step"]), "overrides": shown,
                      "params": record["model"], "mfu": record["mfu"], "mfu_datasheet": record["mfu_datasheet"],
                      "median_split_s": record["median_split_s"], "split_times_s": record["split_times_s"]}

    commit = args.nanogpt_commit or checkout_commit(nanogpt)
    import torch

    device = torch.device(args.device)
    result = {
        **environment(device, precision, 1),
        "command": " ".join(["python", "benchmarks/nanogpt_speed.py", *placeholders(sys.argv[1:])]),
        "threads": torch.get_num_threads() if device_type == "cpu" else None,
        "shape": {"n_layer": args.n_layer, "n_head": args.n_head, "n_embd": args.n_embd, "block_size": args.block_size,
                  "batch_size": args.batch_size, "vocab_size": vocab, "tokens_per_step": tokens_per_step},
        "data": {"source": "data.dir" if args.data else "built-in corpus", "train_tokens": train_tokens,
                 "val_tokens": val_tokens},
        "warmup": args.warmup,
        "iters": args.iters,
        "mode": "interleaved" if args.interleaved else "sequential",
        "nanogpt": {**peer, "commit": commit,
                    "command": " ".join(a.replace(tmp, "TMP") for a in cmd[1:]) if cmd else None},
        **ours,
        "ratio_like_for_like": ours["gptforge_like_for_like"]["tokens_per_sec"] / peer["tokens_per_sec"],
        "ratio_default": ours["gptforge_default"]["tokens_per_sec"] / peer["tokens_per_sec"],
    }
    if args.interleaved:  # each round's nanoGPT step over gptforge's: the drift of the machine cancels out
        for name in ours:
            ratios = [a / b for a, b in zip(peer["step_times_s"], ours[name]["step_times_s"])]
            result[f"round_ratios_{name.removeprefix('gptforge_')}"] = {
                "median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
    out = Path(args.out or Path(__file__).parent / "results" / f"nanogpt_speed_{device_type}.json")
    write_json(result, out)

    print(f"\n{result['device']} ({device_type}, {precision}), {args.n_layer} x {args.n_embd}, context {args.block_size}, "
          f"batch {args.batch_size}, vocab {vocab}; median of {args.iters} steps after {args.warmup}")
    print(f"{'':<34} {'tokens/s':>10} {'step ms':>9} {'vs nanoGPT':>10}  split (ms)")
    rows = [("nanoGPT", peer, None), ("gptforge, like for like", ours["gptforge_like_for_like"],
                                       result["ratio_like_for_like"]),
            ("gptforge, its default recipe", ours["gptforge_default"], result["ratio_default"])]
    for label, r, ratio in rows:
        split = r.get("median_split_s")
        split = ", ".join(f"{k} {1000 * v:.0f}" for k, v in split.items()) if split else ""
        print(f"{label:<34} {r['tokens_per_sec']:>10,.0f} {1000 * r['median_step_s']:>9.1f} "
              f"{'' if ratio is None else f'{ratio:.2f}x':>10}  {split}")
    for name in ours:
        rounds = result.get(f"round_ratios_{name.removeprefix('gptforge_')}")
        if rounds:
            print(f"{name}: per-round ratio median {rounds['median']:.2f}x (from {rounds['min']:.2f} to "
                  f"{rounds['max']:.2f})")
    print(f"wrote {out}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
