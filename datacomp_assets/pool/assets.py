"""Pool stage: the candidate pool's index (urls + captions), its downloaded shards, and the curated source."""

import time

import dagster as dg
import pyarrow.parquet as pq

from datacomp_assets.core.layout import Asset, Group
from datacomp_assets.core.progress import Progress
from partitions import get_scale, scale_partitions
from resources import (
    DownloaderResource, EngineResource, ExternalSourcesResource, PoolSourceResource, StorageResource)
from resources.pool_source import count_table


@dg.asset(partitions_def=scale_partitions, group_name=Group.POOL, code_version="2")
def pool_index(context: dg.AssetExecutionContext, storage: StorageResource,
               pool_source: PoolSourceResource) -> dg.MaterializeResult:
    """The candidate pool's urls and alt-texts: img2dataset's input.

    At `tiny`, the synthetic web's pages, with each sample's ground truth in a separate file that no filter
    reads. At the paper's scales, the published metadata (Hugging Face Hub or a local mirror)."""
    with storage.writing(context):
        scale = get_scale(context.partition_key)
        return dg.MaterializeResult(metadata=pool_source.for_scale(scale, storage.layout).write_index())


@dg.asset(partitions_def=scale_partitions, group_name=Group.POOL, deps=[Asset.POOL_INDEX], code_version="2")
def pool_shards(context: dg.AssetExecutionContext, storage: StorageResource, downloader: DownloaderResource,
                pool_source: PoolSourceResource, engine: EngineResource) -> dg.MaterializeResult:
    """img2dataset downloads the index into webdataset shards (`NNNNNNNN.tar/.parquet/_stats.json`).

    Resumable: finished shards are kept, half-written ones are removed and fetched again. Materializing again
    also retries the samples of finished shards that failed for a reason that may pass (timeouts, HTTP 5xx,
    dropped connections) and merges those that come back into their shards; successes and permanent failures
    (404, undecodable bytes, hash mismatches) are kept as they are. Every failure is counted by kind; where the
    pool has ground truth (`tiny`), the counts are checked against the faults the web injected. On a Ray cluster
    (the `engine` resource), img2dataset's Ray distributor fetches the shards."""
    from datacomp_assets.pool.download import check_against_ground_truth, download_shards, remove_damaged_shards

    with storage.writing(context):
        scale, layout = get_scale(context.partition_key), storage.layout
        source = pool_source.for_scale(scale, layout)
        index, out = layout.pool_index_file(scale.name), layout.pool_shards(scale.name)
        for tar, problem in remove_damaged_shards(out).items():  # img2dataset would skip them as finished
            context.log.warning(f"{tar} {problem}: removed, to be fetched again")
        urls = pq.read_metadata(index).num_rows
        context.log.info(f"downloading {urls} urls into {out} on {engine.engine().describe()}")
        with source.serving():
            summary = download_shards(index, out, image_size=scale.image_size, shard_size=scale.shard_size,
                                      processes=downloader.processes, threads=downloader.threads,
                                      timeout=downloader.timeout or scale.download_timeout, retries=downloader.retries,
                                      progress=Progress(context.log.info, "download", -(-urls // scale.shard_size),
                                                        "shards"), engine=engine.engine(), log=context.log.warning,
                                      retry_failed_samples=downloader.retry_failed)
        context.log.info(f"downloaded {summary.successes}/{summary.count} images")
        if summary.retry.retried:
            context.log.info(f"{out}: {summary.retry.line()}")
        metadata = {
            "path": dg.MetadataValue.path(str(out)),
            "shards": summary.shards,
            "urls": summary.count,
            "successes": summary.successes,
            "success_rate": float(summary.success_rate),
            "failed_to_download": summary.failed_to_download,
            "failed_to_resize": summary.failed_to_resize,
            "failures_by_kind": count_table("failure", summary.failures_by_kind),
            # this materialization's second try at the earlier shards' retryable failures
            "retried": summary.retry.retried,
            "recovered": summary.retry.recovered,
            "still_failed": summary.retry.still_failed,
            "retried_by_kind": count_table("failure", summary.retry.retried_by_kind),
            "still_failed_by_kind": count_table("failure", summary.retry.still_failed_by_kind),
            "seconds": round(summary.elapsed_s, 1),
            "images_per_second": round(summary.images_per_second or 0.0, 1),
        }
        truth = source.ground_truth()
        if truth is not None:
            audit = check_against_ground_truth(out, truth)
            metadata["faults_observed"] = dg.MetadataValue.md(
                "| fault | injected | observed as | observed |\n|---|---|---|---|\n" + "\n".join(
                    f"| {k} | {v['injected']} | {v['expected']} | {v['observed']} |"
                    for k, v in audit.items() if k != "no_fault" and v["injected"]))
            metadata["unexpected_failures"] = audit["no_fault"]["failed"]
        return dg.MaterializeResult(metadata=metadata)


@dg.asset(partitions_def=scale_partitions, group_name=Group.POOL, code_version="2")
def curated_source(context: dg.AssetExecutionContext, storage: StorageResource,
                   pool_source: PoolSourceResource) -> dg.MaterializeResult:
    """A separate source of clean, balanced pairs (the miniature only): the scorers' and the DFN's training data."""
    with storage.writing(context):
        scale, layout = get_scale(context.partition_key), storage.layout
        out = layout.curated_source(scale.name)
        t0 = time.perf_counter()
        summary = pool_source.for_scale(scale, layout).write_curated_source(out)
        return dg.MaterializeResult(metadata={
            "path": dg.MetadataValue.path(str(out)), "samples": summary["samples"], "shards": summary["shards"],
            "seconds": round(time.perf_counter() - t0, 1)})


NOISY_SOURCE = "noisy"  # the miniature's bring-your-own-data stand-in, beside the user's sources


@dg.asset(partitions_def=scale_partitions, group_name=Group.POOL, code_version="2")
def external_sources(context: dg.AssetExecutionContext, storage: StorageResource, downloader: DownloaderResource,
                     pool_source: PoolSourceResource, external: ExternalSourcesResource,
                     engine: EngineResource) -> dg.MaterializeResult:
    """Bring-your-own-data sources beside the pool, as webdataset shards under `external_sources/<name>/`.

    At `tiny`: a second, noisier synthetic source (half its captions mismatched); the curated source is
    the other. At every scale: each url list named in the `external` resource, downloaded by img2dataset."""
    from datacomp_assets.pool.download import download_shards, remove_damaged_shards
    from datacomp_assets.core.integrity import check_and_record_table
    from datacomp_assets.pool.external import ExternalSource, prepare_external_index

    with storage.writing(context):
        scale, layout = get_scale(context.partition_key), storage.layout
        rows = []
        noisy_dir = layout.external_source(scale.name, NOISY_SOURCE)
        noisy = pool_source.for_scale(scale, layout).write_noisy_source(noisy_dir)
        if noisy is not None:  # (written whole each time, so materializing again redoes a file that fails a check)
            check_and_record_table(noisy_dir, "Not recorded: the synthetic web's noisy source repeats a uid.")
            rows.append((NOISY_SOURCE, noisy["samples"], noisy["samples"], str(noisy_dir)))
        for name, url_list in external.url_lists.items():
            source = ExternalSource(name, url_list, url_col=external.url_col, caption_col=external.caption_col)
            index = prepare_external_index(source, layout.external_index_file(scale.name, name))
            shards = layout.external_shards(scale.name, name)
            for tar, problem in remove_damaged_shards(shards).items():
                context.log.warning(f"{tar} {problem}: removed, to be fetched again")
            summary = download_shards(index["path"], shards, image_size=scale.image_size,
                                      shard_size=scale.shard_size, processes=downloader.processes,
                                      threads=downloader.threads, timeout=downloader.timeout or scale.download_timeout,
                                      retries=downloader.retries, engine=engine.engine(), log=context.log.warning,
                                      retry_failed_samples=downloader.retry_failed)
            if summary.retry.retried:
                context.log.info(f"{shards}: {summary.retry.line()}")
            rows.append((name, index["rows"], summary.successes, str(shards)))
        root = layout.external_sources(scale.name)
        return dg.MaterializeResult(metadata={
            "path": dg.MetadataValue.path(str(root)), "sources": len(rows),
            "samples": sum(r[2] for r in rows),
            "sources_table": dg.MetadataValue.md("| source | urls | samples | path |\n|---|---|---|---|\n"
                                                 + "\n".join(f"| {n} | {u} | {k} | {p} |" for n, u, k, p in rows)),
        })


@dg.asset_check(asset=pool_shards, blocking=True,
                description="Every expected shard finished, every url of the index is accounted for, and every "
                            "shard's tar is whole and holds the samples its _stats.json counts")
def pool_shards_complete(context: dg.AssetCheckExecutionContext, storage: StorageResource) -> dg.AssetCheckResult:
    from datacomp_assets.pool.download import damaged_shards, summarize_shards

    scale, layout = get_scale(context.partition_key), storage.layout
    urls = pq.read_metadata(layout.pool_index_file(scale.name)).num_rows
    summary = summarize_shards(layout.pool_shards(scale.name))
    expected_shards = -(-urls // scale.shard_size)
    damaged = damaged_shards(layout.pool_shards(scale.name))
    described = "; ".join(f"{tar} {problem}" for tar, problem in list(damaged.items())[:5])
    if len(damaged) > 5:
        described += f"; and {len(damaged) - 5} more"
    return dg.AssetCheckResult(
        passed=summary.shards >= expected_shards and summary.count >= urls and not damaged,
        description=f"{described}. Materialize pool_shards again: a damaged shard is fetched again." if damaged
        else None,
        metadata={"shards": summary.shards, "expected_shards": expected_shards, "urls_accounted_for": summary.count,
                  "urls": urls, "damaged_shards": dg.MetadataValue.json({t.name: p for t, p in damaged.items()})})


@dg.asset_check(asset=pool_shards, description="Where the pool has ground truth (tiny): every download failure "
                                               "is a fault the web injected")
def pool_shards_match_injected_faults(context: dg.AssetCheckExecutionContext, storage: StorageResource,
                                      pool_source: PoolSourceResource) -> dg.AssetCheckResult:
    from datacomp_assets.pool.download import check_against_ground_truth

    scale, layout = get_scale(context.partition_key), storage.layout
    truth = pool_source.for_scale(scale, layout).ground_truth()
    if truth is None:
        return dg.AssetCheckResult(passed=True, metadata={"note": "this pool has no ground truth"})
    audit = check_against_ground_truth(layout.pool_shards(scale.name), truth)
    mismatched = {k: v for k, v in audit.items() if k != "no_fault" and v["injected"] != v["observed"]}
    return dg.AssetCheckResult(
        passed=not mismatched and audit["no_fault"]["failed"] == 0,
        metadata={"unexpected_failures": audit["no_fault"]["failed"],
                  "faults_not_observed_as_expected": dg.MetadataValue.json(mismatched)})
