"""The benchmarks' harness (bench/common.py) and result files: rows keep their columns when a later row
brings a new one; set-up is not timed; a kept buffer can be left out of the peak; bench/ops.py finds
each op's benchmark by its file (bench/op_<op>.py); ops.py and bench_cpu.py write the columns of the
committed CSVs."""
import csv
import sys
import time
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
RESULTS = BENCH / "results"
sys.path.insert(0, str(BENCH))

import bench_cpu  # noqa: E402
import ops  # noqa: E402
from common import append_csv, peak_mib, time_ms  # noqa: E402


def test_append_csv_widens_the_header(tmp_path):
    path = tmp_path / "r.csv"
    append_csv(str(path), [{"date": "d1", "tokens_per_s": "1.0"}])
    append_csv(str(path), [{"date": "d2", "tokens_per_s": "2.0"}])
    append_csv(str(path), [{"date": "d3", "tokens_per_s": "3.0", "iteration_memory_mib": "62"}])
    append_csv(str(path), [{"date": "d4", "iteration_memory_mib": "7"}])
    rows = list(csv.DictReader(path.open()))
    assert list(rows[0]) == ["date", "tokens_per_s", "iteration_memory_mib"]
    assert [(r["date"], r["tokens_per_s"], r["iteration_memory_mib"]) for r in rows] == [
        ("d1", "1.0", ""), ("d2", "2.0", ""), ("d3", "3.0", "62"), ("d4", "", "7")]
    assert not path.with_suffix(".tmp").exists()


def test_append_csv_refuses_a_misaligned_file(tmp_path):
    for text in ("a,b\n1,2,3\n", "a,b,c\n1,2\n"):
        path = tmp_path / "bad.csv"
        path.write_text(text)
        with pytest.raises(ValueError, match="bad.csv:2"):
            append_csv(str(path), [{"a": "4", "b": "5", "d": "6"}])
        assert path.read_text() == text


# ------------------------------------------------------------------- the harness (bench/common.py)

def test_time_ms_runs_setup_untimed_and_passes_its_result():
    seen = []

    def setup():
        time.sleep(0.05)
        return len(seen)
    med, p20, p80 = time_ms(seen.append, "cpu", repeat=3, warmup=1, setup=setup)
    assert seen == [0, 1, 2, 3]
    assert p20 <= med <= p80 and med < 40  # the 50 ms set-up is not in the times


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS needs Linux /proc")
def test_peak_mib_excludes_what_fn_keeps():
    mib = 64
    keep = []

    def fn(n=mib * 2**18):
        keep.append(torch.ones(n))  # touched pages: RSS grows by `mib`
    assert peak_mib(fn, "cpu") >= 0.9 * mib
    keep.clear()
    assert peak_mib(fn, "cpu", exclude_bytes=mib * 2**20) < 0.25 * mib
    keep.clear()
    assert peak_mib(lambda state: None, "cpu", setup=lambda: torch.ones(mib * 2**18)) < 0.25 * mib


# --------------------------------------------------------------- the benchmarks' CSV columns

def header(path):
    with open(path, newline="") as fh:
        return next(csv.reader(fh))


def test_ops_finds_each_op_benchmark_by_its_file_and_keeps_the_columns(tmp_path):
    modules = ops.discover()
    assert {op: m.__name__ for op, m in modules.items()} == {
        "gae": "op_gae", "linear_token_logprobs": "op_linear", "ppo_loss": "op_ppo_loss",
        "token_logprobs": "op_token_logprobs", "token_logprobs+entropy": "op_token_logprobs",
        "token_logprobs+truncation": "op_truncation"}
    for module in modules.values():
        assert callable(module.cases) and callable(module.providers) and callable(module.objective)
    out = tmp_path / "ops.csv"
    assert ops.main(["--ops", "gae", "--quick", "--only", "eager", "--csv", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert header(out) == header(RESULTS / "ops.csv")
    assert [(r["op"], r["provider"], r["shape"], r["mode"], r["floor_bytes"]) for r in rows] == [
        ("gae", "eager", "4x64", "fwd", "4352"), ("gae", "eager", "4x64", "bwd", "4352"),
        ("gae", "eager", "4x64", "fwd+bwd", "8704")]


def test_linear_op_benchmark_runs_and_states_its_floor(tmp_path):
    out = tmp_path / "ops.csv"
    assert ops.main(["--ops", "linear_token_logprobs", "--quick", "--only", "fastppo-native",
                     "matmul+native", "--repeat", "1", "--csv", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    # (N + V) H b bytes: N = 64 rows, V = 1000, H = 64, float32
    assert {(r["provider"], r["shape"], r["mode"], r["floor_bytes"]) for r in rows} == {
        (p, "64x64x1000", m, str(k * (64 + 1000) * 64 * 4)) for p in ("fastppo-native", "matmul+native")
        for m, k in (("fwd", 1), ("bwd", 2), ("fwd+bwd", 3))}


def test_bench_cpu_keeps_the_columns(tmp_path):
    out = tmp_path / "cpu.csv"
    bench_cpu.main(["--rows", "16", "--vocab", "50", "--repeat", "1", "--only", "eager",
                    "--entropy", "off", "--csv", str(out)])
    assert header(out) == header(RESULTS / "cpu.csv")
    (row,) = csv.DictReader(out.open())
    assert (row["rows"], row["vocab"], row["provider"], row["entropy"]) == ("16", "50", "eager", "False")


def test_gpu_check_dry_run_plans_every_step_and_checks_their_commands(tmp_path):
    """bench/gpu_check.py without CUDA: the environment step runs on the CPU, every CUDA step is
    planned with a command whose script exists and takes the options passed, nothing fails, and the
    rows go to the CSV asked for."""
    import subprocess

    out = tmp_path / "gpu.csv"
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--dry-run", "--csv", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=BENCH.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = list(csv.DictReader(out.open()))
    assert [r["step"] for r in rows] == ["environment", "install", "kernels", "ops", "grpo"]
    status = {r["step"]: r["status"] for r in rows}
    assert status == {"environment": "ok", "install": "skipped", "kernels": "dry", "ops": "dry",
                      "grpo": "dry"}, rows
    assert "bf16_matmul_tflops" in rows[0]["summary"] and "--vocab 151936" in rows[3]["summary"]
    assert sum(int(r["budget_s"]) for r in rows) <= 600  # the whole check fits 10 minutes
    assert "| kernels | dry |" in proc.stdout
