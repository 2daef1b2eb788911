"""Resharding writes exactly the subset's samples; open_clip's trainer really trains and resumes."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from datacomp_assets.filtering.uids import uids_to_array
from datacomp_assets.pool.shards import iter_webdataset, write_webdataset
from datacomp_assets.pool.synthetic_web import encode_jpeg, render, sample
from datacomp_assets.training.models import load_model
from datacomp_assets.training.reshard import reshard
from datacomp_assets.training.trainer import TrainJob, completed_epochs, train
from partitions.scales import SCALES


def write_pool(directory, n=120, per_shard=50):
    directory.mkdir(parents=True)
    samples = [sample(i) for i in range(n)]
    for k in range(0, n, per_shard):
        write_webdataset(directory / f"{k // per_shard:08d}.tar", (
            (f"{s.index:09d}", {"jpg": encode_jpeg(render(s).resize((32, 32))), "txt": s.text.encode(),
                                "json": json.dumps({"uid": s.uid}).encode()})
            for s in samples[k:k + per_shard]))
    return samples


def read_uids(directory):
    return [json.loads(f["json"])["uid"] for tar in sorted(directory.glob("*.tar")) for _, f in iter_webdataset(tar)]


def test_reshard_writes_exactly_the_subset_with_upweighting(tmp_path):
    samples = write_pool(tmp_path / "pool")
    chosen = [s.uid for s in samples[::3]] + [samples[0].uid]  # samples[0] listed twice: up-weighted
    summary = reshard(tmp_path / "pool", uids_to_array(chosen), tmp_path / "train", shard_size=10)
    written = read_uids(tmp_path / "train")
    assert sorted(written) == sorted(chosen)
    assert summary.samples_written == len(chosen) and summary.missing_uids == 0
    assert summary.shards == len(list((tmp_path / "train").glob("*.tar")))
    assert not (tmp_path / "train.tmp").exists()


def test_reshard_counts_uids_without_images(tmp_path):
    samples = write_pool(tmp_path / "pool", n=20)
    ghost = "f" * 32
    summary = reshard(tmp_path / "pool", uids_to_array([samples[1].uid, ghost]), tmp_path / "train", 10)
    assert summary.missing_uids == 1 and summary.samples_written == 1


def test_reshard_rejects_empty_subset_and_missing_pool(tmp_path):
    write_pool(tmp_path / "pool", n=10)
    with pytest.raises(ValueError, match="empty"):
        reshard(tmp_path / "pool", uids_to_array([]), tmp_path / "train", 10)
    with pytest.raises(FileNotFoundError, match="pool_shards"):
        reshard(tmp_path / "nowhere", uids_to_array(["0" * 32]), tmp_path / "train", 10)


MINI = replace(SCALES["tiny"], samples_seen=256, global_batch=32, checkpoints=2, warmup=2)


def test_argv_carries_the_fixed_recipe():
    argv = TrainJob(SCALES["small"], "x/{0..1}.tar", tmp := __import__("pathlib").Path("/l"), "n").argv()
    flag = lambda name: argv[argv.index(name) + 1]  # noqa: E731
    assert flag("--batch-size") == "4096" and flag("--lr") == "0.0005" and flag("--beta2") == "0.98"
    assert flag("--wd") == "0.2" and flag("--eps") == "1e-06" and flag("--warmup") == "500"
    assert flag("--train-num-samples") == str(12_800_000 // 5) and flag("--epochs") == "5"
    assert "--dataset-resampled" in argv and "--local-loss" in argv and "--gather-with-grad" in argv
    assert str(tmp) in argv


def test_open_clip_trainer_trains_and_resumes(tmp_path):
    write_pool(tmp_path / "pool", n=64, per_shard=16)
    job = TrainJob(MINI, str(tmp_path / "pool" / "{00000000..00000003}.tar"), tmp_path / "logs", "run")
    first = train(replace(job, scale=replace(MINI, checkpoints=2)), log=lambda m: None)
    assert first.checkpoint.exists() and completed_epochs(job) == 2
    assert first.losses and all(np.isfinite(loss) for _, loss in first.losses)
    # The checkpoint loads with weights_only=True and the model runs.
    model, preprocess, tokenizer = load_model(MINI.model, first.checkpoint)
    with torch.no_grad():
        assert model.encode_text(tokenizer(["a red circle"])).shape[-1] == 256
    # Remove the last checkpoint as if the run had been killed: training resumes from epoch 1.
    first.checkpoint.unlink()
    resumed = train(job, log=lambda m: None)
    assert resumed.resumed_from_epoch == 1 and resumed.checkpoint.exists()
    # A finished run is not trained again.
    assert train(job, log=lambda m: None).seconds == 0.0


def test_reshard_blurs_faces_listed_in_the_metadata(tmp_path):
    samples = write_pool(tmp_path / "pool", n=10)
    pool = {json.loads(f["json"])["uid"]: f["jpg"] for _, f in iter_webdataset(tmp_path / "pool" / "00000000.tar")}
    chosen = [samples[1].uid, samples[2].uid]
    summary = reshard(tmp_path / "pool", uids_to_array(chosen), tmp_path / "train", 10,
                      face_bboxes={samples[1].uid: [[0.2, 0.2, 0.8, 0.8]]})
    out = {json.loads(f["json"])["uid"]: f["jpg"] for tar in sorted((tmp_path / "train").glob("*.tar"))
           for _, f in iter_webdataset(tar)}
    assert summary.faces_blurred == 1
    assert out[samples[1].uid] != pool[samples[1].uid] and out[samples[2].uid] == pool[samples[2].uid]
