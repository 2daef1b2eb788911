"""Filtering stage: one subset (sorted `u8,u8` uid .npy) per (scale, strategy), with its checks."""

import time

import dagster as dg
import numpy as np

from datacomp_assets.core.layout import Asset, Group
from datacomp_assets.core.lineage import code_revision, file_sha256, verified_version, write_lineage
from datacomp_assets.core.strategies import STRATEGIES, expected_fraction, strategy_definition, strategy_version, track
from datacomp_assets.core.uids import load_subset, save_subset, uids_to_array
from datacomp_assets.filtering.selection import select_uids
from partitions import (
    STRATEGY_DEFINITION, by_scale, get_scale, scale_and_strategy, scale_partitions, scale_strategy_partitions,
    strategy_partitions)
from resources import AcceleratorResource, PoolSourceResource, StorageResource


@dg.asset(partitions_def=scale_partitions, group_name=Group.FILTERING, code_version="1", pool="gpu",
          deps=[Asset.POOL_METADATA, Asset.SCORER_MODELS, Asset.DFN_MODEL, Asset.EVAL_SUITE, Asset.CURATED_SOURCE])
def pool_features(context: dg.AssetExecutionContext, storage: StorageResource, accelerator: AcceleratorResource,
                  pool_source: PoolSourceResource) -> dg.MaterializeResult:
    """Per-sample columns the filters beyond the metadata read: caption concepts, k-means clusters and the
    target clusters, SemDeDup similarities, VAS scores, MetaCLIP keep probabilities, DFN scores."""
    from datacomp_assets.core.models import Scorer, load_model
    from datacomp_assets.core.scorers import DFN_MODEL, SCORER_MODELS, dfn_checkpoint, scorer_checkpoint
    from datacomp_assets.core.shards import iter_webdataset, read_downloaded
    from datacomp_assets.filtering.features import (
        FeatureSettings, compute_pool_features, entries_from_captions, vocabulary_from_classnames)
    from datacomp_assets.filtering.image_based import proportional_k
    from datacomp_assets.world.eval_suite import OBJECTS_TASK, objects_training_images

    with storage.writing(context):
        scale, layout = get_scale(context.partition_key), storage.layout
        # At the paper's scales: ImageNet's training images and MetaCLIP's entry list, which the user supplies.
        pool_source.for_scale(scale, layout).require_miniature(Asset.POOL_FEATURES)
        t0 = time.perf_counter()
        device = accelerator.placement(scale.precision).device
        classnames = (layout.eval_suite(scale.name) / OBJECTS_TASK / "classnames.txt").read_text().split("\n")
        curated_texts = [files["txt"].decode() for tar in sorted(layout.curated_source(scale.name).glob("*.tar"))
                         for _, files in iter_webdataset(tar) if "txt" in files]

        l14 = Scorer("l14", *load_model(SCORER_MODELS["l14"], scorer_checkpoint(layout, scale, "l14"), device), device)
        images, _ = zip(*objects_training_images(scale.target_images_per_class))
        target_embeddings, _ = l14.embed(list(images), [""] * len(images))

        dfn = Scorer("dfn", *load_model(DFN_MODEL, dfn_checkpoint(layout, scale), device), device)
        dfn_scores = {}
        for tar in sorted(layout.pool_shards(scale.name).glob("*.tar")):
            records, pool_images = read_downloaded(tar)
            img, txt = dfn.embed(pool_images, [r["text"] for r in records])
            dfn_scores.update(zip([r["uid"] for r in records], (img * txt).sum(axis=1).tolist()))
        context.log.info(f"DFN scored {len(dfn_scores)} pool samples")

        metadata_dir = layout.pool_metadata(scale.name)
        verified_version(metadata_dir)
        n_pool = _pool_rows(metadata_dir)
        settings = FeatureSettings(
            vocabulary=vocabulary_from_classnames(c for c in classnames if c),
            metaclip_entries=entries_from_captions(curated_texts, min_count=5, extra=[c for c in classnames if c]),
            metaclip_t=scale.metaclip_t, clusters=proportional_k(n_pool), seed=scale.seed)
        out = layout.pool_features(scale.name)
        summary = compute_pool_features(metadata_dir, out, settings, target_embeddings, dfn_scores, context.log.info)
        return dg.MaterializeResult(metadata={
            "path": dg.MetadataValue.path(str(out)), **summary, "target_images": len(images),
            "text_vocabulary": len(settings.vocabulary), "seconds": round(time.perf_counter() - t0, 1)})


@dg.observable_source_asset(partitions_def=strategy_partitions, group_name=Group.FILTERING)
def strategy_definitions() -> dg.DataVersionsByPartition:
    """Each registered strategy's rule (strategies.toml and $DATACOMP_STRATEGIES), versioned by its hash.

    Edit a rule, reload the code location and observe this asset: that strategy's subsets, checkpoints and
    scores show as stale, and no other strategy's do."""
    return dg.DataVersionsByPartition({name: dg.DataVersion(strategy_version(name)) for name in STRATEGIES})


@dg.asset(partitions_def=scale_strategy_partitions, group_name=Group.FILTERING,
          deps=[STRATEGY_DEFINITION,
                dg.AssetDep(Asset.POOL_METADATA, partition_mapping=by_scale),
                dg.AssetDep(Asset.POOL_FEATURES, partition_mapping=by_scale),
                dg.AssetDep(Asset.EXTERNAL_SOURCES, partition_mapping=by_scale)],
          code_version="3")
def subset(context: dg.AssetExecutionContext, storage: StorageResource,
           pool_source: PoolSourceResource) -> dg.MaterializeResult:
    """The strategy's rule applied to the pool metadata: the uids a CLIP will be trained on, and an audit of
    who is in and who is out."""
    from datacomp_assets.filtering.audit import audit_markdown, audit_subset

    with storage.writing(context):
        scale, strategy = scale_and_strategy(context)
        layout = storage.layout
        source = pool_source.for_scale(scale, layout)
        metadata_dir = layout.pool_metadata(scale.name)
        pool_version = verified_version(metadata_dir)  # the files it reads are the version it records
        t0 = time.perf_counter()
        uids = select_uids(metadata_dir, strategy, seed=scale.seed, feature_dirs=[layout.pool_features(scale.name)],
                           reference_scorers=source.reference_scorers,
                           external_dirs=layout.external_source_dirs(scale.name))
        seconds = time.perf_counter() - t0
        path = layout.subset_file(scale.name, strategy)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_subset(uids, path)
        audit = audit_subset(metadata_dir, uids, ground_truth_path=source.ground_truth())
        overall = audit["overall"][0]
        subset_sha256 = file_sha256(path)
        write_lineage(path.parent, {"subset_sha256": subset_sha256, "strategy": strategy,
                                    "strategy_version": strategy_version(strategy), "pool_version": pool_version,
                                    "dataset_size": len(uids), "code_revision": code_revision()})
        return dg.MaterializeResult(data_version=dg.DataVersion(subset_sha256[:16]), metadata={
            "path": dg.MetadataValue.path(str(path)), "subset_sha256": subset_sha256, "pool_version": pool_version,
            "strategy_version": strategy_version(strategy),
            "strategy": STRATEGIES[strategy].description,
            "rule": dg.MetadataValue.json(strategy_definition(strategy)),
            "track": track(strategy),
            "dataset_size": len(uids),
            "unique_uids": overall["kept_unique"],
            "pool_size": overall["pool"],
            "kept_fraction": overall["kept_share"],
            "audit": dg.MetadataValue.md(audit_markdown(audit)),
            "seconds": round(seconds, 2),
        })


def _pool_rows(metadata_dir) -> int:
    import duckdb

    return duckdb.sql(f"select count(*) from read_parquet('{metadata_dir}/*.parquet')").fetchall()[0][0]


@dg.asset_check(asset=subset, blocking=True,
                description="A non-empty subset of the pool (and its declared sources), of the rule's size, "
                            "with no near-duplicate of an evaluation image")
def subset_is_valid(context: dg.AssetCheckExecutionContext, storage: StorageResource) -> dg.AssetCheckResult:
    import duckdb

    scale, strategy = scale_and_strategy(context)
    layout = storage.layout
    uids = np.unique(load_subset(layout.subset_file(scale.name, strategy)))
    metadata_dir = layout.pool_metadata(scale.name)
    pool = uids_to_array([u for (u,) in duckdb.sql(
        f"select uid from read_parquet('{metadata_dir}/*.parquet')").fetchall()])
    allowed = [pool]
    for source, directory in layout.external_source_dirs(scale.name).items():
        if f"source:{source}" in {name for name, _ in STRATEGIES[strategy].mixture}:
            allowed.append(uids_to_array([u for (u,) in duckdb.sql(
                f"select uid from read_parquet('{directory}/*.parquet') where status = 'success'").fetchall()]))
    outside = int((~np.isin(uids, np.concatenate(allowed))).sum())
    removed_dir = layout.removed_samples(scale.name)
    eval_duplicates = uids_to_array([u for (u,) in duckdb.sql(
        f"select uid from read_parquet('{removed_dir}/*.parquet') where reason = 'eval_duplicate'").fetchall()]
    ) if any(removed_dir.glob("*.parquet")) else np.empty(0, uids.dtype)
    held_eval = int(np.isin(uids, eval_duplicates).sum())
    in_pool = int(np.isin(uids, pool).sum())
    fraction = in_pool / len(pool) if len(pool) else 0.0
    expected = expected_fraction(strategy)
    size_ok = expected is None or abs(fraction - expected) <= 0.01 + 0.01 * expected
    return dg.AssetCheckResult(
        passed=bool(len(uids) > 0 and outside == 0 and held_eval == 0 and size_ok),
        metadata={"unique_uids": len(uids), "uids_outside_pool_and_sources": outside,
                  "eval_near_duplicates": held_eval, "kept_fraction": fraction,
                  "expected_fraction": expected if expected is not None else "data-dependent"},
    )
