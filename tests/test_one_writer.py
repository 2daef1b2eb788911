"""One writer per artifact: a second writer of the same asset partition fails at once, naming the first, and
whatever the interleaving, the artifact ends byte-identical to a single run's."""

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from datacomp_assets.core.layout import Asset, Layout
from datacomp_assets.core.locks import ArtifactLocked, exclusive
from datacomp_assets.core.scales import SCALES
from datacomp_assets.pool.assets import curated_source
from resources import PoolSourceResource, PublishedMetadataResource, StorageResource, SyntheticWebResource
from tests.miniature import MINIATURE

ROOT = Path(__file__).resolve().parents[1]

WRITER = """
import sys

import dagster as dg

from datacomp_assets.core.scales import SCALES
from datacomp_assets.pool.assets import curated_source
from resources import PoolSourceResource, PublishedMetadataResource, StorageResource, SyntheticWebResource
from tests.miniature import MINIATURE

if __name__ == "__main__":  # the curated source's writer spawns processes, which import this file again
    SCALES["tiny"] = MINIATURE
    result = dg.materialize([curated_source], partition_key="tiny", raise_on_error=False, resources={
        "storage": StorageResource(root=sys.argv[1]),
        "pool_source": PoolSourceResource(synthetic_web=SyntheticWebResource(),
                                          published=PublishedMetadataResource())})
    sys.exit(0 if result.success else 3)
"""


def resources(root: Path) -> dict:
    return {"storage": StorageResource(root=str(root)),
            "pool_source": PoolSourceResource(synthetic_web=SyntheticWebResource(),
                                              published=PublishedMetadataResource())}


def digests(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
    lock = tmp_path / ".locks" / "subset__basic.lock"
    with exclusive(lock, "subset[tiny|basic]", "run abc123"):
        with pytest.raises(ArtifactLocked, match=r"subset\[tiny\|basic\] is being written by run abc123 \(pid"):
            with exclusive(lock, "subset[tiny|basic]", "run def456"):
                pass
    with exclusive(lock, "subset[tiny|basic]", "run def456"):  # released when the first holder let go
        pass


def test_a_materialization_while_another_writes_fails_at_once_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(SCALES, "tiny", MINIATURE)
    layout = Layout(tmp_path / "data")
    with exclusive(layout.lock_file(Asset.CURATED_SOURCE, "tiny"), "curated_source[tiny]", "run other"):
        result = dg.materialize([curated_source], partition_key="tiny", resources=resources(tmp_path / "data"),
                                raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert "curated_source[tiny] is being written by run other" in failure.event_specific_data.error.to_string()
    assert not layout.curated_source("tiny").exists()


def test_two_concurrent_writers_leave_the_artifact_as_a_single_run_does(tmp_path, monkeypatch):
    monkeypatch.setitem(SCALES, "tiny", MINIATURE)
    assert dg.materialize([curated_source], partition_key="tiny", resources=resources(tmp_path / "single")).success
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    shared = tmp_path / "shared"
    logs = [tmp_path / f"writer_{i}.log" for i in range(2)]
    writers = [subprocess.Popen([sys.executable, str(script), str(shared)], env=env, cwd=ROOT,
                                stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
               for log in logs]
    try:
        outputs = [(w.wait(timeout=300), log.read_text()) for w, log in zip(writers, logs)]
    finally:  # never leave a writer (and the processes it spawned) running after the test
        for w in writers:
            if w.poll() is None:
                os.killpg(w.pid, signal.SIGKILL)
    assert any(rc == 0 for rc, _ in outputs), outputs
    for rc, out in outputs:
        assert rc == 0 or "curated_source[tiny] is being written by run" in out
    single, both = Layout(tmp_path / "single").curated_source("tiny"), Layout(shared).curated_source("tiny")
    assert digests(both) == digests(single) and digests(single)
    assert not [p for p in both.parent.iterdir() if p.name.endswith(".tmp")]


def test_a_second_writer_names_the_first_even_in_the_instant_before_it_has_written_its_name(tmp_path):
    """The holder writes its name just after taking the lock; a writer arriving in between still names it."""
    import fcntl
    import threading

    lock = tmp_path / "subset.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # taken, name not yet written
    late = threading.Timer(0.2, lambda: os.pwrite(fd, b"run abc123", 0))
    late.start()
    try:
        with pytest.raises(ArtifactLocked, match="is being written by run abc123"):
            with exclusive(lock, "subset[tiny|basic]", "run def456"):
                pass
    finally:
        late.join()
        os.close(fd)
