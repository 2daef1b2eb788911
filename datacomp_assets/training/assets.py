"""Training stage: open_clip checkpoints per (scale, strategy), one per training seed, on exactly the subset's
samples; and a blocking check that every checkpoint loads safely and runs."""

import shutil
import statistics

import dagster as dg

from datacomp_assets.core.figures import loss_curve_png, png_markdown
from datacomp_assets.core.layout import Asset, Group, seed_name
from datacomp_assets.core.lineage import (
    code_revision, file_sha256, made_from_other_input, path_in_record, read_lineage, text_sha256, write_lineage)
from datacomp_assets.core.progress import Progress
from datacomp_assets.core.scales import scale_version
from datacomp_assets.core.strategies import track
from datacomp_assets.core.trainer import TrainResult, train_in_waves
from datacomp_assets.core.uids import load_subset
from datacomp_assets.training.faces import faces_in_pool
from datacomp_assets.training.reshard import reshard
from partitions import STRATEGY_DEFINITION, by_scale, scale_and_strategy, scale_strategy_partitions
from resources import AcceleratorResource, EngineResource, StorageResource


@dg.asset(partitions_def=scale_strategy_partitions, group_name=Group.TRAINING, code_version="2",
          deps=[STRATEGY_DEFINITION, Asset.SUBSET, dg.AssetDep(Asset.POOL_SHARDS, partition_mapping=by_scale)],
          pool="gpu")
def checkpoint(context: dg.AssetExecutionContext, storage: StorageResource, accelerator: AcceleratorResource,
               engine: EngineResource) -> dg.MaterializeResult:
    """open_clip's trainer on exactly the subset's samples, with the scale's fixed recipe and budget, once per
    training seed of the scale. Killed and materialized again, each seed resumes from its latest checkpoint."""
    with storage.writing(context):
        scale, strategy = scale_and_strategy(context)
        # A GPU scale on a CPU, or a batch no GPU count splits: fail now.
        accelerator.training_placement(scale, engine.engine())
        layout = storage.layout
        subset_file = layout.subset_file(scale.name, strategy)
        uids = load_subset(subset_file)
        subset_sha256 = file_sha256(subset_file)
        out, logs = layout.checkpoint_dir(scale.name, strategy), layout.training_logs(scale.name, strategy)
        recipe = scale_version(scale)
        if (made_from_other_input(out, "subset_sha256", subset_sha256)
                or made_from_other_input(out, "scale_version", recipe)):
            # Resuming would continue a model of the old subset or recipe (an override since): start over.
            context.log.warning(f"the subset or the scale's recipe changed since {out} was trained; "
                                "discarding its checkpoints")
            shutil.rmtree(logs, ignore_errors=True)
            # Its record named the checkpoints just discarded. Name what the new ones train on, so that a killed run
            # resumes them. A record of checkpoints that stand is kept until the record of their replacement is
            # complete (a failed run leaves a finished checkpoint's record as it was).
            write_lineage(out, {"subset_sha256": subset_sha256, "scale_version": recipe, "complete": False})
        sources = list(layout.external_source_dirs(scale.name).values()) if track(strategy) == "byod" else []
        faces = faces_in_pool(layout.pool_metadata(scale.name), sources, subset=uids)  # the subset's only
        shard_dirs = [layout.pool_shards(scale.name), *sources]
        shards = reshard(shard_dirs, uids, layout.train_shards(scale.name, strategy), scale.shard_size,
                         face_bboxes=faces)
        if shards.missing_uids:
            context.log.warning(f"{shards.missing_uids} subset uids have no downloaded image in "
                                f"{', '.join(map(str, shard_dirs))} and are skipped")

        jobs = [accelerator.train_job(scale, shards.shard_pattern, logs, seed_name(seed), seed=seed,
                                      engine=engine.engine()) for seed in scale.seeds]
        seeds_progress = Progress(context.log.info, f"training {len(jobs)} seeds", sum(j.samples_seen for j in jobs),
                                  "samples")
        runs: dict[int, TrainResult] = dict(zip(scale.seeds, train_in_waves(
            accelerator.in_waves(jobs), context.log.info, seeds_progress)))
        samples_seen = jobs[0].samples_seen

        png = loss_curve_png({seed_name(s): r.losses for s, r in runs.items()}, f"{scale.name} / {strategy}")
        layout.loss_curve(scale.name, strategy).write_bytes(png)
        final_losses = [r.final_loss for r in runs.values() if r.final_loss is not None]
        rates = [r.median_samples_per_second for r in runs.values() if r.median_samples_per_second]
        per_seed = {seed_name(s): r.summary(scale) for s, r in runs.items()}
        hashes = {name: meta["checkpoint_sha256"] for name, meta in per_seed.items()}
        write_lineage(out, {
            "subset_sha256": subset_sha256,
            "pool_version": read_lineage(subset_file.parent).get("pool_version", "unknown"),
            "checkpoints": {name: {"path": path_in_record(meta["checkpoint_path"], layout.root),
                                   "sha256": meta["checkpoint_sha256"]} for name, meta in per_seed.items()},
            "model": scale.model, "samples_seen": samples_seen, "scale_version": recipe,
            "complete": True, "code_revision": code_revision()})
        return dg.MaterializeResult(data_version=dg.DataVersion(text_sha256(hashes)[:16]), metadata={
            "subset_sha256": subset_sha256,
            "model": scale.model, "seeds": list(scale.seeds), "samples_seen": samples_seen,
            "checkpoints": dg.MetadataValue.json(per_seed),
            "final_loss": statistics.mean(final_losses) if final_losses else None,
            "samples_per_second": statistics.median(rates) if rates else None,
            "train_seconds": round(sum(r.seconds for r in runs.values()), 1),
            "resumed_from_epoch": max(r.resumed_from_epoch for r in runs.values()),
            "loss_curve": dg.MetadataValue.md(png_markdown(png, "loss curve")),
            "loss_curve_png": dg.MetadataValue.path(str(layout.loss_curve(scale.name, strategy))),
            "train_samples": shards.samples_written, "unique_uids": shards.unique_uids,
            "missing_uids": shards.missing_uids, "faces_blurred": shards.faces_blurred,
        })


@dg.asset_check(asset=checkpoint, blocking=True,
                description="Every seed's final checkpoint is there, and every checkpoint loads with "
                            "weights_only=True and runs a forward pass with finite outputs")
def checkpoint_loads(context: dg.AssetCheckExecutionContext, storage: StorageResource) -> dg.AssetCheckResult:
    from datacomp_assets.core.models import forward_check
    from datacomp_assets.training.verify import verify_checkpoints

    scale, strategy = scale_and_strategy(context)
    passed, findings = verify_checkpoints(storage.layout, scale, strategy, forward_check)
    return dg.AssetCheckResult(passed=passed, metadata={
        k: dg.MetadataValue.json(v) if isinstance(v, (list, dict)) else v for k, v in findings.items()})
