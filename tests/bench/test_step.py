from gptforge.bench.step import bench
from gptforge.config import load_config


def test_bench_record_has_what_a_result_file_needs(small_data):
    record = bench(load_config(None, [f"data.dir={small_data}", "model.preset=tiny", "train.batch_size=4"]), steps=3, warmup=1)
    for key in ("device", "torch", "cuda", "git_sha", "command", "config", "model", "tokens_per_sec", "mfu",
                "peak_mem_gb", "step_times_s", "median_data_wait_s"):
        assert key in record
    assert len(record["step_times_s"]) == 3 and record["tokens_per_sec"] > 0 and 0 < record["mfu"] < 1.5
    assert record["tokens_per_step"] == 4 * 64
