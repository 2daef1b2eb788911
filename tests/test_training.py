"""Resharding writes exactly the subset's samples; open_clip's trainer really trains and resumes."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from datacomp_assets.core.models import forward_check, load_model
from datacomp_assets.core.scales import SCALES
from datacomp_assets.core.shards import iter_webdataset, write_webdataset
from datacomp_assets.core.trainer import (
    TrainJob, accumulation_steps, completed_epochs, discard_unreadable_checkpoints, read_curve, train,
)
from datacomp_assets.core.uids import uids_to_array
from datacomp_assets.training.reshard import reshard
from datacomp_assets.world.web import encode_jpeg, render, sample


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


MINI = replace(SCALES["tiny"], samples_seen=256, global_batch=32, epochs=2, warmup=2)


def test_argv_carries_the_fixed_recipe():
    argv = TrainJob(SCALES["small"], "x/{0..1}.tar", tmp := __import__("pathlib").Path("/l"), "n").argv()
    flag = lambda name: argv[argv.index(name) + 1]  # noqa: E731
    assert flag("--batch-size") == "4096" and flag("--lr") == "0.0005" and flag("--beta2") == "0.98"
    assert flag("--wd") == "0.2" and flag("--eps") == "1e-06" and flag("--warmup") == "500"
    assert flag("--train-num-samples") == str(12_800_000 // 5) and flag("--epochs") == "5"
    assert "--dataset-resampled" in argv and "--local-loss" in argv and "--gather-with-grad" in argv
    assert str(tmp) in argv


def open_clip_args(job: TrainJob):
    """The job's flags as the installed open_clip parses them (an unknown flag fails here)."""
    from open_clip_train.params import parse_args

    return parse_args(job.argv())


def open_clip_steps_per_epoch(args, world_size: int) -> int:
    """Optimizer steps per "epoch" as open_clip counts them with --dataset-resampled: micro-batches of
    batch size x world size, rounded up to a multiple of the workers (open_clip_train/data.py,
    get_wds_dataset), floor-divided by --accum-freq (train.py, train_one_epoch)."""
    import math

    micro_batches = math.ceil(args.train_num_samples / (args.batch_size * world_size))
    workers = max(1, args.workers)
    micro_batches = math.ceil(micro_batches / workers) * workers
    return micro_batches // args.accum_freq


def test_fewer_gpus_than_the_reference_accumulate_to_the_global_batch():
    small = SCALES["small"]
    one_gpu = TrainJob(small, "x/{0..1}.tar", Path("/l"), "n", device="cuda", nproc=1,
                       accum_freq=accumulation_steps(small.global_batch, small.reference_gpus, 1))
    args = open_clip_args(one_gpu)
    assert args.accum_freq == 8 and args.batch_size == 512
    assert one_gpu.argv()[one_gpu.argv().index("--accum-freq") + 1] == "8"
    eight_gpus = TrainJob(small, "x/{0..1}.tar", Path("/l"), "n", device="cuda", nproc=8,
                          accum_freq=accumulation_steps(small.global_batch, small.reference_gpus, 8))
    assert "--accum-freq" not in eight_gpus.argv() and open_clip_args(eight_gpus).batch_size == 512
    xlarge = SCALES["xlarge"]
    assert accumulation_steps(xlarge.global_batch, xlarge.reference_gpus, 8) == 64
    assert open_clip_args(TrainJob(xlarge, "x", Path("/l"), "n", device="cuda", nproc=8, accum_freq=64)
                          ).batch_size == 176
    assert accumulation_steps(8192, 32, 8) == 4 and accumulation_steps(8192, 32, 64) == 1
    assert accumulation_steps(90_112, 512, 11) == 64  # 11 x 47 >= 512 does not divide 90,112; 11 x 64 does
    # open_clip's effective global batch is micro-batch x processes x accumulation steps: the recipe's.
    for job in (one_gpu, eight_gpus):
        args = open_clip_args(job)
        assert args.batch_size * job.nproc * args.accum_freq == small.global_batch


def test_the_steps_and_samples_seen_do_not_depend_on_how_the_batch_is_split():
    # medium's budget per checkpoint (16,000,000) is not a whole number of global batches: open_clip would
    # drop a step per checkpoint with accumulation unless it is given whole global batches.
    for name in ("small", "medium", "large", "xlarge"):
        scale = SCALES[name]
        recipe_steps = -(-(scale.samples_seen // scale.epochs) // scale.global_batch)
        for nproc in (1, 2, 8):
            for workers in (1, 3):
                accum = accumulation_steps(scale.global_batch, scale.reference_gpus, nproc)
                job = TrainJob(scale, "x", Path("/l"), "n", device="cuda", nproc=nproc, accum_freq=accum,
                               workers=workers)
                steps = open_clip_steps_per_epoch(open_clip_args(job), nproc)
                assert steps == job.steps_per_checkpoint, (name, nproc, workers)
                assert job.samples_seen == scale.epochs * steps * scale.global_batch
                if workers == 1:
                    assert steps == recipe_steps, (name, nproc)


def test_a_global_batch_no_gpu_count_splits_is_refused_with_the_numbers():
    with pytest.raises(ValueError, match=r"global batch 4096 .* 3 GPU processes.*3 x k >= 8"):
        accumulation_steps(4096, 8, 3)
    with pytest.raises(ValueError, match="global batch 90112 .* 6 GPU processes"):
        accumulation_steps(90_112, 512, 6)
    with pytest.raises(ValueError, match="4096 of scale small .* 3 processes x 1"):
        TrainJob(SCALES["small"], "x", Path("/l"), "n", device="cuda", nproc=3)


def test_the_accelerator_accumulates_on_fewer_gpus(monkeypatch):
    from resources import AcceleratorResource

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    job = AcceleratorResource().train_job(SCALES["small"], "x", Path("/l"), "n")
    assert (job.device, job.nproc, job.accum_freq, job.micro_batch) == ("cuda", 1, 8, 512)
    job = AcceleratorResource(gpus=8).train_job(SCALES["small"], "x", Path("/l"), "n")
    assert (job.nproc, job.accum_freq, job.micro_batch) == (8, 1, 512)
    assert "torch.distributed.run" in job.command() and "--nproc_per_node=8" in job.command()
    with pytest.raises(ValueError, match="scale 'small'.*3 GPU processes"):
        AcceleratorResource(gpus=3).train_job(SCALES["small"], "x", Path("/l"), "n")


def test_a_gpu_scale_on_the_cpu_is_refused_unless_opted_in():
    from resources import AcceleratorResource

    with pytest.raises(ValueError) as refused:
        AcceleratorResource(device="cpu").train_job(SCALES["small"], "x", Path("/l"), "n")
    message = str(refused.value)
    for words in ("'small'", "no GPU is visible", "12,800,000 samples", "far too long", "allow_cpu_training: true",
                  "accelerator", "GPU"):
        assert words in message
    opted_in = AcceleratorResource(device="cpu", allow_cpu_training=True).train_job(
        SCALES["small"], "x", Path("/l"), "n")
    assert (opted_in.device, opted_in.accum_freq, opted_in.micro_batch) == ("cpu", 1, 4096)
    assert "--accum-freq" not in opted_in.argv()
    tiny = AcceleratorResource(device="cpu", cpu_processes=2).train_job(SCALES["tiny"], "x", Path("/l"), "n")
    assert (tiny.device, tiny.nproc, tiny.accum_freq) == ("cpu", 2, 1)


def test_open_clip_trainer_trains_and_resumes(tmp_path):
    write_pool(tmp_path / "pool", n=64, per_shard=16)
    job = TrainJob(MINI, str(tmp_path / "pool" / "{00000000..00000003}.tar"), tmp_path / "logs", "run")
    first = train(replace(job, scale=replace(MINI, epochs=2)), log=lambda m: None)
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


def test_accumulated_micro_batches_train_in_whole_global_batches(tmp_path):
    """open_clip's --accum-freq as the trainer passes it: steps of the global batch, to the same samples seen.
    (webdataset's sample shuffle is not seeded, so the losses of two runs cannot be compared exactly.)"""
    write_pool(tmp_path / "pool", n=64, per_shard=16)
    scale = replace(MINI, epochs=1)
    job = TrainJob(scale, str(tmp_path / "pool" / "{00000000..00000003}.tar"), tmp_path / "logs", "run", accum_freq=2)
    assert job.argv()[job.argv().index("--batch-size") + 1] == str(scale.global_batch // 2)
    result = train(job, log=lambda m: None)
    assert result.checkpoint.exists() and forward_check(scale.model, result.checkpoint) is None
    # 8 steps of 32 (not 16 of 16): open_clip logs steps 1, 6 and the last, in samples seen.
    assert [s for s, _ in result.losses] == [32, 192, 256] and job.samples_seen == scale.samples_seen == 256
    assert all(np.isfinite(loss) for _, loss in result.losses)


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


def test_reshard_reuses_finished_shards_for_the_same_subset(tmp_path):
    samples = write_pool(tmp_path / "pool", n=30)
    chosen = uids_to_array([s.uid for s in samples[::2]])
    first = reshard(tmp_path / "pool", chosen, tmp_path / "train", 10)
    shard = tmp_path / "train" / "00000000.tar"
    before = shard.stat().st_mtime_ns
    assert reshard(tmp_path / "pool", chosen, tmp_path / "train", 10) == first
    assert shard.stat().st_mtime_ns == before  # reused, not rewritten
    other = reshard(tmp_path / "pool", chosen[:3], tmp_path / "train", 10)
    assert other.samples_written == 3 and sorted(read_uids(tmp_path / "train")) == sorted(
        json.loads(f["json"])["uid"] for tar in sorted((tmp_path / "train").glob("*.tar")) for _, f in iter_webdataset(tar))


KILLABLE = replace(MINI, samples_seen=768, epochs=3)

TRAIN_IN_CHILD = """
import sys
from dataclasses import replace
from pathlib import Path
from datacomp_assets.core.scales import SCALES
from datacomp_assets.core.trainer import TrainJob, train
scale = replace(SCALES["tiny"], samples_seen=768, global_batch=32, epochs=3, warmup=2)
train(TrainJob(scale, sys.argv[1], Path(sys.argv[2]), "run"), log=print)
"""


def readable(path) -> bool:
    try:
        torch.load(path, map_location="cpu", weights_only=True)
        return True
    except Exception:
        return False


def live_trainers(logs_dir) -> list[int]:
    """pids of processes whose command line names this run's log directory."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(logs_dir).encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def test_a_killed_run_resumes_from_its_latest_checkpoint_to_the_same_samples_seen(tmp_path):
    write_pool(tmp_path / "pool", n=64, per_shard=16)
    data, logs = str(tmp_path / "pool" / "{00000000..00000003}.tar"), tmp_path / "logs"
    job = TrainJob(KILLABLE, data, logs, "run")
    # The orchestrator (here a child python running train()) is killed outright once the first checkpoint exists.
    orchestrator = subprocess.Popen([sys.executable, "-c", TRAIN_IN_CHILD, data, str(logs)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    cwd=Path(__file__).parents[1])
    first = job.checkpoint_dir / "epoch_1.pt"
    deadline = time.time() + 180
    while not readable(first) and time.time() < deadline and orchestrator.poll() is None:
        time.sleep(0.2)
    assert readable(first), "the first checkpoint never appeared"
    orchestrator.send_signal(signal.SIGKILL)
    orchestrator.wait()
    assert completed_epochs(job) < KILLABLE.epochs, "the run finished before it could be killed"
    # The trainer died with its orchestrator: nothing is left writing into the run's directory.
    deadline = time.time() + 10
    while live_trainers(logs) and time.time() < deadline:
        time.sleep(0.2)
    assert not live_trainers(logs)

    resumed = train(job, log=lambda m: None)
    assert 1 <= resumed.resumed_from_epoch < KILLABLE.epochs  # not from scratch
    assert completed_epochs(job) == KILLABLE.epochs
    state = torch.load(resumed.checkpoint, map_location="cpu", weights_only=True)
    assert state["epoch"] == KILLABLE.epochs
    # The loss curve covers the whole budget, before and after the kill, and ends at the same samples seen.
    seen = [s for s, _ in resumed.losses]
    assert seen[0] < KILLABLE.samples_seen // KILLABLE.epochs <= seen[-1] <= job.samples_seen
    assert max(seen) == max(s for s, _ in read_curve(job.log_file))


def test_unreadable_latest_checkpoint_is_set_aside(tmp_path):
    job = TrainJob(MINI, "unused", tmp_path / "logs", "run")
    job.checkpoint_dir.mkdir(parents=True)
    torch.save({"epoch": 1, "state_dict": {"w": torch.zeros(2)}}, job.checkpoint_dir / "epoch_1.pt")
    (job.checkpoint_dir / "epoch_2.pt").write_bytes(b"PK\x03\x04 cut short by a kill")
    os.utime(job.checkpoint_dir / "epoch_2.pt", (time.time() + 5, time.time() + 5))
    discard_unreadable_checkpoints(job, log=lambda m: None)
    assert completed_epochs(job) == 1
    assert (job.checkpoint_dir / "epoch_2.pt.unreadable").exists()


def test_a_second_trainer_on_the_same_directory_is_refused(tmp_path, monkeypatch):
    import fcntl

    from datacomp_assets.core import trainer

    monkeypatch.setattr(trainer, "LOCK_WAIT_SECONDS", 1.0)
    job = TrainJob(MINI, "unused", tmp_path / "logs", "run")
    job.logs_dir.mkdir(parents=True)
    with open(job.logs_dir / "run.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(RuntimeError, match="another training process"):
            train(job, log=lambda m: None)


def test_two_cpu_processes_train_on_gloo(tmp_path):
    write_pool(tmp_path / "pool", n=64, per_shard=16)
    job = TrainJob(replace(MINI, epochs=1), str(tmp_path / "pool" / "{00000000..00000003}.tar"),
                   tmp_path / "logs", "run", nproc=2, threads=1)
    assert job.argv()[job.argv().index("--batch-size") + 1] == str(MINI.global_batch // 2)
    lines = []
    result = train(job, log=lines.append)
    assert "torch.distributed.run" in lines[0] and "gloo" in lines[0]
    assert result.checkpoint.exists() and result.losses
    # Distributed checkpoints carry a `module.` prefix; they still load safely and run.
    assert forward_check(MINI.model, result.checkpoint) is None


def test_forward_check_reports_a_broken_checkpoint(tmp_path):
    bad = tmp_path / "epoch_1.pt"
    bad.write_bytes(b"not a checkpoint")
    assert "Error" in forward_check(MINI.model, bad)
    wrong = tmp_path / "wrong.pt"
    torch.save({"state_dict": {"visual.nothing": torch.zeros(1)}}, wrong)
    assert forward_check(MINI.model, wrong)


def test_an_intermediate_checkpoint_set_aside_does_not_fail_a_finished_training(tmp_path):
    """The stuck state: epoch_1.pt cut short after epoch_2.pt was written. Resuming sets epoch_1 aside and trains
    no further (epoch_2 is final); the check must pass on the final checkpoints and report what was set aside,
    not fail on a count of files that re-materializing can never restore."""
    import open_clip

    from datacomp_assets.core.layout import Layout
    from datacomp_assets.core.models import register_model_configs
    from datacomp_assets.core.trainer import discard_unreadable_checkpoints
    from datacomp_assets.training.verify import verify_checkpoints

    register_model_configs()
    scale = replace(SCALES["tiny"], epochs=2, seeds=(0,))
    layout = Layout(tmp_path)
    ckpt_dir = layout.seed_checkpoint_dir("tiny", "basic", 0)
    ckpt_dir.mkdir(parents=True)
    state = {"epoch": 1, "state_dict": open_clip.create_model(scale.model, pretrained=None).state_dict()}
    torch.save(state, ckpt_dir / "epoch_1.pt")
    torch.save({**state, "epoch": 2}, ckpt_dir / "epoch_2.pt")
    assert verify_checkpoints(layout, scale, "basic", forward_check)[0]

    truncated = ckpt_dir / "epoch_1.pt"
    truncated.write_bytes(truncated.read_bytes()[:5000])  # the newest file now, by its mtime
    job = TrainJob(scale, "unused", layout.training_logs("tiny", "basic"), "seed_0")
    assert [p.name for p in discard_unreadable_checkpoints(job, log=lambda m: None)] == ["epoch_1.pt"]
    passed, findings = verify_checkpoints(layout, scale, "basic", forward_check)
    assert passed and findings["set_aside_unreadable"] == ["seed_0/checkpoints/epoch_1.pt.unreadable"]

    (ckpt_dir / "epoch_2.pt").unlink()  # without its final checkpoint a seed fails, saying how to repair it
    passed, findings = verify_checkpoints(layout, scale, "basic", forward_check)
    assert not passed and findings["final_checkpoints_missing"] == ["seed_0/checkpoints/epoch_2.pt"]
    assert "materialize checkpoint again" in findings["fix"]
