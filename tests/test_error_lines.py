"""A bad disk or a bad home directory gets one line naming the step, the file or the setting, and what to do;
never a traceback (issue 26, rows 13 and 14). Full and read-only disks are small tmpfs mounts, so these tests
need root (CI runs as root) and skip otherwise; a home under a file needs nothing."""

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import numpy as np
import pytest

from datacomp_assets.core import settings
from datacomp_assets.core.layout import Asset

ROOT = Path(__file__).resolve().parents[1]


def run_main(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "datacomp_assets.run", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **env})


@contextmanager
def small_disk(path: Path, size_kb: int = 1024, read_only: bool = False):
    """A tmpfs of `size_kb` at `path` (read-only if asked), unmounted after; skips the test without root."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size_kb}k" + (",ro" if read_only else "")
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def assert_one_error_line(result: subprocess.CompletedProcess, *wanted: str) -> str:
    """The command failed with one `error:` line holding `wanted`, the hint for --traceback, and no traceback."""
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    for text in wanted:
        assert text in errors[0], errors[0]
    assert "--traceback" in result.stderr
    return errors[0]


# ---------------------------------------------------------------- the home directories (row 14)


def test_a_home_that_is_a_file_under_a_file_or_read_only_is_refused_naming_the_variable(tmp_path):
    file = tmp_path / "a_file"
    file.write_text("")
    with pytest.raises(settings.UnusableDirectory, match=f"DATACOMP_HOME={file}: a file, not a directory; "):
        settings.usable_directory(settings.DATACOMP_HOME, file)
    with pytest.raises(settings.UnusableDirectory, match=f"DAGSTER_HOME={file / 'x'}: cannot be created, {file} "
                                                         "is a file; "):
        settings.usable_directory(settings.DAGSTER_HOME, file / "x")
    created = settings.usable_directory(settings.DATACOMP_HOME, tmp_path / "new" / "data")
    assert created.is_dir() and list(created.iterdir()) == []  # the probe leaves nothing behind
    with small_disk(tmp_path / "ro", read_only=True) as ro:
        with pytest.raises(settings.UnusableDirectory, match=f"DATACOMP_HOME={ro}: not writable .*; set "
                                                             "DATACOMP_HOME to a writable directory"):
            settings.usable_directory(settings.DATACOMP_HOME, ro)
        with pytest.raises(settings.UnusableDirectory, match=f"DAGSTER_HOME={ro / 'home'}: cannot be created"):
            settings.usable_directory(settings.DAGSTER_HOME, ro / "home")


def test_a_datacomp_home_under_a_file_is_one_line_naming_it(tmp_path):
    (tmp_path / "a_file").write_text("")
    home = tmp_path / "a_file" / "data"
    result = run_main(env={"DATACOMP_HOME": str(home), "DAGSTER_HOME": str(tmp_path / "dagster")})
    assert_one_error_line(result, f"DATACOMP_HOME={home}", "set DATACOMP_HOME to a writable directory")


def test_a_dagster_home_that_is_a_file_is_one_line_naming_it(tmp_path):
    (tmp_path / "a_file").write_text("")
    result = run_main(env={"DATACOMP_HOME": str(tmp_path / "data"), "DAGSTER_HOME": str(tmp_path / "a_file")})
    assert_one_error_line(result, f"DAGSTER_HOME={tmp_path / 'a_file'}: a file, not a directory")


def test_a_read_only_dagster_home_is_one_line_not_an_sqlalchemy_traceback(tmp_path):
    with small_disk(tmp_path / "ro", read_only=True) as ro:
        result = run_main(env={"DATACOMP_HOME": str(tmp_path / "data"), "DAGSTER_HOME": str(ro)})
    assert_one_error_line(result, f"DAGSTER_HOME={ro}: not writable", "set DAGSTER_HOME to a writable directory")


# ---------------------------------------------------------------- a full disk (row 13)


def test_a_full_disk_during_a_fresh_run_names_the_failed_step_and_the_path(tmp_path):
    with small_disk(tmp_path / "small", size_kb=200) as disk:
        result = run_main("--strategies", "no_filter",
                          env={"DATACOMP_HOME": str(disk / "data"), "DAGSTER_HOME": str(tmp_path / "dagster")})
    shown = result.stdout + result.stderr
    assert result.returncode == 1 and "Traceback" not in shown, shown[-4000:]
    stopped = shown[shown.index("Stopped after"):]
    assert stopped.splitlines()[0].endswith(" [tiny] failed with")  # the step, named
    assert f"the disk is full writing {disk / 'data'}" in stopped and "free there); free space" in stopped
    assert "To resume" in stopped


def test_a_full_dagster_home_is_one_line_not_an_sqlalchemy_traceback(tmp_path):
    with small_disk(tmp_path / "small", size_kb=100) as disk:
        with pytest.raises(OSError), open(disk / "filler", "wb") as filler:  # fill it: sqlite's writes then fail
            filler.write(b"\0" * 200 * 1024)
        result = run_main("--strategies", "no_filter",
                          env={"DATACOMP_HOME": str(tmp_path / "data"), "DAGSTER_HOME": str(disk)})
    assert_one_error_line(result, f"Dagster's instance (DAGSTER_HOME={disk}) cannot be written: database or disk "
                                  "is full; free space there, or set DAGSTER_HOME to a directory with room")
    [log] = (tmp_path / "data" / "tiny" / "logs").glob("run-*.log")
    assert "Traceback" in log.read_text() and "database or disk is full" in log.read_text()  # kept in the log


PARTITIONS = dg.MultiPartitionsDefinition({"scale": dg.StaticPartitionsDefinition(["tiny"]),
                                           "strategy": dg.StaticPartitionsDefinition(["basic"])})
BASIC = dg.MultiPartitionKey({"scale": "tiny", "strategy": "basic"})


def short_write_job(root: Path, rows: int):
    """A job of one asset that writes a subset of `rows` uids (16 bytes each) through the storage resource."""
    from datacomp_assets.core.uids import UID_DTYPE, save_subset
    from resources import StorageResource

    @dg.asset(name=Asset.SUBSET, partitions_def=PARTITIONS)
    def a_subset(context: dg.AssetExecutionContext, storage: StorageResource) -> None:
        with storage.writing(context):
            path = storage.layout.subset_file("tiny", "basic")
            path.parent.mkdir(parents=True, exist_ok=True)
            save_subset(np.zeros(rows, UID_DTYPE), path)

    return dg.Definitions(assets=[a_subset], resources={"storage": StorageResource(root=str(root))})


def test_a_subset_cut_short_by_a_full_disk_names_the_path_and_the_free_space(tmp_path):
    from datacomp_assets.console import error_message

    with small_disk(tmp_path / "small", size_kb=100) as disk:
        defs = short_write_job(disk, rows=18_175)  # 290 KB into 100 KB: numpy's "N requested and M written"
        with dg.instance_for_test() as instance:
            result = defs.resolve_implicit_global_asset_job_def().execute_in_process(
                instance=instance, raise_on_error=False, partition_key=BASIC)
        [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
        message = error_message(failure.event_specific_data)
    assert message.startswith("OSError: [Errno 28] subset[tiny|basic]: the disk is full writing "), message
    assert str(disk / "tiny" / "subset" / "basic") in message
    assert "free there); free space, then materialize again" in message
