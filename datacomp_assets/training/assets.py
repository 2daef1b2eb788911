"""Training stage: one open_clip checkpoint per (scale, strategy), trained on exactly the subset's samples."""

import hashlib
from pathlib import Path

import dagster as dg

from datacomp_assets.filtering.strategies import track
from datacomp_assets.filtering.uids import load_subset
from datacomp_assets.training.reshard import reshard
from datacomp_assets.training.trainer import TrainJob, TrainResult, train
from partitions import by_scale, scale_and_strategy, scale_strategy_partitions
from partitions.scales import ScaleConfig
from resources import AcceleratorResource, StorageResource


def train_with_placement(scale: ScaleConfig, train_data: str, logs_dir: Path, name: str,
                         accelerator: AcceleratorResource, log) -> TrainResult:
    placement = accelerator.placement(scale.precision)
    job = TrainJob(scale, train_data, logs_dir, name, device=placement.device, precision=placement.precision,
                   nproc=placement.nproc, grad_checkpointing=placement.device == "cuda", threads=placement.threads)
    return train(job, log=log)


def faces_in_pool(metadata_dir: Path) -> dict[str, list]:
    """uid -> face boxes for the (few) pool samples with detected faces."""
    import duckdb

    rows = duckdb.sql(f"select uid, face_bboxes from read_parquet('{metadata_dir}/*.parquet') "
                      "where len(face_bboxes) > 0").fetchall()
    return dict(rows)


def checkpoint_file(storage: StorageResource, scale: ScaleConfig, strategy: str) -> Path:
    """The final checkpoint of a strategy's training run (open_clip names it after the last "epoch")."""
    return storage.path(scale.name, "checkpoint", strategy) / "logs" / "train" / "checkpoints" / \
        f"epoch_{scale.checkpoints}.pt"


def training_metadata(result: TrainResult, scale: ScaleConfig) -> dict:
    """What a user looks at after training: where, how fast, and how the loss went."""
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
        meta["samples_per_second"] = result.median_samples_per_second
        meta["loss_curve"] = dg.MetadataValue.md(
            "| samples seen | loss |\n|---|---|\n" + "\n".join(f"| {s} | {loss:.4f} |" for s, loss in result.losses))
    return meta


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dg.asset(partitions_def=scale_strategy_partitions, group_name="training", code_version="1",
          deps=["subset", dg.AssetDep("pool_shards", partition_mapping=by_scale)],
          pool="gpu")
def checkpoint(context: dg.AssetExecutionContext, storage: StorageResource,
               accelerator: AcceleratorResource) -> dg.MaterializeResult:
    """open_clip's trainer on exactly the subset's samples, with the scale's fixed recipe and budget."""
    scale, strategy = scale_and_strategy(context)
    uids = load_subset(storage.path(scale.name, "subset", strategy) / "subset.npy")
    out = storage.path(scale.name, "checkpoint", strategy)
    faces = faces_in_pool(storage.path(scale.name, "pool_metadata"))
    shard_dirs = [storage.path(scale.name, "pool_shards")]
    if track(strategy) == "byod":
        root = storage.path(scale.name, "external_sources")
        shard_dirs += sorted(d for d in root.iterdir() if d.is_dir()) if root.exists() else []
    shards = reshard(shard_dirs, uids, out / "train_shards", scale.shard_size, face_bboxes=faces)
    if shards.missing_uids:
        context.log.warning(f"{shards.missing_uids} subset uids have no downloaded image and are skipped")
    result = train_with_placement(scale, shards.shard_pattern, out / "logs", "train", accelerator,
                                  context.log.info)
    return dg.MaterializeResult(metadata={
        **training_metadata(result, scale),
        "train_samples": shards.samples_written, "unique_uids": shards.unique_uids,
        "missing_uids": shards.missing_uids, "faces_blurred": shards.faces_blurred,
    })
