"""benchmarks/gpu_proof.py: the dry run of every part on this CPU, and the run's rules (part selection, limits,
a failing or stopped part recorded while the run goes on)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import gpu_proof  # noqa: E402

PART_NAMES = [p.name for p in gpu_proof.PARTS]


def records(out: Path) -> dict[str, dict]:
    return {r["part"]: r for r in (json.loads(p.read_text()) for p in sorted(out.glob("[0-9]_*.json")))}


def test_parts_are_chosen_by_name_or_number_and_run_in_the_proofs_order():
    assert gpu_proof.select_parts(None) == PART_NAMES
    assert gpu_proof.select_parts("ablate, 3,1") == ["environment", "bench", "ablate"]
    with pytest.raises(ValueError, match=r"'benchmark' is not a part; the parts are 1 environment, 2 gpu_tests"):
        gpu_proof.select_parts("benchmark")
    with pytest.raises(ValueError, match="'9' is not a part"):
        gpu_proof.select_parts("9")


def test_limits_name_a_part_and_a_positive_number_of_seconds():
    assert gpu_proof.parse_limits(["bench=90", "ablate=1.5"]) == {"bench": 90.0, "ablate": 1.5}
    for bad, message in (("benc=3", "'benc' is not a part"), ("bench=soon", "expected PART=SECONDS"),
                         ("bench=0", "must be positive")):
        with pytest.raises(ValueError, match=message):
            gpu_proof.parse_limits([bad])


def test_the_default_gpu_run_fits_its_window():
    """One command under 8 minutes; time to loss gets up to two minutes of training per side."""
    gpu = gpu_proof.GPU
    assert gpu.time_limit <= 480 and gpu.device == "cuda" and gpu.shape == gpu_proof.GPT2_124M
    assert set(gpu.limits) == set(PART_NAMES) == set(gpu_proof.DRY_RUN.limits)
    assert gpu.ttl_seconds == 120 and gpu.limits["time_to_loss"] >= 2 * gpu.ttl_seconds + gpu.ttl_reserve_s


def test_every_tests_outcome_is_read_from_the_junit_report_also_of_an_interrupted_run(tmp_path):
    report = tmp_path / "junit.xml"
    report.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.kernels.test_kernels" name="test_a[cuda]" time="0.5" />'
        '<testcase classname="tests.kernels.test_kernels" name="test_b[cuda]"><failure message="off by 1" /></testcase>'
        '<testcase classname="tests.adapt.test_prune" name="test_c"><skipped message="needs sm_80" /></testcase>'
        '<testcase classname="tests.adapt.test_prune" name="test_d"><error message="fixture" /></testcase>'
        '<testcase time="0.000" /></testsuite></testsuites>')  # the last: running when pytest was interrupted
    got = [(t["test"], t["outcome"], t["message"]) for t in gpu_proof.read_junit(report)]
    assert got == [("tests.kernels.test_kernels::test_a[cuda]", "passed", ""),
                   ("tests.kernels.test_kernels::test_b[cuda]", "failed", "off by 1"),
                   ("tests.adapt.test_prune::test_c", "skipped", "needs sm_80"),
                   ("tests.adapt.test_prune::test_d", "error", "fixture")]


def test_nanogpts_warmup_keeps_its_share_and_leaves_an_iteration_to_decay():
    """nanoGPT's cosine divides by the iterations after its warmup: a short run must keep at least one."""
    import time_to_loss as ttl

    gpt2, small = ttl.RECIPES["gpt2-124m"], ttl.RECIPES["small"]
    assert ttl.warmup_iters(600000, gpt2) == 2000 and ttl.warmup_iters(5000, small) == 100
    assert ttl.warmup_iters(2, gpt2) == 1 and ttl.warmup_iters(2, small) == 1


@pytest.mark.slow
def test_a_part_stopped_at_its_limit_and_a_failing_part_are_recorded_and_the_run_goes_on(tmp_path, capsys):
    empty = tmp_path / "not-data"
    empty.mkdir()
    out = tmp_path / "out"
    rc = gpu_proof.main(["--dry-run", "--parts", "batch_size,bench", "--data", str(empty), "--out", str(out),
                         "--limit", "bench=0.5", "--nanogpt", str(tmp_path / "absent")])
    assert rc == 1
    got = records(out)
    assert list(got) == ["bench", "batch_size"]
    assert got["bench"]["status"] == "timed out" and "limit of 0.5 s" in got["bench"]["error"]
    batch = got["batch_size"]  # it ran after the stopped part
    assert batch["status"] == "failed" and "DataError" in batch["subparts"]["gptforge"]["error"]
    assert "nanoGPT not found at" in batch["subparts"]["nanogpt"]["reason"]  # what it could still do, it did
    summary = json.loads((out / "summary.json").read_text())
    assert [p["status"] for p in summary["parts"]] == ["timed out", "failed"]
    assert "timed out" in capsys.readouterr().out


@pytest.mark.slow
def test_the_dry_run_runs_every_part_on_the_cpu(small_data, tmp_path):
    out = tmp_path / "records"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_proof.py"), "--dry-run", "--data", str(small_data),
                           "--out", str(out), "--nanogpt", str(tmp_path / "no-nanogpt")],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    got = records(out)
    assert list(got) == PART_NAMES
    assert {name: r["status"] for name, r in got.items()} == {name: "ok" for name in PART_NAMES}
    skipped = {(part, sub) for part, r in got.items() for sub, s in r["subparts"].items() if s["status"] == "skipped"}
    assert {("bench", "nanogpt"), ("batch_size", "nanogpt"), ("time_to_loss", "nanogpt")} <= skipped
    assert skipped <= {("bench", "nanogpt"), ("batch_size", "nanogpt"), ("time_to_loss", "nanogpt"),
                       ("bench", "gptforge_cuda_graphs"), ("distributed", "energy")}  # the last two: no GPU
    for part in ("bench", "batch_size", "time_to_loss"):
        reason = got[part]["subparts"]["nanogpt"]["reason"]
        assert "nanoGPT not found at" in reason and "git clone https://github.com/karpathy/nanoGPT" in reason
    assert got["bench"]["subparts"]["gptforge"]["tokens_per_sec"] > 0
    assert got["batch_size"]["subparts"]["gptforge"]["batch_size"] >= 1
    assert all(t["outcome"] in ("passed", "skipped") for t in got["gpu_tests"]["subparts"]["pytest"]["tests"])
    assert all(got["kernels"]["subparts"][k]["values_ok"] for k in ("rmsnorm", "rope", "chunked_cross_entropy"))
    assert {got["distributed"]["subparts"][k]["wrapped"] for k in ("ddp", "fsdp2")} == {True}
    rungs = {r["rung"]: r["status"] for r in got["ablate"]["subparts"]["ladder"]["rungs"]}
    assert rungs["fp32"] == "ran" and rungs["fp8"] == "skipped"
    assert got["time_to_loss"]["subparts"]["gptforge"]["final_val_loss"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["wall_s"] < 180 and [p["part"] for p in summary["parts"]] == PART_NAMES
    table = proc.stdout[proc.stdout.index("GPU proof (dry-run), "):]
    assert all(name in table for name in PART_NAMES)
