"""A user's mistake gets one line that names it, not a traceback; the traceback stays one flag away."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_main(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "datacomp_assets.run", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


def test_an_unknown_scale_is_one_line_naming_the_choices(tmp_path):
    result = run_main("--scale", "huge", env={"DAGSTER_HOME": str(tmp_path)})
    assert result.returncode != 0
    assert "error: unknown scale 'huge'; choose one of tiny, small" in result.stderr
    assert "Traceback" not in result.stderr and "--traceback" in result.stderr
    again = run_main("--scale", "huge", "--traceback", env={"DAGSTER_HOME": str(tmp_path)})
    assert again.returncode != 0 and "Traceback" in again.stderr


def test_a_broken_strategy_file_names_the_file(tmp_path):
    (tmp_path / "mine.toml").write_text("[x\n")
    result = run_main(env={"DAGSTER_HOME": str(tmp_path), "DATACOMP_STRATEGIES": str(tmp_path / "mine.toml")})
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"error: {tmp_path / 'mine.toml'}: not valid TOML" in result.stderr
