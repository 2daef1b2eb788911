"""Bring-your-own-data sources materialize beside the pool: the tiny noisy source and a url list."""

import json
from dataclasses import replace

import dagster as dg
import numpy as np

from datacomp_assets.core.scales import SCALES
from datacomp_assets.pool.assets import external_sources
from datacomp_assets.world.web import WebConfig, sample
from datacomp_assets.world.web_server import SyntheticWebServer, image_url
from resources import (
    DownloaderResource, EngineResource, ExternalSourcesResource, PoolSourceResource, PublishedMetadataResource,
    StorageResource, SyntheticWebResource)


def test_external_sources_at_tiny(tmp_path, monkeypatch):
    monkeypatch.setitem(SCALES, "tiny", replace(SCALES["tiny"], curated_size=60, shard_size=50))
    clean = WebConfig(faults={})
    with SyntheticWebServer(clean) as server:
        url_list = tmp_path / "mine.csv"
        rows = [(image_url(server.base_url, i, "byod"), sample(i, clean, namespace="byod").text) for i in range(30)]
        url_list.write_text("url,caption\n" + "".join(f'{u},"{t}"\n' for u, t in rows))
        result = dg.materialize([external_sources], partition_key="tiny", resources={
            "storage": StorageResource(root=str(tmp_path / "data")),
            "downloader": DownloaderResource(processes=1, threads=4),
            "engine": EngineResource(),
            "pool_source": PoolSourceResource(synthetic_web=SyntheticWebResource(),
                                              published=PublishedMetadataResource()),
            "external": ExternalSourcesResource(url_lists={"mine": str(url_list)})})
    assert result.success
    root = tmp_path / "data" / "tiny" / "external_sources"
    assert len(list((root / "noisy").glob("*.tar"))) == 2
    stats = [json.loads(p.read_text()) for p in (root / "mine" / "shards").glob("*_stats.json")]
    assert sum(s["successes"] for s in stats) == 30
    # Each synthetic shard has img2dataset's table beside it, so a mixture can draw on the source.
    import pyarrow.parquet as pq
    from datacomp_assets.core.shards import iter_webdataset
    from datacomp_assets.core.uids import uids_to_array
    from datacomp_assets.filtering.selection import PoolQuery, connect_pool
    noisy = root / "noisy"
    in_tars = [json.loads(f["json"])["uid"] for t in sorted(noisy.glob("*.tar")) for _, f in iter_webdataset(t)]
    in_tables = [u for t in sorted(noisy.glob("*.parquet")) for u in pq.read_table(t).column("uid").to_pylist()]
    assert in_tables == in_tars and len(in_tars) == 60
    con = connect_pool(noisy, readable=[noisy])
    mixed = PoolQuery(con, "test", external_dirs={"noisy": noisy})._component("source:noisy", 2)
    assert sorted(mixed.tolist()) == np.repeat(uids_to_array(in_tars), 2).tolist()
    # Where a strategy and the training read each source's shards: a url list's are beside its index.
    from datacomp_assets.core.layout import Layout
    assert Layout(tmp_path / "data").external_source_dirs("tiny") == {"mine": root / "mine" / "shards",
                                                                      "noisy": root / "noisy"}
    meta = result.asset_materializations_for_node("external_sources")[0].metadata
    assert meta["sources"].value == 2 and meta["samples"].value == 90
