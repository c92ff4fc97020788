"""torchrun with 2 CPU processes (gloo): the same losses as 1 process at the same global batch, gradient
compression, resuming across world sizes, and a killed worker restarted by torchrun."""

import os
import subprocess
import sys

import pytest

from gptforge.observe.metrics import read_metrics

pytestmark = pytest.mark.slow

# A worker that dies once (SIGKILL) on rank KILL_RANK after KILL_AFTER optimizer steps, first attempt only;
# or whose loss value (not its gradient) turns NaN on rank NAN_RANK at forward call NAN_CALL, and which
# writes a checksum of its weights at every save, to compare the processes.
CHILD = r"""
import hashlib, os, signal, sys, torch
if "NAN_RANK" in os.environ and os.environ["RANK"] == os.environ["NAN_RANK"]:
    from gptforge.model.gpt import GPT
    forward, calls = GPT.forward, {"n": 0}
    def poisoned(self, idx, targets=None, **kw):
        out = forward(self, idx, targets, **kw)
        if targets is not None and self.training:
            calls["n"] += 1
            if calls["n"] == int(os.environ["NAN_CALL"]):
                return out + out.detach() * float("nan")
        return out
    GPT.forward = poisoned
if "CHECKSUM_DIR" in os.environ:
    import gptforge.train.checkpoint as ckpt
    tensors = ckpt.model_tensors
    def checksummed(model, state=None):
        out = tensors(model, state)
        own = model.state_dict()  # this process's own copy (the gathered state lives on rank 0 only)
        digest = hashlib.sha256(b"".join(own[k].detach().numpy().tobytes() for k in sorted(own))).hexdigest()
        with open(os.path.join(os.environ["CHECKSUM_DIR"], "rank" + os.environ["RANK"]), "w") as f:
            f.write(digest)
        return out
    ckpt.model_tensors = checksummed
if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0" and os.environ.get("RANK") == os.environ.get("KILL_RANK"):
    from gptforge.train.muon import Muon
    calls = {"n": 0}
    def dying(step):  # whichever optimizer optim.name picks
        def wrapped(self, *a, **k):
            calls["n"] += 1
            if calls["n"] > int(os.environ["KILL_AFTER"]):
                os.kill(os.getpid(), signal.SIGKILL)
            return step(self, *a, **k)
        return wrapped
    torch.optim.AdamW.step = dying(torch.optim.AdamW.step)
    Muon.step = dying(Muon.step)
from gptforge.cli import main
sys.exit(main(sys.argv[1:]))
"""


def train_args(data, run_dir, steps, *extra):
    return [
        "train", f"data.dir={data}", f"run.dir={run_dir}", "model.preset=tiny", "train.batch_size=4",
        "train.batch_tokens=1024", f"train.max_steps={steps}", "train.max_time=null", "train.log_every=1",
        "eval.every=3", "eval.tokens=1024", "train.save_every=2", "train.samples=0",
        "run.tensorboard=false", "data.prefetch=0", *extra,
    ]


def launch(nproc, argv, restarts=0, env=None, child=False):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    if nproc == 1:
        cmd = [sys.executable, "-m", "gptforge", *argv]
    elif restarts or child:  # the child script above, run by torchrun
        script = os.path.join(env["CHILD_DIR"], "child.py")
        with open(script, "w") as f:
            f.write(CHILD)
        cmd = [*torchrun, f"--max-restarts={restarts}", script, *argv]
    else:
        cmd = [*torchrun, "-m", "gptforge", *argv]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def curve(run_dir, key="train_loss"):
    return {r["step"]: r[key] for r in read_metrics(run_dir) if key in r}


def close(a, b, rel=1e-4):
    assert a.keys() == b.keys()
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=rel), (step, a[step], b[step])


@pytest.fixture(scope="module")
def reference(small_data, tmp_path_factory):
    """One process, 4 micro-steps of 4 x 64 tokens per optimizer step."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    launch(1, train_args(small_data, run_dir, 6))
    return run_dir


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_equal_one_with_accumulation(small_data, reference, tmp_path, strategy):
    launch(2, train_args(small_data, tmp_path / "run", 6, f"dist.strategy={strategy}"))
    close(curve(reference), curve(tmp_path / "run"))
    close(curve(reference, "val_loss"), curve(tmp_path / "run", "val_loss"))


@pytest.mark.parametrize("method, ratio", [("bf16", 2.0), ("fp16", 2.0), ("powersgd", 1.5)])
def test_gradient_compression_trains_and_reports_bytes(small_data, reference, tmp_path, method, ratio):
    extra = [f"dist.grad_compression={method}", "dist.powersgd_start_step=2", "dist.powersgd_rank=2"]
    launch(2, train_args(small_data, tmp_path / "run", 6, *extra))
    lines = [r for r in read_metrics(tmp_path / "run") if "train_loss" in r]
    assert lines[-1]["compression_ratio"] >= ratio
    assert lines[-1]["comm_bytes_per_step"] > 0
    # Compressed gradients train almost like exact ones over a few steps (stated bound: 2% of the loss).
    close(curve(reference), curve(tmp_path / "run"), rel=0.02)


@pytest.mark.parametrize("first, second", [(2, 1), (1, 2)])
def test_resume_across_world_sizes(small_data, reference, tmp_path, first, second):
    run_dir = tmp_path / "run"
    launch(first, train_args(small_data, run_dir, 4))
    launch(second, train_args(small_data, run_dir, 6))
    assert [r for r in read_metrics(run_dir) if r.get("event") == "resume"][0]["saved_world_size"] == first
    close(curve(reference), curve(run_dir))


def test_killed_worker_is_restarted_from_the_last_checkpoint(small_data, reference, tmp_path):
    run_dir = tmp_path / "run"
    launch(2, train_args(small_data, run_dir, 6), restarts=1,
           env={"KILL_RANK": "1", "KILL_AFTER": "3", "CHILD_DIR": str(tmp_path)})
    resumes = [r for r in read_metrics(run_dir) if r.get("event") == "resume"]
    assert [r["step"] for r in resumes] == [2]  # died in step 4: lost at most one checkpoint interval
    close(curve(reference), curve(run_dir))


def test_hsdp_equals_one_process(small_data, reference, tmp_path):
    # 2 processes as 2 replicas of 1 shard each: the 2-D mesh path, checkable on one host.
    launch(2, train_args(small_data, tmp_path / "run", 6, "dist.strategy=hsdp", "dist.hsdp_shard_size=1"))
    close(curve(reference), curve(tmp_path / "run"))


def test_sharded_checkpoint_is_verified_and_reshards(small_data, reference, tmp_path):
    import gptforge
    from gptforge.train import checkpoint

    run_dir = tmp_path / "run"
    launch(2, train_args(small_data, run_dir, 4, "dist.strategy=fsdp2", "dist.checkpoint=sharded"))
    sharded = checkpoint.list_checkpoints(run_dir / "checkpoints")[0]
    assert not (sharded / "model.safetensors").exists()
    assert sorted(p.name for p in (sharded / "shards").iterdir()) == [
        "index.json", "rank_00000.safetensors", "rank_00001.safetensors"]
    model, _ = gptforge.load(sharded)  # one process, no process group: both ranks' rows put together
    assert model.transformer.wte.weight.abs().sum() > 0

    launch(1, train_args(small_data, run_dir, 6))  # saved as 2 shards, resumed by 1 process
    close(curve(reference), curve(run_dir))

    shard = sharded / "shards" / "rank_00001.safetensors"
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 1
    shard.write_bytes(bytes(blob))
    assert any(shard.name in problem for problem in checkpoint.verify(sharded))


def test_a_sharded_checkpoint_resumes_into_sharded_processes(small_data, reference, tmp_path):
    """Written by 2 FSDP2 processes, read back by 2: each reads the boxes of its own shards of the weights
    and of the optimizer state, and the curve goes on as one process's."""
    run_dir = tmp_path / "run"
    sharded = ("dist.strategy=fsdp2", "dist.checkpoint=sharded")
    launch(2, train_args(small_data, run_dir, 4, *sharded))
    launch(2, train_args(small_data, run_dir, 6, *sharded))
    assert [r["step"] for r in read_metrics(run_dir) if r.get("event") == "resume"] == [4]
    close(curve(reference), curve(run_dir))


def test_a_replicated_sharded_checkpoint_writes_each_box_once(small_data, tmp_path):
    """HSDP as 2 replicas of 1 shard: both processes hold every value; rank 0 writes them, rank 1 nothing,
    and one process loads the checkpoint as the replicas had it."""
    import json

    import gptforge
    from gptforge.train import checkpoint

    run_dir = tmp_path / "run"
    launch(2, train_args(small_data, run_dir, 2, "dist.strategy=hsdp", "dist.hsdp_shard_size=1",
                         "dist.checkpoint=sharded"))
    sharded = checkpoint.list_checkpoints(run_dir / "checkpoints")[0]
    index = json.loads((sharded / "shards" / "index.json").read_text())
    files = {piece["file"] for entry in index["tensors"].values() for piece in entry["pieces"]}
    assert files == {"rank_00000.safetensors"} and index["world_size"] == 2
    model, _ = gptforge.load(sharded)
    assert model.transformer.wte.weight.abs().sum() > 0


def test_scaling_report(small_data, tmp_path):
    out = tmp_path / "scaling.json"
    result = subprocess.run(
        [sys.executable, "-m", "gptforge", "bench", f"data.dir={small_data}", "model.preset=tiny", "--steps=3",
         "--warmup=1", "--nproc=2", f"--json={out}"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "scaling efficiency" in result.stdout
    import json

    report = json.loads(out.read_text())
    assert report["one"]["world_size"] == 1 and report["many"]["world_size"] == 2
    assert report["many"]["tokens_per_step"] == 2 * report["one"]["tokens_per_step"]  # weak scaling
    assert report["many"]["comm_bytes_per_step"] > 0 and len(report["many"]["step_times_s"]) == 3
    assert 0 < report["scaling_efficiency"] and report["distributed_overhead_s"] >= 0


def test_nonfinite_loss_on_one_rank_is_skipped_by_all(small_data, tmp_path):
    # Rank 1's loss value turns NaN in step 3 (forward call 5 of 2 per step) while its gradients stay finite.
    launch(2, train_args(small_data, tmp_path / "run", 5), child=True,
           env={"NAN_RANK": "1", "NAN_CALL": "5", "CHECKSUM_DIR": str(tmp_path), "CHILD_DIR": str(tmp_path)})
    skips = [r["step"] for r in read_metrics(tmp_path / "run") if r.get("event") == "skip_nonfinite"]
    assert skips == [3]
    assert (tmp_path / "rank0").read_text() == (tmp_path / "rank1").read_text()  # both skipped: still in step
