"""Pool stage: the candidate pool's index (urls + captions), its downloaded shards, and the curated source."""

import contextlib
import time

import dagster as dg
import pyarrow.parquet as pq

from datacomp_assets.world.curated import write_curated_source
from partitions import get_scale, scale_partitions
from datacomp_assets.core.scales import require_synthetic
from resources import (
    DownloaderResource, ExternalSourcesResource, PublishedMetadataResource, StorageResource, SyntheticWebResource)

POOL = "pool"


@dg.asset(partitions_def=scale_partitions, group_name=POOL, code_version="2")
def pool_index(context: dg.AssetExecutionContext, storage: StorageResource, synthetic_web: SyntheticWebResource,
               published: PublishedMetadataResource) -> dg.MaterializeResult:
    """The candidate pool's urls and alt-texts: img2dataset's input.

    At `tiny`, the synthetic web's pages, with each sample's ground truth in a separate file that no filter
    reads. At the paper's scales, the published metadata (Hugging Face Hub or a local mirror)."""
    from datacomp_assets.world.index import write_pool_index
    from datacomp_assets.core.published import PublishedSource, fetch_published_metadata, write_download_index

    scale = get_scale(context.partition_key)
    out = storage.path(scale.name, "pool_index")
    if not scale.synthetic:
        source = PublishedSource(scale.name, mirror_dir=published.published_mirror_dir or None,
                                 include_npz=published.include_npz)
        files = fetch_published_metadata(source, out / "metadata")
        summary = write_download_index(files, out / "index.parquet")
        return dg.MaterializeResult(metadata={
            "path": dg.MetadataValue.path(summary["path"]), "rows": summary["rows"],
            "metadata_files": len(files), "source": source.mirror_dir or source.repo_id})
    summary = write_pool_index(synthetic_web.web_config(), scale.pool_size, synthetic_web.base_url, out)
    return dg.MaterializeResult(metadata={
        "path": dg.MetadataValue.path(str(out / "index.parquet")),
        "ground_truth": dg.MetadataValue.path(summary["ground_truth_path"]),
        "rows": summary["rows"],
        "sha256_seconds": round(summary["sha256_seconds"], 1),
        "web": dg.MetadataValue.json(synthetic_web.web_config().__dict__),
        "ground_truth_kinds": count_table("kind", summary["kind_counts"]),
        "injected_faults": count_table("fault", summary["fault_counts"]),
    })


def count_table(name: str, counts: dict) -> dg.MetadataValue:
    return dg.MetadataValue.md(f"| {name} | samples |\n|---|---|\n"
                               + "\n".join(f"| {k} | {v} |" for k, v in sorted(counts.items())))


@dg.asset(partitions_def=scale_partitions, group_name=POOL, deps=["pool_index"], code_version="2")
def pool_shards(context: dg.AssetExecutionContext, storage: StorageResource, downloader: DownloaderResource,
                synthetic_web: SyntheticWebResource) -> dg.MaterializeResult:
    """img2dataset downloads the index into webdataset shards (`NNNNNNNN.tar/.parquet/_stats.json`).

    Resumable: finished shards are kept, half-written ones are removed and fetched again. Every failure is
    counted by kind; at `tiny` the counts are checked against the faults the web injected."""
    from datacomp_assets.pool.download import check_against_ground_truth, download_shards

    scale = get_scale(context.partition_key)
    index = storage.path(scale.name, "pool_index") / "index.parquet"
    out = storage.path(scale.name, "pool_shards")
    context.log.info(f"downloading {pq.read_metadata(index).num_rows} urls into {out}")
    with synthetic_web.serve() if scale.synthetic else contextlib.nullcontext():
        summary = download_shards(index, out, image_size=scale.image_size, shard_size=scale.shard_size,
                                  processes=downloader.processes, threads=downloader.threads,
                                  timeout=downloader.timeout or scale.download_timeout, retries=downloader.retries)
    context.log.info(f"downloaded {summary.successes}/{summary.count} images")
    metadata = {
        "path": dg.MetadataValue.path(str(out)),
        "shards": summary.shards,
        "urls": summary.count,
        "successes": summary.successes,
        "success_rate": float(summary.success_rate),
        "failed_to_download": summary.failed_to_download,
        "failed_to_resize": summary.failed_to_resize,
        "failures_by_kind": count_table("failure", summary.failures_by_kind),
        "seconds": round(summary.elapsed_s, 1),
        "images_per_second": round(summary.images_per_second or 0.0, 1),
    }
    if scale.synthetic:
        audit = check_against_ground_truth(out, storage.path(scale.name, "pool_index") / "ground_truth.parquet")
        metadata["faults_observed"] = dg.MetadataValue.md(
            "| fault | injected | observed as | observed |\n|---|---|---|---|\n" + "\n".join(
                f"| {k} | {v['injected']} | {v['expected']} | {v['observed']} |"
                for k, v in audit.items() if k != "no_fault"))
        metadata["unexpected_failures"] = audit["no_fault"]["failed"]
    return dg.MaterializeResult(metadata=metadata)


@dg.asset(partitions_def=scale_partitions, group_name=POOL, code_version="1")
def curated_source(context: dg.AssetExecutionContext, storage: StorageResource,
                   synthetic_web: SyntheticWebResource) -> dg.MaterializeResult:
    """A separate source of clean, balanced pairs (tiny only): the scorers' training data."""
    scale = get_scale(context.partition_key)
    require_synthetic(scale, "curated_source")
    out = storage.path(scale.name, "curated_source")
    t0 = time.perf_counter()
    summary = write_curated_source(synthetic_web.web_config(), scale.curated_size, out, scale.image_size,
                                   scale.shard_size)
    return dg.MaterializeResult(metadata={
        "path": dg.MetadataValue.path(str(out)), "samples": summary["samples"], "shards": summary["shards"],
        "seconds": round(time.perf_counter() - t0, 1)})


@dg.asset(partitions_def=scale_partitions, group_name=POOL, code_version="1")
def external_sources(context: dg.AssetExecutionContext, storage: StorageResource, downloader: DownloaderResource,
                     synthetic_web: SyntheticWebResource, external: ExternalSourcesResource) -> dg.MaterializeResult:
    """Bring-your-own-data sources beside the pool, as webdataset shards under `external_sources/<name>/`.

    At `tiny`: a second, noisier synthetic source (half its captions mismatched); the curated source is
    the other. At every scale: each url list named in the `external` resource, downloaded by img2dataset."""
    from datacomp_assets.pool.download import download_shards
    from datacomp_assets.pool.external import ExternalSource, prepare_external_index, write_noisy_source

    scale = get_scale(context.partition_key)
    root = storage.path(scale.name, "external_sources")
    rows = []
    if scale.synthetic:
        noisy = write_noisy_source(synthetic_web.web_config(), scale.curated_size, root / "noisy", scale.image_size,
                                   scale.shard_size)
        rows.append(("noisy", noisy["samples"], noisy["samples"], str(root / "noisy")))
    for name, url_list in external.url_lists.items():
        source = ExternalSource(name, url_list, url_col=external.url_col, caption_col=external.caption_col)
        index = prepare_external_index(source, root / name / "index.parquet")
        summary = download_shards(index["path"], root / name / "shards", image_size=scale.image_size,
                                  shard_size=scale.shard_size, processes=downloader.processes,
                                  threads=downloader.threads, timeout=downloader.timeout or scale.download_timeout,
                                  retries=downloader.retries)
        rows.append((name, index["rows"], summary.successes, str(root / name / "shards")))
    return dg.MaterializeResult(metadata={
        "path": dg.MetadataValue.path(str(root)), "sources": len(rows),
        "samples": sum(r[2] for r in rows),
        "sources_table": dg.MetadataValue.md("| source | urls | samples | path |\n|---|---|---|---|\n"
                                             + "\n".join(f"| {n} | {u} | {k} | {p} |" for n, u, k, p in rows)),
    })


@dg.asset_check(asset=pool_shards, description="At tiny: every download failure is a fault the web injected")
def pool_shards_match_injected_faults(context: dg.AssetCheckExecutionContext,
                                      storage: StorageResource) -> dg.AssetCheckResult:
    from datacomp_assets.pool.download import check_against_ground_truth

    scale = get_scale(context.partition_key)
    if not scale.synthetic:
        return dg.AssetCheckResult(passed=True, metadata={"note": "no ground truth at the paper's scales"})
    audit = check_against_ground_truth(storage.path(scale.name, "pool_shards"),
                                       storage.path(scale.name, "pool_index") / "ground_truth.parquet")
    mismatched = {k: v for k, v in audit.items() if k != "no_fault" and v["injected"] != v["observed"]}
    return dg.AssetCheckResult(
        passed=not mismatched and audit["no_fault"]["failed"] == 0,
        metadata={"unexpected_failures": audit["no_fault"]["failed"],
                  "faults_not_observed_as_expected": dg.MetadataValue.json(mismatched)})
