"""Training stage: open_clip checkpoints per (scale, strategy), one per training seed, on exactly the subset's
samples; and a blocking check that every checkpoint loads safely and runs."""

import shutil
import statistics
from pathlib import Path

import dagster as dg

from datacomp_assets.core.strategies import track
from datacomp_assets.core.uids import load_subset
from datacomp_assets.core.lineage import (
    code_revision, file_sha256, made_from_other_input, read_lineage, text_sha256, write_lineage)
from datacomp_assets.core.figures import loss_curve_png, png_markdown
from datacomp_assets.training.reshard import reshard
from datacomp_assets.core.trainer import TrainJob, TrainResult, train
from partitions import STRATEGY_DEFINITION, by_scale, scale_and_strategy, scale_strategy_partitions
from datacomp_assets.core.scales import ScaleConfig
from resources import AcceleratorResource, StorageResource


def placed_job(scale: ScaleConfig, train_data: str, logs_dir: Path, name: str, accelerator: AcceleratorResource,
               seed: int | None = None) -> TrainJob:
    """The scale's fixed recipe on the devices the accelerator resource chooses."""
    placement = accelerator.placement(scale.precision)
    return TrainJob(scale, train_data, logs_dir, name, device=placement.device, precision=placement.precision,
                    nproc=placement.nproc, grad_checkpointing=placement.device == "cuda", threads=placement.threads,
                    seed=seed)


def faces_in_pool(metadata_dir: Path) -> dict[str, list]:
    """uid -> face boxes for the (few) pool samples with detected faces."""
    import duckdb

    rows = duckdb.sql(f"select uid, face_bboxes from read_parquet('{metadata_dir}/*.parquet') "
                      "where len(face_bboxes) > 0").fetchall()
    return dict(rows)


def seed_name(seed: int) -> str:
    return f"seed_{seed}"


def checkpoint_file(storage: StorageResource, scale: ScaleConfig, strategy: str, seed: int) -> Path:
    """The final checkpoint of one seed's training run (open_clip names it after the last "epoch")."""
    return storage.path(scale.name, "checkpoint", strategy) / "logs" / seed_name(seed) / "checkpoints" / \
        f"epoch_{scale.epochs}.pt"


def training_metadata(result: TrainResult, scale: ScaleConfig) -> dict:
    """What a user looks at after one training run: where, how fast, and how the loss went."""
    meta = {
        "checkpoint": dg.MetadataValue.path(str(result.checkpoint)),
        "checkpoint_sha256": file_sha256(result.checkpoint),
        "samples_seen": scale.samples_seen,
        "train_seconds": round(result.seconds, 1),
        "resumed_from_epoch": result.resumed_from_epoch,
        "model": scale.model,
    }
    if result.final_loss is not None:
        meta["final_loss"] = result.final_loss
    if result.median_samples_per_second is not None:
        meta["samples_per_second"] = result.median_samples_per_second
    return meta


@dg.asset(partitions_def=scale_strategy_partitions, group_name="training", code_version="2",
          deps=[STRATEGY_DEFINITION, "subset", dg.AssetDep("pool_shards", partition_mapping=by_scale)],
          pool="gpu")
def checkpoint(context: dg.AssetExecutionContext, storage: StorageResource,
               accelerator: AcceleratorResource) -> dg.MaterializeResult:
    """open_clip's trainer on exactly the subset's samples, with the scale's fixed recipe and budget, once per
    training seed of the scale. Killed and materialized again, each seed resumes from its latest checkpoint."""
    scale, strategy = scale_and_strategy(context)
    subset_dir = storage.path(scale.name, "subset", strategy)
    uids = load_subset(subset_dir / "subset.npy")
    subset_sha256 = file_sha256(subset_dir / "subset.npy")
    out = storage.path(scale.name, "checkpoint", strategy)
    if made_from_other_input(out, "subset_sha256", subset_sha256):
        # Resuming would continue a model of the old subset: start over.
        context.log.warning(f"the subset changed since {out} was trained; discarding its checkpoints")
        shutil.rmtree(out / "logs", ignore_errors=True)
    write_lineage(out, {"subset_sha256": subset_sha256, "complete": False})
    faces = faces_in_pool(storage.path(scale.name, "pool_metadata"))
    shard_dirs = [storage.path(scale.name, "pool_shards")]
    if track(strategy) == "byod":
        root = storage.path(scale.name, "external_sources")
        shard_dirs += sorted(d for d in root.iterdir() if d.is_dir()) if root.exists() else []
    shards = reshard(shard_dirs, uids, out / "train_shards", scale.shard_size, face_bboxes=faces)
    if shards.missing_uids:
        context.log.warning(f"{shards.missing_uids} subset uids have no downloaded image and are skipped")

    runs: dict[int, TrainResult] = {}
    for seed in scale.seeds:
        job = placed_job(scale, shards.shard_pattern, out / "logs", seed_name(seed), accelerator, seed=seed)
        context.log.info(f"seed {seed} ({len(runs) + 1} of {len(scale.seeds)})")
        runs[seed] = train(job, log=context.log.info)

    png = loss_curve_png({seed_name(s): r.losses for s, r in runs.items()}, f"{scale.name} / {strategy}")
    (out / "loss_curve.png").write_bytes(png)
    final_losses = [r.final_loss for r in runs.values() if r.final_loss is not None]
    rates = [r.median_samples_per_second for r in runs.values() if r.median_samples_per_second]
    per_seed = {seed_name(s): _json_safe(training_metadata(r, scale)) for s, r in runs.items()}
    hashes = {name: meta["checkpoint_sha256"] for name, meta in per_seed.items()}
    write_lineage(out, {
        "subset_sha256": subset_sha256, "pool_version": read_lineage(subset_dir).get("pool_version", "unknown"),
        "checkpoints": {name: {"path": meta["checkpoint"], "sha256": meta["checkpoint_sha256"]}
                        for name, meta in per_seed.items()},
        "model": scale.model, "samples_seen": job.samples_seen, "complete": True, "code_revision": code_revision()})
    return dg.MaterializeResult(data_version=dg.DataVersion(text_sha256(hashes)[:16]), metadata={
        "subset_sha256": subset_sha256,
        "model": scale.model, "seeds": list(scale.seeds), "samples_seen": job.samples_seen,
        "checkpoints": dg.MetadataValue.json(per_seed),
        "final_loss": statistics.mean(final_losses) if final_losses else None,
        "samples_per_second": statistics.median(rates) if rates else None,
        "train_seconds": round(sum(r.seconds for r in runs.values()), 1),
        "resumed_from_epoch": max(r.resumed_from_epoch for r in runs.values()),
        "loss_curve": dg.MetadataValue.md(png_markdown(png, "loss curve")),
        "loss_curve_png": dg.MetadataValue.path(str(out / "loss_curve.png")),
        "train_samples": shards.samples_written, "unique_uids": shards.unique_uids,
        "missing_uids": shards.missing_uids, "faces_blurred": shards.faces_blurred,
    })


def _json_safe(meta: dict) -> dict:
    return {k: (v.value if isinstance(v, dg.MetadataValue) else v) for k, v in meta.items()}


@dg.asset_check(asset=checkpoint, blocking=True,
                description="Every checkpoint of every seed loads with weights_only=True and runs a forward pass "
                            "with finite outputs")
def checkpoint_loads(context: dg.AssetCheckExecutionContext, storage: StorageResource) -> dg.AssetCheckResult:
    from datacomp_assets.core.models import forward_check

    scale, strategy = scale_and_strategy(context)
    root = storage.path(scale.name, "checkpoint", strategy) / "logs"
    files = sorted(p for s in scale.seeds for p in (root / seed_name(s) / "checkpoints").glob("epoch_*.pt"))
    failures = {}
    for path in files:
        error = forward_check(scale.model, path)
        if error:
            failures[str(path.relative_to(root))] = error
    expected = len(scale.seeds) * scale.epochs
    return dg.AssetCheckResult(
        passed=not failures and len(files) == expected,
        metadata={"checkpoints_checked": len(files), "checkpoints_expected": expected,
                  "failures": dg.MetadataValue.json(failures)},
    )
