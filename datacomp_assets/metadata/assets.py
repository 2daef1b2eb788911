"""Metadata stage: the scorer CLIPs (tiny) and the pool's metadata (parquet + npz, reference schema)."""

import dagster as dg

from datacomp_assets.core.lineage import code_revision, files_sha256, write_lineage
from datacomp_assets.core.scorers import DFN_MODEL, SCORER_MODELS, dfn_recipe, scorer_recipe
from datacomp_assets.core.shards import brace_pattern
from datacomp_assets.training.assets import placed_job, training_metadata
from datacomp_assets.core.trainer import train
from partitions import get_scale, scale_partitions
from datacomp_assets.core.scales import require_synthetic
from resources import AcceleratorResource, StorageResource

METADATA = "metadata"


@dg.asset(partitions_def=scale_partitions, group_name=METADATA, deps=["curated_source"], code_version="1",
          pool="gpu")
def scorer_models(context: dg.AssetExecutionContext, storage: StorageResource,
                  accelerator: AcceleratorResource) -> dg.MaterializeResult:
    """Two CLIPs of different sizes trained on the curated source; they stand in for OpenAI's B/32 and L/14."""
    scale = get_scale(context.partition_key)
    require_synthetic(scale, "scorer_models")
    meta = {}
    for prefix in SCORER_MODELS:
        recipe = scorer_recipe(scale, prefix, scale.scorer_samples_seen)
        trained = train_on_curated(context, storage, accelerator, recipe, "scorer_models", prefix)
        meta.update({f"{prefix}_{k}": v for k, v in trained.items()})
    return dg.MaterializeResult(metadata=meta)


@dg.asset(partitions_def=scale_partitions, group_name=METADATA, deps=["curated_source"], code_version="1",
          pool="gpu")
def dfn_model(context: dg.AssetExecutionContext, storage: StorageResource,
              accelerator: AcceleratorResource) -> dg.MaterializeResult:
    """A data filtering network: a CLIP trained on the curated source only, whose scores filter the pool."""
    scale = get_scale(context.partition_key)
    require_synthetic(scale, "dfn_model")
    trained = train_on_curated(context, storage, accelerator, dfn_recipe(scale), "dfn_model", "dfn")
    return dg.MaterializeResult(metadata={"model": DFN_MODEL, **trained})


def train_on_curated(context, storage: StorageResource, accelerator: AcceleratorResource, recipe, asset: str,
                     name: str) -> dict:
    """Train `recipe` on the curated source's shards into `<asset>/<name>`; returns its training metadata."""
    scale_name = context.partition_key  # (recipe.name is the model's, e.g. "tiny-dfn")
    curated = storage.path(scale_name, "curated_source")
    data = brace_pattern(curated, len(list(curated.glob("*.tar"))))
    result = train(placed_job(recipe, data, storage.path(scale_name, asset), name, accelerator), log=context.log.info)
    return training_metadata(result, recipe)


def dfn_checkpoint(storage: StorageResource, scale_name: str):
    from datacomp_assets.core.trainer import TrainJob

    return TrainJob(dfn_recipe(get_scale(scale_name)), "", storage.path(scale_name, "dfn_model"), "dfn").final_checkpoint


def scorer_checkpoint(storage: StorageResource, scale_name: str, prefix: str):
    from datacomp_assets.core.trainer import TrainJob

    scale = scorer_recipe(get_scale(scale_name), prefix, get_scale(scale_name).scorer_samples_seen)
    return TrainJob(scale, "", storage.path(scale_name, "scorer_models"), prefix).final_checkpoint


@dg.asset(partitions_def=scale_partitions, group_name=METADATA, deps=["pool_shards", "scorer_models", "eval_suite"],
          code_version="2", pool="gpu")
def pool_metadata(context: dg.AssetExecutionContext, storage: StorageResource,
                  accelerator: AcceleratorResource) -> dg.MaterializeResult:
    """Per-sample features computed once: language, caption counts, embeddings and both CLIP scores.

    The paper's safety steps run first: unsafe captions and near-duplicates of evaluation images (faiss
    over image fingerprints) leave the pool, each recorded with its reason under `removed/`."""
    import duckdb

    from datacomp_assets.metadata.build import Scorer, build_pool_metadata
    from datacomp_assets.metadata.safety import eval_fingerprints
    from datacomp_assets.core.models import load_model

    scale = get_scale(context.partition_key)
    device = accelerator.placement(scale.precision).device
    scorers = []
    for prefix, model_name in SCORER_MODELS.items():
        model, preprocess, tokenizer = load_model(model_name, scorer_checkpoint(storage, scale.name, prefix), device)
        scorers.append(Scorer(prefix, model, preprocess, tokenizer, device))
    out = storage.path(scale.name, "pool_metadata")
    eval_fp = eval_fingerprints(storage.path(scale.name, "eval_suite"), max_shift=0)
    summary = build_pool_metadata(storage.path(scale.name, "pool_shards"), out, scorers, context.log.info,
                                  eval_fingerprints=eval_fp)
    rows, en, b32, l14 = duckdb.sql(
        f"select count(*), avg((language = 'en')::int), avg(clip_b32_similarity_score), "
        f"avg(clip_l14_similarity_score) from read_parquet('{out}/*.parquet')").fetchall()[0]
    # The pool's version: every subset, checkpoint and score downstream records it in its lineage.
    pool_version = files_sha256(sorted(out.glob("*.parquet")))
    write_lineage(out, {"pool_version": pool_version, "rows": rows, "code_revision": code_revision()})
    return dg.MaterializeResult(data_version=dg.DataVersion(pool_version[:16]), metadata={
        "path": dg.MetadataValue.path(str(out)), "pool_version": pool_version,
        "rows": rows, "shards": summary["shards"], "english_fraction": en,
        "mean_clip_b32_similarity_score": b32, "mean_clip_l14_similarity_score": l14,
        "removed_unsafe_text": summary["removed_unsafe_text"],
        "removed_eval_duplicate": summary["removed_eval_duplicate"],
        "eval_images_checked": len(eval_fp),
        "seconds": round(summary["seconds"], 1),
        "rows_per_second": summary["rows_per_second"] or 0.0,
    })
