"""The house keeps its shape (docs/architecture.md): floors that import only downward, no stage importing another,
no cycle, no private name across modules, every asset name and artifact path in the layout, every environment
variable in the settings module and its table."""

import json
import re
import subprocess
import sys
from pathlib import Path

from datacomp_assets.core import settings
from datacomp_assets.core.layout import Asset

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("datacomp_assets", "resources", "partitions")


def project_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_import_linter_contracts_are_kept():
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_import_graph_has_no_cycle_upward_cross_stage_or_private_import():
    out = subprocess.run([sys.executable, str(ROOT / "bin" / "import-graph")], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    graph = json.loads(out)
    assert graph["cycle_members"] == [] and graph["upward"] == [] and graph["cross_stage"] == []
    assert graph["private"] == []


def test_asset_names_appear_only_in_the_layout():
    names = [v for k, v in vars(Asset).items() if not k.startswith("_")]
    quoted = re.compile(r"""["'](%s)["']""" % "|".join(map(re.escape, names)))
    layout = ROOT / "datacomp_assets" / "core" / "layout.py"
    hits = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}" for p in project_files() if p != layout
            for n, line in enumerate(p.read_text().splitlines(), 1) if quoted.search(line)]
    assert hits == [], "spell asset names and paths through core/layout.py:\n" + "\n".join(hits)


def test_environment_is_read_only_by_the_settings_module():
    allowed = ROOT / "datacomp_assets" / "core" / "settings.py"
    reads = re.compile(r"os\.environ|os\.getenv|getenv\(")
    hits = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}" for p in project_files() if p != allowed
            for n, line in enumerate(p.read_text().splitlines(), 1) if reads.search(line)]
    assert hits == [], "read environment variables through core/settings.py:\n" + "\n".join(hits)


def test_every_variable_is_in_the_configuration_table_with_its_default():
    table = (ROOT / "docs" / "configuration.md").read_text()
    rows = {line.split("|")[1].strip(" `"): line for line in table.splitlines() if line.startswith("| `")}
    for variable in settings.VARIABLES:
        assert variable.name in rows, f"docs/configuration.md lacks {variable.name}"
        assert f"`{variable.default}`" in rows[variable.name] or (
            not variable.default and "(empty)" in rows[variable.name]), f"{variable.name}: default not stated"


def test_plain_python_modules_of_the_stages_do_not_import_dagster():
    """A stage is one room: thin asset definitions in `assets.py`, beside modules that do the work without
    Dagster (so they can be called, tested and benchmarked on their own)."""
    dagster = re.compile(r"^\s*(import dagster|from dagster)", re.M)
    stages = ("pool", "metadata", "filtering", "training", "evaluation", "leaderboard")
    hits = [str(p.relative_to(ROOT)) for stage in stages for p in (ROOT / "datacomp_assets" / stage).glob("*.py")
            if p.name != "assets.py" and dagster.search(p.read_text())]
    assert hits == []
