"""The UI in a real browser: `dagster dev` on 127.0.0.1 serving the project's definitions at the miniature `tiny`
configuration (tests/ui_location.py), runs launched through its GraphQL API, and headless Chromium screenshots of
the asset graph, a partitioned asset's page and the leaderboard's metadata.

The screenshots go to the test's tmp dir; with DATACOMP_UPDATE_SCREENSHOTS=1 also to docs/screenshots/ (the
README's pictures): `DATACOMP_UPDATE_SCREENSHOTS=1 .venv/bin/python -m pytest -q tests/test_browser.py`.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from datacomp_assets.core.uids import uids_to_array
from datacomp_assets.world.eval_suite import TASKS
from datacomp_assets.world.web_server import free_port
from tests.miniature import MINIATURE

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
# The machine's network is closed: nothing in Chromium may try to reach out (updates, sync, QUIC probes).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1600, "height": 1000}
SCREENSHOTS = ROOT / "docs" / "screenshots"
LOCATION = "datacomp"
STARTUP_S, RUN_S, PAGE_MS = 180, 240, 60_000

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no {CHROMIUM}: run bin/setup (it installs Chromium)")


class DagsterUI:
    """A `dagster dev` process group on 127.0.0.1 and its GraphQL endpoint."""

    def __init__(self, tmp: Path):
        self.tmp, self.port = tmp, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.home, self.data = tmp / "dagster_home", tmp / "data"
        self.home.mkdir()
        # The project's instance settings (queued runs, telemetry off), as bin/setup installs them for bin/ui.
        shutil.copy(ROOT / "instance" / "dagster.yaml", self.home / "dagster.yaml")
        workspace = tmp / "workspace.yaml"
        workspace.write_text(json.dumps({"load_from": [{"python_module": {
            "module_name": "tests.ui_location", "location_name": LOCATION, "working_directory": str(ROOT)}}]}))
        env = {**os.environ, "DAGSTER_HOME": str(self.home), "DATACOMP_HOME": str(self.data)}
        self.log = (tmp / "dagster_dev.log").open("w")
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "dagster"), "dev", "-h", "127.0.0.1", "-p", str(self.port),
             "-w", str(workspace)],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def log_tail(self, n: int = 4000) -> str:
        self.log.flush()
        return (self.tmp / "dagster_dev.log").read_text(errors="replace")[-n:]

    def graphql(self, query: str, **variables) -> dict:
        request = urllib.request.Request(f"{self.url}/graphql", headers={"Content-Type": "application/json"},
                                         data=json.dumps({"query": query, "variables": variables}).encode())
        with urllib.request.urlopen(request, timeout=60) as response:
            body = json.loads(response.read())
        assert "errors" not in body, body["errors"]
        return body["data"]

    def wait_until_loaded(self) -> None:
        """Until the webserver answers and the code location has loaded (or failed to: then say why)."""
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"dagster dev exited ({self.proc.returncode}):\n{self.log_tail()}"
            # The port was free when picked; if something took it since, the webserver fails while `dagster dev`
            # lives on, and whatever holds the port would answer below.
            assert "address already in use" not in self.log_tail(), f"port {self.port} taken:\n{self.log_tail()}"
            try:
                entries = self.graphql("""{ workspaceOrError { ... on Workspace { locationEntries {
                    name loadStatus locationOrLoadError { __typename ... on PythonError { message } } } } } }""")
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(1)
                continue
            entry = next((e for e in entries["workspaceOrError"]["locationEntries"] if e["name"] == LOCATION), None)
            if entry and entry["loadStatus"] == "LOADED":
                loaded = entry["locationOrLoadError"]
                assert loaded["__typename"] == "RepositoryLocation", f"the code location failed to load: {loaded}"
                return
            time.sleep(1)
        pytest.fail(f"dagster dev did not load {LOCATION!r} in {STARTUP_S} s:\n{self.log_tail()}")

    def materialize(self, asset: str, partition: str) -> str:
        """Launch a run of one asset partition, as the UI's Materialize button does, and wait for it to succeed."""
        launched = self.graphql("""mutation Launch($params: ExecutionParams!) { launchRun(executionParams: $params) {
            __typename ... on LaunchRunSuccess { run { runId } } ... on Error { message } } }""", params={
            "selector": {"repositoryLocationName": LOCATION, "repositoryName": "__repository__",
                         "jobName": "__ASSET_JOB", "assetSelection": [{"path": [asset]}]},
            "executionMetadata": {"tags": [{"key": "dagster/partition", "value": partition}]}})["launchRun"]
        assert launched["__typename"] == "LaunchRunSuccess", launched
        run_id = launched["run"]["runId"]
        deadline = time.monotonic() + RUN_S
        status = None
        while time.monotonic() < deadline:
            status = self.graphql("query Run($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }",
                                  id=run_id)["runOrError"]["status"]
            if status == "SUCCESS":
                return run_id
            if status in ("FAILURE", "CANCELED"):
                break
            time.sleep(1)
        events = self.graphql("""query Logs($id: ID!) { logsForRun(runId: $id) { ... on EventConnection { events {
            __typename ... on MessageEvent { message } ... on ErrorEvent { error { message stack } } } } } }""",
                              id=run_id)["logsForRun"]["events"]
        errors = [e for e in events if e.get("error")] or events[-10:]
        pytest.fail(f"run {run_id} of {asset}[{partition}] ended {status}:\n" + json.dumps(errors, indent=1)[-6000:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def prepare_scores(data: Path, strategies: dict[str, tuple[float, float]]) -> None:
    """Subsets and per-seed score files for the leaderboard to rank, written where the stages write them.

    Training a CLIP per strategy would take this test past its time budget, so these inputs are prepared here
    instead: each subset holds real uids of the pool_index the test materialized (the given fraction of them),
    and each score file has one line per task of the tiny suite in the reference's `eval_results.jsonl` format,
    at the given average with a per-seed and per-task offset. What the leaderboard does with them (reading,
    averaging over seeds, ranking, the noise test, the markdown and the metadata) is the real asset's code, run
    by Dagster in a run launched like the UI's Materialize button."""
    tiny = data / "tiny"
    uids = pq.read_table(tiny / "pool_index" / "index.parquet", columns=["uid"])["uid"].to_pylist()
    for strategy, (fraction, average) in strategies.items():
        out = tiny / "subset" / strategy
        out.mkdir(parents=True)
        np.save(out / "subset.npy", uids_to_array(uids[: round(fraction * len(uids))]))
        for seed in MINIATURE.seeds:
            lines = []
            for t, task in enumerate(TASKS.values()):
                score = min(1.0, max(0.0, average + 0.004 * (seed - 0.5) + 0.02 * ((t % 5) - 2)))
                lines.append({"key": task.key, "dataset": task.key, "group": task.group,
                              "metrics": {"main_metric": score, task.main_metric: score}})
            results = tiny / "eval_results" / strategy / f"seed_{seed}" / "eval_results.jsonl"
            results.parent.mkdir(parents=True)
            results.write_text("".join(json.dumps(line) + "\n" for line in lines))


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    server = DagsterUI(tmp_path_factory.mktemp("ui"))
    try:
        server.wait_until_loaded()
        server.graphql("mutation { setNuxSeen }")  # no "Join the community" dialog over the screenshots
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def materialized(ui):
    """pool_index[tiny] materialized for real, then the leaderboard[tiny] on scores prepared beside it."""
    ui.materialize("pool_index", "tiny")
    assert pq.read_table(ui.data / "tiny" / "pool_index" / "index.parquet").num_rows == MINIATURE.pool_size
    # (fraction of the pool kept, average score): the paper's ordering, clip_score_l14_30pct > basic > no_filter.
    prepare_scores(ui.data, {"no_filter": (1.0, 0.26), "basic": (0.55, 0.30), "clip_score_l14_30pct": (0.3, 0.36)})
    ui.materialize("leaderboard", "tiny")
    assert "| clip_score_l14_30pct |" in (ui.data / "tiny" / "leaderboard" / "leaderboard.md").read_text()
    return ui


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser, materialized):
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.set_default_timeout(PAGE_MS)
    yield page
    context.close()


def visible(page, text: str, exact: bool = False):
    """Wait until `text` shows on the page (the UI is a single-page app that renders after its queries)."""
    locator = page.get_by_text(text, exact=exact).first
    locator.wait_for(state="visible")
    return locator


def screenshot(page, name: str, tmp_path: Path) -> Path:
    page.wait_for_timeout(1500)  # let the last layout and fade-in settle
    path = tmp_path / f"{name}.png"
    page.screenshot(path=path)
    if os.environ.get("DATACOMP_UPDATE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, SCREENSHOTS / path.name)
    return path


def test_asset_graph(page, materialized, tmp_path):
    page.goto(f"{materialized.url}/asset-groups")
    visible(page, "Global asset lineage")
    visible(page, "leaderboard")
    page.get_by_text("Hide navigation").click()
    page.keyboard.press("Alt+KeyE")  # the graph's own shortcut: expand all groups
    visible(page, "pool_index", exact=True)
    page.goto(page.url)  # load it again with every group expanded (now in the URL): the graph is fitted to the view
    for asset in ("pool_index", "pool_shards", "pool_metadata", "subset", "checkpoint", "eval_results", "leaderboard"):
        visible(page, asset, exact=True)
    screenshot(page, "asset_graph", tmp_path)


def test_partitioned_asset_page(page, materialized, tmp_path):
    page.goto(f"{materialized.url}/assets/pool_index?view=partitions&partition=tiny")
    visible(page, "Materialized (1)")  # tiny, and none of the paper's four scales
    visible(page, "Missing (4)")
    for text in ("tiny", "small", "xlarge"):
        visible(page, text, exact=True)
    visible(page, str(MINIATURE.pool_size), exact=True)  # the `rows` metadata of tiny's materialization
    visible(page, str(materialized.data / "tiny" / "pool_index" / "index.parquet"))
    screenshot(page, "partitioned_asset", tmp_path)


def test_leaderboard_metadata(page, materialized, tmp_path):
    page.goto(f"{materialized.url}/assets/leaderboard?view=partitions&partition=tiny")
    visible(page, "best_strategy")
    visible(page, "clip_score_l14_30pct", exact=True)
    page.get_by_text("[Show Markdown]").first.click()  # the `leaderboard` metadata entry: the table itself
    dialog = page.get_by_role("dialog")
    dialog.get_by_text("The paper's ordering").wait_for()
    text = dialog.inner_text()
    rows = [line.split("\t") for line in text.splitlines() if line.split("\t")[0] in ("1", "2", "3")]
    assert [row[1] for row in rows] == ["clip_score_l14_30pct", "basic", "no_filter"], text
    sizes = {row[1]: int(row[3]) for row in rows}  # dataset_size: the subsets' lengths
    assert sizes == {"no_filter": 400, "basic": 220, "clip_score_l14_30pct": 120}, text
    assert "clip_score_l14_30pct > basic" in text and "basic > no_filter" in text
    screenshot(page, "leaderboard", tmp_path)
