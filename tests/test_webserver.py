"""`dagster-webserver` loads the workspace and serves the asset graph with its partitions on 127.0.0.1."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from datacomp_assets.world.web_server import free_port

ROOT = Path(__file__).resolve().parents[1]
QUERY = "{ assetNodes { assetKey { path } partitionKeysByDimension { name partitionKeys } } }"


def graphql(port: int, query: str) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", data=json.dumps({"query": query}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_webserver_serves_graph_and_partitions(tmp_path):
    port = free_port()
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path)}
    webserver = Path(sys.executable).with_name("dagster-webserver")
    proc = subprocess.Popen([str(webserver), "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                nodes = graphql(port, QUERY)["data"]["assetNodes"]
                if nodes:
                    break
            except OSError:
                pass
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "the webserver did not come up within 120 s"
            time.sleep(1)
        by_key = {"/".join(n["assetKey"]["path"]): n for n in nodes}
        assert {"pool_index", "pool_shards", "pool_metadata", "subset", "checkpoint", "eval_results",
                "leaderboard"} <= set(by_key)
        dims = {d["name"]: d["partitionKeys"] for d in by_key["subset"]["partitionKeysByDimension"]}
        assert dims["scale"] == ["tiny", "small", "medium", "large", "xlarge"]
        assert {"no_filter", "basic", "clip_score_l14_30pct"} <= set(dims["strategy"])
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
