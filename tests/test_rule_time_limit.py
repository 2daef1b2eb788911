"""A strategy's rule has a time limit (issue 26, row 3): a runaway rule is stopped with one line naming the
strategy, how long it ran, its limit and the setting to raise."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datacomp_assets.filtering.time_limit import MINIMUM_SECONDS, rule_time_limit

ROOT = Path(__file__).resolve().parents[1]

# Run in a child process: on code without a time limit the rule runs for days, and the child is killed at the
# timeout instead of the test suite hanging.
SELECT = """
import sys
from datacomp_assets.filtering.selection import select_uids
try:
    print(len(select_uids(sys.argv[1], sys.argv[2])))
except ValueError as err:
    print(err)
    sys.exit(3)
"""


@pytest.fixture
def small_pool(tmp_path):
    rng = np.random.default_rng(0)
    metadata = tmp_path / "pool_metadata"
    metadata.mkdir()
    for i in range(2):
        uids = [bytes(rng.integers(0, 256, 16, dtype=np.uint8)).hex() for _ in range(50)]
        pq.write_table(pa.table({"uid": uids, "clip_b32_similarity_score": rng.random(50).astype(np.float32)}),
                       metadata / f"{i:08d}.parquet")
    strategies = tmp_path / "mine.toml"
    strategies.write_text('[runaway]\nwhere = "(SELECT count(*) FROM range(10000000000000)) > 0"\n\n'
                          '[quick]\nwhere = "clip_b32_similarity_score > 0.5"\n')
    return metadata, strategies


def select_in_a_child(metadata: Path, strategies: Path, strategy: str, limit: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DATACOMP_STRATEGIES": str(strategies), "DATACOMP_RULE_TIME_LIMIT_S": limit,
           "PYTHONPATH": str(ROOT)}
    try:
        return subprocess.run([sys.executable, "-c", SELECT, str(metadata), strategy], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"strategy {strategy!r} still ran after 120 s with DATACOMP_RULE_TIME_LIMIT_S={limit}")


def test_a_runaway_rule_is_stopped_naming_the_strategy_its_limit_and_the_setting(small_pool):
    metadata, strategies = small_pool
    done = select_in_a_child(metadata, strategies, "runaway", limit="1")
    assert done.returncode == 3, done.stderr[-3000:]
    (line,) = done.stdout.splitlines()
    assert line.startswith(f"{metadata}: strategy 'runaway' ran ")
    assert "s and was stopped at its time limit of 1 s (DATACOMP_RULE_TIME_LIMIT_S=1)" in line
    assert "set DATACOMP_RULE_TIME_LIMIT_S to more seconds (0: no limit)" in line


def test_a_rule_within_its_limit_is_not_disturbed(small_pool):
    metadata, strategies = small_pool
    done = select_in_a_child(metadata, strategies, "quick", limit="30")
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    expected = sum((pq.read_table(p)["clip_b32_similarity_score"].to_numpy() > 0.5).sum()
                   for p in metadata.glob("*.parquet"))
    assert done.stdout.split() == [str(expected)]


def test_the_default_limit_grows_with_the_pool_and_the_setting_overrides_it(monkeypatch):
    monkeypatch.delenv("DATACOMP_RULE_TIME_LIMIT_S", raising=False)
    assert rule_time_limit(20_000)[0] == MINIMUM_SECONDS  # tiny
    seconds, origin = rule_time_limit(12_800_000_000)  # xlarge: 1000x small
    assert seconds == 1000 * rule_time_limit(12_800_000)[0] > 100 * 3600
    assert "default" in origin and "12,800,000,000 pool rows" in origin
    monkeypatch.setenv("DATACOMP_RULE_TIME_LIMIT_S", "0")
    assert rule_time_limit(20_000) == (None, "DATACOMP_RULE_TIME_LIMIT_S=0")
    monkeypatch.setenv("DATACOMP_RULE_TIME_LIMIT_S", "an hour")
    with pytest.raises(ValueError, match="DATACOMP_RULE_TIME_LIMIT_S='an hour': not a number of seconds"):
        rule_time_limit(20_000)
