"""Lineage records: content hashes, atomic records, and recognising an artifact made from another input."""

import hashlib
import subprocess
from pathlib import Path

import pytest

from datacomp_assets.core.lineage import (
    code_revision, file_sha256, files_sha256, made_from_other_input, read_lineage, write_lineage)


def test_hashes_are_of_contents_in_order(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"x" * 3_000_000)
    b.write_bytes(b"y")
    assert file_sha256(a) == hashlib.sha256(b"x" * 3_000_000).hexdigest()
    expected = hashlib.sha256((file_sha256(a) + file_sha256(b)).encode()).hexdigest()
    assert files_sha256([a, b]) == expected != files_sha256([b, a])
    moved = tmp_path / "moved"
    moved.write_bytes(a.read_bytes())
    assert files_sha256([moved, b]) == expected  # a name is not content


def test_records_round_trip_and_say_when_the_input_changed(tmp_path):
    assert read_lineage(tmp_path) == {} and not made_from_other_input(tmp_path, "subset_sha256", "new")
    write_lineage(tmp_path / "ckpt", {"subset_sha256": "old", "complete": False})
    assert read_lineage(tmp_path / "ckpt") == {"subset_sha256": "old", "complete": False}
    assert made_from_other_input(tmp_path / "ckpt", "subset_sha256", "new")
    assert not made_from_other_input(tmp_path / "ckpt", "subset_sha256", "old")
    assert not list((tmp_path / "ckpt").glob("*.tmp"))  # written to a temporary name, then renamed


def test_a_corrupt_record_names_its_file_and_the_fix(tmp_path):
    (tmp_path / "lineage.json").write_text("{not json")
    with pytest.raises(ValueError, match="lineage.json is not valid JSON.*materialize the asset again"):
        read_lineage(tmp_path)


def test_code_revision_names_the_checked_out_commit():
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    assert code_revision().split("+")[0] == head[:12]
