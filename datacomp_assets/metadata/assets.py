"""Metadata stage: the scorer CLIPs, the DFN and the captioner (the miniature's) and the pool's metadata (parquet +
npz, reference schema)."""

import dagster as dg

from datacomp_assets.core.layout import Asset, Group, Layout
from datacomp_assets.core.inputs import require_input
from datacomp_assets.core.progress import Progress
from datacomp_assets.core.integrity import VALUES_CHECKED, recorded_manifest, require_unique_pool
from datacomp_assets.core.lineage import code_revision, file_manifest, file_sha256, manifest_version, write_lineage
from datacomp_assets.core.scales import ScaleConfig
from datacomp_assets.core.scorers import (
    CAPTIONER_MODEL, CAPTIONER_RUN, DFN_MODEL, DFN_RUN, SCORER_MODELS, captioner_recipe, dfn_recipe, scorer_checkpoint,
    scorer_recipe)
from datacomp_assets.core.shards import brace_pattern
from datacomp_assets.core.trainer import train_in_waves
from datacomp_assets.core.uid_index import write_uid_index
from partitions import get_scale, on_synthetic_web, scale_partitions
from resources import AcceleratorResource, EngineResource, PoolSourceResource, StorageResource


@dg.asset(partitions_def=scale_partitions, group_name=Group.METADATA, deps=[Asset.CURATED_SOURCE], code_version="1",
          pool="gpu")
def scorer_models(context: dg.AssetExecutionContext, storage: StorageResource, accelerator: AcceleratorResource,
                  pool_source: PoolSourceResource, engine: EngineResource) -> dg.MaterializeResult:
    """Two CLIPs of different sizes trained on the curated source; they stand in for OpenAI's B/32 and L/14."""
    with storage.writing(context):
        scale, layout = get_scale(context.partition_key), storage.layout
        pool_source.for_scale(scale, layout).require_miniature(Asset.SCORER_MODELS)
        recipes = {prefix: scorer_recipe(scale, prefix, scale.scorer_samples_seen) for prefix in SCORER_MODELS}
        trained = train_on_curated(context, storage, accelerator, engine, recipes, layout.scorer_models(scale.name))
        return dg.MaterializeResult(metadata={f"{prefix}_{k}": v for prefix, summary in trained.items()
                                              for k, v in summary.items()})


@dg.asset(partitions_def=scale_partitions, group_name=Group.METADATA, code_version="2", pool="gpu",
          deps=[dg.AssetDep(Asset.CURATED_SOURCE, partition_mapping=on_synthetic_web)])
def dfn_model(context: dg.AssetExecutionContext, storage: StorageResource, accelerator: AcceleratorResource,
              pool_source: PoolSourceResource, engine: EngineResource) -> dg.MaterializeResult:
    """A data filtering network, whose scores filter the pool: at the synthetic web, a CLIP trained on the curated
    source only; at a published pool, the checkpoint the scale's `dfn_checkpoint` names (verified, hashed)."""
    with storage.writing(context):
        scale, layout = get_scale(context.partition_key), storage.layout
        if pool_source.for_scale(scale, layout).metadata_published:
            return users_checkpoint(scale, "dfn_checkpoint", scale.dfn_architecture)
        trained = train_on_curated(context, storage, accelerator, engine, {DFN_RUN: dfn_recipe(scale)},
                                   layout.dfn_model(scale.name))
        return dg.MaterializeResult(metadata={"model": DFN_MODEL, **trained[DFN_RUN]})


@dg.asset(partitions_def=scale_partitions, group_name=Group.METADATA, code_version="1", pool="gpu",
          deps=[dg.AssetDep(Asset.CURATED_SOURCE, partition_mapping=on_synthetic_web)])
def captioner_model(context: dg.AssetExecutionContext, storage: StorageResource, accelerator: AcceleratorResource,
                    pool_source: PoolSourceResource, engine: EngineResource) -> dg.MaterializeResult:
    """SIEVE's captioner, whose captions of each image are matched against its alt-text: at the synthetic web, a
    tiny CoCa trained on the curated source (open_clip's contrastive and captioning losses); at a published pool,
    the checkpoint the scale's `captioner_checkpoint` names (verified, hashed)."""
    with storage.writing(context):
        scale, layout = get_scale(context.partition_key), storage.layout
        if pool_source.for_scale(scale, layout).metadata_published:
            return users_checkpoint(scale, "captioner_checkpoint", scale.captioner_architecture)
        trained = train_on_curated(context, storage, accelerator, engine, {CAPTIONER_RUN: captioner_recipe(scale)},
                                   layout.captioner_model(scale.name))
        return dg.MaterializeResult(metadata={"model": CAPTIONER_MODEL, **trained[CAPTIONER_RUN]})


def users_checkpoint(scale: ScaleConfig, setting: str, architecture: str) -> dg.MaterializeResult:
    """At a paper scale a model is the user's checkpoint (the file `setting` names): verified to load and to give
    finite embeddings, and hashed for the lineage."""
    from datacomp_assets.core.models import forward_check

    checkpoint = require_input(scale, setting)
    problem = forward_check(architecture, checkpoint)
    if problem:
        raise ValueError(f"scale {scale.name!r}: {setting} {checkpoint} is not an open_clip {architecture} "
                         f"checkpoint: {problem}")
    sha256 = file_sha256(checkpoint)
    return dg.MaterializeResult(data_version=dg.DataVersion(sha256[:16]), metadata={
        "model": architecture, "checkpoint_path": str(checkpoint), "checkpoint_sha256": sha256})


def train_on_curated(context, storage: StorageResource, accelerator: AcceleratorResource, engine: EngineResource,
                     recipes: dict[str, ScaleConfig], logs_dir) -> dict[str, dict]:
    """Train each recipe on the curated source's shards into `<logs_dir>/<name>`, together where the accelerator
    allows; returns each run's training summary by name."""
    curated = storage.layout.curated_source(context.partition_key)  # (recipe.name is the model's: "tiny-dfn")
    data = brace_pattern(curated, len(list(curated.glob("*.tar"))))
    jobs = [accelerator.train_job(recipe, data, logs_dir, name, engine=engine.engine())
            for name, recipe in recipes.items()]
    progress = Progress(context.log.info, f"training {', '.join(recipes)}", sum(j.samples_seen for j in jobs),
                        "samples")
    results = train_in_waves(accelerator.in_waves(jobs), context.log.info, progress)
    return {name: result.summary(recipe) for (name, recipe), result in zip(recipes.items(), results)}


@dg.asset(partitions_def=scale_partitions, group_name=Group.METADATA,
          deps=[Asset.POOL_INDEX,
                dg.AssetDep(Asset.POOL_SHARDS, partition_mapping=on_synthetic_web),
                dg.AssetDep(Asset.SCORER_MODELS, partition_mapping=on_synthetic_web),
                dg.AssetDep(Asset.EVAL_SUITE, partition_mapping=on_synthetic_web)],
          code_version="4", pool="gpu")
def pool_metadata(context: dg.AssetExecutionContext, storage: StorageResource, accelerator: AcceleratorResource,
                  pool_source: PoolSourceResource) -> dg.MaterializeResult:
    """Per-sample metadata: captions, image sizes, embeddings and both CLIP scores, and the pool's sorted uid index.

    At a published pool (the paper's scales): DataComp's parquet and npz as they are, linked; no image is read and
    no model runs, and caption features (languages, word counts) are computed later, by the rules that read them,
    on the rows they need. At the synthetic web: computed from the downloaded images by the scorer CLIPs, with the
    caption features, after the paper's safety steps (unsafe captions and near-duplicates of evaluation images
    leave the pool, each recorded with its reason under `removed/`)."""
    import duckdb

    with storage.writing(context):
        scale, layout = get_scale(context.partition_key), storage.layout
        source = pool_source.for_scale(scale, layout)
        out = layout.pool_metadata(scale.name)
        if source.metadata_published:
            from datacomp_assets.metadata.published import link_published_metadata

            summary = link_published_metadata(source.metadata_files(), out, log=context.log.info)
        else:
            summary = metadata_from_images(context, scale, layout, accelerator, out)
            require_unique_pool(write_uid_index(out), f"Materialize {Asset.POOL_SHARDS} again: two of its shards "
                                                      "hold the same sample.")
        rows, b32, l14 = duckdb.sql(
            f"select count(*), avg(clip_b32_similarity_score), avg(clip_l14_similarity_score) "
            f"from read_parquet('{out}/*.parquet')").fetchall()[0]
        # The pool's version: every subset, checkpoint and score downstream records it in its lineage.
        # (only files written since the last record are hashed; each file's values were checked on the way here)
        manifest = file_manifest(sorted(out.glob("*.parquet")), recorded=recorded_manifest(out))
        pool_version = manifest_version(manifest)
        write_lineage(out, {"pool_version": pool_version, "rows": rows, "manifest": manifest,
                            VALUES_CHECKED: True, "code_revision": code_revision()})
        return dg.MaterializeResult(data_version=dg.DataVersion(pool_version[:16]), metadata={
            "path": dg.MetadataValue.path(str(out)), "pool_version": pool_version,
            "rows": rows,
            "mean_clip_b32_similarity_score": b32, "mean_clip_l14_similarity_score": l14,
            **{k: round(v, 1) if k == "seconds" else v for k, v in summary.items() if v is not None},
        })


def metadata_from_images(context, scale: ScaleConfig, layout: Layout, accelerator: AcceleratorResource,
                         out) -> dict:
    """The miniature's metadata: the scorer CLIPs over the downloaded images, after the safety steps."""
    from datacomp_assets.core.models import Scorer, load_model
    from datacomp_assets.metadata.build import build_pool_metadata
    from datacomp_assets.metadata.safety import eval_fingerprints

    device = accelerator.placement(scale.precision).device
    scorers = []
    for prefix, model_name in SCORER_MODELS.items():
        model, preprocess, tokenizer = load_model(model_name, scorer_checkpoint(layout, scale, prefix), device)
        scorers.append(Scorer(prefix, model, preprocess, tokenizer, device))
    eval_fp = eval_fingerprints(layout.eval_suite(scale.name), max_shift=0)
    shards = len(list(layout.pool_shards(scale.name).glob("*.tar")))
    summary = build_pool_metadata(layout.pool_shards(scale.name), out, scorers, context.log.info,
                                  eval_fingerprints=eval_fp,
                                  progress=Progress(context.log.info, "metadata", shards, "shards"))
    return {**summary, "eval_images_checked": len(eval_fp)}
