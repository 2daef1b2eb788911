"""benchmarks/gpu.py, the prepared GPU check, on a machine without CUDA: what it says there, and the parts that keep
one section's failure from stopping the others. (Its sections themselves run on a CUDA machine, or on the CPU with
`--force-cpu-dry-run`: minutes, too long for the suite.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO_ROOT / "benchmarks"


@pytest.fixture(scope="module")
def gpu():
    sys.path.insert(0, str(BENCHMARKS))  # gpu.py imports process_tree from beside it, as a script does
    try:
        import gpu as module
        yield module
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_without_cuda_it_says_so_in_one_json_object_and_exits_0():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, even on a machine that has one
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "gpu.py")], capture_output=True, text=True, env=env,
                          cwd=REPO_ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    report = json.loads(lines[0])
    assert report["cuda"] is False and report["benchmark"] == "gpu"
    assert "sections" not in report  # nothing was measured
    machine = report["machine"]
    assert machine["torch"] and machine["cuda_available"] is False and "gpu_count" not in machine
    assert machine["open_clip_train"]["importable"] is True
    assert "--force-cpu-dry-run" in report["note"]


def test_a_child_that_dies_or_hangs_is_reported_not_fatal(gpu):
    assert gpu.in_child(abs, -2, timeout=60) == 2
    with pytest.raises(RuntimeError, match=r"died \(exit code 3\)"):
        gpu.in_child(os._exit, 3, timeout=60)  # as a segfault would: no result, no traceback
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="ran past its 2 s and was killed"):
        gpu.in_child(time.sleep, 60, timeout=2)
    assert time.monotonic() - start < 30


def test_a_failed_section_is_recorded_and_the_next_still_runs(gpu, tmp_path):
    report = {"sections": {}}
    run = gpu.Run(report, budget=600, json_out=tmp_path / "gpu.json")

    def broken() -> dict:
        raise ValueError("no faiss here")

    assert run.section("data", broken) is None
    assert run.section("kmeans", lambda: {"speedup": 2.0}) == {"ok": True, "speedup": 2.0,
                                                                "wall_seconds": report["sections"]["kmeans"]
                                                                ["wall_seconds"]}
    assert run.section("training", lambda: {"never": "run"}, "data") is None
    written = json.loads((tmp_path / "gpu.json").read_text())  # after every section, for a run cut short
    assert written["sections"]["data"] == {"ok": False, "error": "ValueError: no faiss here",
                                           "wall_seconds": written["sections"]["data"]["wall_seconds"]}
    assert written["sections"]["kmeans"]["ok"] is True
    assert "needs the data section" in written["sections"]["training"]["skipped"]


def test_metric_differences_name_the_largest_and_every_mismatch(gpu):
    cpu = {("cifar10", "acc1"): 0.5, ("cifar10", "acc5"): None, ("fmow", "worst_region_acc"): 0.2}
    cuda = {("cifar10", "acc1"): 0.25, ("cifar10", "acc5"): 0.1, ("fmow", "worst_region_acc"): 0.2,
            ("fmow", "extra"): 1.0}
    assert gpu.largest_difference(cpu, cuda) == {"max_metric_difference": 0.25, "at": "cifar10/acc1", "compared": 3,
                                                 "mismatched": ["fmow/extra", "cifar10/acc5"]}
    rows = [{"key": "fmow", "metrics": {"acc1": 1, "region": float("nan"), "acc5": None, "flag": True, "name": "x"}}]
    assert gpu.numeric_metrics(rows) == {("fmow", "acc1"): 1.0, ("fmow", "region"): None, ("fmow", "acc5"): None}


def test_kernels_benchmark_prints_one_json_object_with_each_kernel_against_its_bare_computation(tmp_path):
    argv = [sys.executable, str(BENCHMARKS / "kernels.py"), "--rows", "2000", "--dim", "32", "--threads", "1",
            "--negclip-batch-size", "400", "--negclip-batches", "2", "--normsim-targets", "50", "--clusters", "8",
            "--kmeans-sample", "500", "--niter", "3", "--out", str(tmp_path / "pool")]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO_ROOT, timeout=240)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)  # stdout is the JSON object alone
    assert report["benchmark"] == "kernels" and report["rows"] == 2000 and report["target_ratio"] == 1.5
    assert set(report["kernels"]) == {"negclip", "normsim", "semdedup", "kmeans"}
    for row in report["kernels"].values():
        for side in ("ours", "bare"):
            assert row[side]["seconds"] >= 0 and row[side]["peak_rss_mb"] > 0
        assert row["ratio"] >= 0 and isinstance(row["within_target"], bool)
    agreement = {name: row["agreement"] for name, row in report["kernels"].items()}
    assert agreement["negclip"]["max_abs_difference"] < 1e-4 and agreement["normsim"]["max_abs_difference"] < 1e-5
    assert agreement["semdedup"]["kept_differently"] == 0 and agreement["kmeans"]["assignments_equal"] == 1.0
