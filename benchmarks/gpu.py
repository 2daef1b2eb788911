"""The prepared GPU check: the GPU-bound steps on CUDA, each beside its baseline, in one run of about 5 minutes.

    .venv/bin/python benchmarks/gpu.py [--json-out FILE] [--budget-seconds 420] [--sections kmeans,...,training]
    .venv/bin/python benchmarks/gpu.py --force-cpu-dry-run     # the same code on the CPU at miniature sizes

On a machine where torch sees no CUDA device it prints `{"cuda": false, ...}` and exits 0. Otherwise, in a
temporary work directory (removed at the end):

0. `data`: synthetic training shards as the small scale's pool holds them (jpg at the recipe's 512-px download
   size, txt, json with a uid), and a seeded random-init ViT-B/32 checkpoint for the scoring sections;
1. `kmeans`: faiss k-means of one sample (unit-norm 768-d rows), with the pipeline's settings
   (`image_based.train_centroids`: L2, seed 0, no faiss sub-sampling): on the CPU (`faiss.Kmeans(gpu=False)`)
   against the pipeline's own call, which uses every GPU faiss can see (faiss-gpu) and the CPU otherwise;
   seconds and the k-means objective (mean squared distance to the nearest centroid) of both;
2. `image_scores`: `filtering.image_scores.score_shards` with the checkpoint on the CPU and on CUDA over the
   same shards: images/s and the largest difference of a score;
3. `evaluation`: `zeroshot.evaluate_checkpoint` on the tiny suite with the checkpoint, CPU against CUDA:
   images/s and the largest difference of a metric;
4. `reference`: a stand-in of one of DataComp's tasks (cifar10, in `download_evalsets.py`'s layout): our
   evaluator on the CPU and on CUDA, and, where `clip_benchmark` is importable, the reference's own
   classification (DataComp's `eval_utils/wds_eval.py` calls, on CUDA): the largest difference of a metric;
5. `training`: the small recipe (ViT-B/32, global batch 4,096, `amp`, the accumulation and gradient
   checkpointing the `accelerator` resource picks, every GPU, torchrun for several) for `--train-steps`
   optimizer steps through the project's trainer (`trainer.train`, the `checkpoint` asset's path) against a
   bare `open_clip_train.main` with the same argv (torchrun too for several GPUs); samples/s parsed from both
   open_clip logs as benchmarks/training.py does. Last, as the longest: it gets what is left of the budget.

Each side of a comparison runs in a fresh spawned process, so CUDA state, a crash or a hang stays there, and one
section's failure is recorded in its entry (`ok: false`, `error`) while the others still run. Prints progress
lines on stderr and one JSON object on stdout (written after each section to `--json-out` too, so a run cut
short by an outer timeout leaves what it had). With `--force-cpu-dry-run` the "accelerator" side is the CPU
and the sizes are miniatures (the tiny scale's model instead of ViT-B/32; the training with the GPU job's amp,
accumulation and gradient checkpointing flags): every code path runs, and none of its numbers is a measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import queue as queue_module
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from process_tree import descendants  # noqa: E402  (beside this script)

SPAWN = multiprocessing.get_context("spawn")
SCORE_COLUMN = "dfn_score"
# DataComp's requirements.txt pins it; 1.6's CPU autocast (bf16) breaks wds_eval.py's calls on a CPU.
CLIP_BENCHMARK_PIN = "1.4.0"
REFERENCE_TASK = "cifar10"  # a stand-in of one of DataComp's 38, with acc5 (10 classes)
CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
WORDS = ("a photo of the red blue green small large old new dog cat house car tree beach city street man woman "
         "flower mountain sky sunset table chair vintage modern design pattern art print poster").split()


@dataclass(frozen=True)
class Sizes:
    model: str                # the small recipe's ViT-B-32 (also the DFN architecture image_scores runs)
    train_steps: int          # optimizer steps of each training run (rounded up to a multiple of the workers)
    global_batch: int         # 0: the recipe's
    train_images: int         # distinct samples in the training shards (resampled by open_clip)
    shards: int
    image_size: int           # longest side of a training image (the small scale's img2dataset size: 512)
    score_shards: int         # of the training shards, how many image_scores scores
    kmeans_rows: int
    kmeans_dim: int
    kmeans_k: int
    kmeans_niter: int
    eval_size_scale: float    # of the tiny suite (1.0: 3,524 test images)
    eval_tasks: tuple[str, ...]  # of the tiny suite; empty: all 13
    reference_images: int
    side_timeout: float       # seconds one side of a scoring comparison may take


# Sized for one H200 and 16 cores: about 5 minutes in all.
FULL = Sizes(model="ViT-B-32", train_steps=24, global_batch=0, train_images=4096, shards=16, image_size=512,
             score_shards=4, kmeans_rows=200_000, kmeans_dim=768, kmeans_k=2_000, kmeans_niter=20, eval_size_scale=0.25,
             eval_tasks=(), reference_images=500, side_timeout=150)
# The same code on a CPU in a few minutes, with the miniature model (ViT-B/32 takes minutes a step on 2 cores,
# in the GPU job's fp16 autocast): nothing measured.
DRY = Sizes(model="datacomp-tiny", train_steps=2, global_batch=8, train_images=32, shards=2, image_size=128,
            score_shards=1, kmeans_rows=4_000, kmeans_dim=64, kmeans_k=16, kmeans_niter=5, eval_size_scale=0.05,
            eval_tasks=("counting", "retrieval"), reference_images=40, side_timeout=300)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- each side in a process of its own

def _child(results, fn, args) -> None:
    try:
        results.put(("ok", fn(*args)))
    except BaseException:
        results.put(("error", traceback.format_exc()))


def kill_tree(pid: int, include_self: bool = True) -> None:
    """SIGKILL every process below `pid` (the trainers this run started), deepest last seen first."""
    for p in reversed(descendants(pid)[0 if include_self else 1:]):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def in_child(fn, *args, timeout: float):
    """fn(*args) in a fresh spawned process and its return value; RuntimeError if it raised, died (a segfault)
    or ran past `timeout` seconds (then it and everything it started are killed)."""
    results = SPAWN.Queue()
    proc = SPAWN.Process(target=_child, args=(results, fn, args))  # not a daemon: DataLoader workers need that
    proc.start()
    deadline, returned = time.monotonic() + timeout, False
    try:
        while True:
            try:
                kind, value = results.get(timeout=1.0)
                break
            except queue_module.Empty:
                if not proc.is_alive():
                    try:  # it may have put its result just before exiting
                        kind, value = results.get(timeout=1.0)
                        break
                    except queue_module.Empty:
                        raise RuntimeError(f"{fn.__name__} died (exit code {proc.exitcode}) before it returned") \
                            from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{fn.__name__} ran past its {timeout:.0f} s and was killed")
        returned = True
    finally:
        if returned:  # a moment to exit on its own
            proc.join(timeout=30)
        if proc.is_alive():
            kill_tree(proc.pid)
            proc.join()
    if kind == "error":
        raise RuntimeError(f"{fn.__name__} failed:\n{value}")
    return value


@contextmanager
def watchdog(seconds: float, fired: list):
    """Kill every process this one started if the block runs past `seconds`; `fired` gets True if it did."""
    def fire() -> None:
        fired.append(True)
        kill_tree(os.getpid(), include_self=False)

    timer = threading.Timer(max(1.0, seconds), fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


# ---------------------------------------------------------------- the machine

def machine_facts() -> dict:
    """Versions and devices; what open_clip_train, faiss-gpu and clip_benchmark need if they are missing."""
    import torch

    facts: dict = {"python": platform.python_version(), "cpus": os.cpu_count(), "torch": torch.__version__,
                   "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if facts["cuda_available"]:
        facts["gpu_count"] = torch.cuda.device_count()
        facts["gpus"] = [torch.cuda.get_device_name(i) for i in range(facts["gpu_count"])]
        facts["cudnn"] = torch.backends.cudnn.version()
    try:
        import open_clip
        facts["open_clip"] = open_clip.__version__
    except Exception as error:  # noqa: BLE001 - recorded, not fatal
        facts["open_clip"] = f"not importable: {error}"
    try:
        import open_clip_train.main  # noqa: F401 - ships in the open_clip_torch wheel; needs its training extras
        facts["open_clip_train"] = {"importable": True, "path": str(Path(open_clip_train.main.__file__).parent)}
    except Exception as error:  # noqa: BLE001
        facts["open_clip_train"] = {"importable": False, "error": f"{type(error).__name__}: {error}",
                                    "needed": "pip install 'open_clip_torch[training]==3.3.0' (the wheel ships "
                                              "open_clip_train; the extra brings webdataset, pandas, fsspec)"}
    try:
        import faiss
        facts["faiss"] = {"version": faiss.__version__, "gpus": _faiss_gpu_count(faiss)}
    except Exception as error:  # noqa: BLE001
        facts["faiss"] = {"error": f"{type(error).__name__}: {error}"}
    facts["clip_benchmark"] = _clip_benchmark_version()
    return facts


def _faiss_gpu_count(faiss) -> int:
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def _clip_benchmark_version() -> str | None:
    try:
        import importlib.metadata

        import clip_benchmark  # noqa: F401
        return importlib.metadata.version("clip_benchmark")
    except Exception:  # noqa: BLE001 - absent
        return None


# ---------------------------------------------------------------- section 0: the data

def _training_sample(task: tuple[int, int]) -> tuple[str, dict[str, bytes]]:
    """One pair as img2dataset leaves it at the small scale: a jpg whose longest side is the download size
    (smooth colour fields plus noise, so that it compresses like a photo rather than like flat colour), its
    caption and a json record with a uid."""
    import numpy as np
    from PIL import Image

    from datacomp_assets.world.web import encode_jpeg

    index, size = task
    rng = np.random.default_rng(index)
    short = int(size * rng.uniform(0.66, 1.0))
    width, height = (size, short) if index % 2 else (short, size)
    coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    pixels = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.float32)
    pixels += rng.normal(0.0, 6.0, pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    caption = " ".join(rng.choice(WORDS, int(rng.integers(3, 16))))
    uid = f"{index:032x}"
    return f"{index:09d}", {"jpg": encode_jpeg(image, 95), "txt": caption.encode(),
                            "json": json.dumps({"uid": uid, "caption": caption}).encode()}


def write_training_shards(directory: Path, sizes: Sizes) -> dict:
    from datacomp_assets.core.shards import brace_pattern, write_webdataset

    directory.mkdir(parents=True)
    per_shard = -(-sizes.train_images // sizes.shards)
    with SPAWN.Pool(os.cpu_count() or 1) as pool:
        for shard in range(sizes.shards):
            tasks = [(i, sizes.image_size) for i in range(shard * per_shard,
                                                          min(sizes.train_images, (shard + 1) * per_shard))]
            write_webdataset(directory / f"{shard:08d}.tar", pool.imap(_training_sample, tasks, chunksize=8))
    size = sum(p.stat().st_size for p in directory.glob("*.tar"))
    return {"pattern": brace_pattern(directory, sizes.shards), "shards": sizes.shards,
            "samples": sizes.train_images, "image_size": sizes.image_size, "bytes": size,
            "mean_sample_kb": round(size / sizes.train_images / 1024, 1)}


def write_seeded_checkpoint(model_name: str, path: str) -> dict:
    """The model with seed-0 random weights, made on the CPU, so that both devices score the same model."""
    import torch

    from datacomp_assets.core.models import load_model

    torch.manual_seed(0)
    model, _, _ = load_model(model_name, None, "cpu")
    torch.save({"state_dict": model.state_dict()}, path)
    return {"path": path, "bytes": Path(path).stat().st_size}


# ---------------------------------------------------------------- section 1: k-means

def kmeans_sample(rows: int, dim: int, clusters: int):
    """Unit-norm float32 rows around `clusters` random directions (as benchmarks/filters.py makes them)."""
    import numpy as np

    rng = np.random.default_rng(0)
    centers = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centers[rng.integers(0, clusters, rows)] + 1.5 * rng.standard_normal((rows, dim), np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def kmeans_objective(x, centroids) -> float:
    """Mean squared L2 distance of each row to its nearest centroid: what k-means minimises."""
    import faiss

    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(centroids)
    distances, _ = index.search(x, 1)
    return float(distances.mean())


def kmeans_on(side: str, rows: int, dim: int, k: int, niter: int) -> dict:
    """`cpu`: faiss on the CPU with the pipeline's settings; `pipeline`: image_based.train_centroids itself
    (every GPU faiss sees, else the CPU)."""
    import faiss

    from datacomp_assets.filtering.image_based import train_centroids

    x = kmeans_sample(rows, dim, k)
    start = time.perf_counter()
    if side == "cpu":
        kmeans = faiss.Kmeans(dim, k, niter=niter, seed=0, spherical=False, verbose=False,
                              max_points_per_centroid=rows, gpu=False)  # rows per centroid: no sub-sampling
        kmeans.train(x)
        centroids = kmeans.centroids
    else:
        centroids = train_centroids(x, k, niter=niter, seed=0)
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 2), "objective": kmeans_objective(x, centroids),
            "faiss_gpus": _faiss_gpu_count(faiss),
            "threads": faiss.omp_get_max_threads()}


def bench_kmeans(sizes: Sizes) -> dict:
    settings = (sizes.kmeans_rows, sizes.kmeans_dim, sizes.kmeans_k, sizes.kmeans_niter)
    cpu = in_child(kmeans_on, "cpu", *settings, timeout=sizes.side_timeout)
    pipeline = in_child(kmeans_on, "pipeline", *settings, timeout=sizes.side_timeout)
    report = {"rows": sizes.kmeans_rows, "dim": sizes.kmeans_dim, "k": sizes.kmeans_k, "niter": sizes.kmeans_niter,
              "cpu": cpu, "pipeline": pipeline,
              "pipeline_device": "gpu" if pipeline["faiss_gpus"] else "cpu",
              "speedup": round(cpu["seconds"] / pipeline["seconds"], 2),
              "objective_relative_difference": round(abs(pipeline["objective"] - cpu["objective"])
                                                     / cpu["objective"], 6)}
    if not pipeline["faiss_gpus"]:
        report["note"] = ("faiss here has no GPU support (a faiss-cpu build): the pipeline's k-means ran on the CPU "
                          "too. To time it on the GPU, replace faiss-cpu with a faiss GPU build "
                          "(pip uninstall faiss-cpu; pip install faiss-gpu-cu12) and run this section again "
                          "(--sections kmeans)")
    return report


# ---------------------------------------------------------------- section 2: image_scores

def scores_on(device: str, model_name: str, shards_dir: str, out_dir: str, checkpoint: str) -> dict:
    import pyarrow.parquet as pq

    from datacomp_assets.core.models import Scorer, load_model
    from datacomp_assets.filtering.image_scores import score_shards

    start = time.perf_counter()
    scorer = Scorer("dfn", *load_model(model_name, checkpoint, device), device)
    loaded = time.perf_counter()
    summary = score_shards(shards_dir, out_dir, scorer, SCORE_COLUMN, log=lambda _: None)
    table = pq.read_table(out_dir, columns=["uid", SCORE_COLUMN]).sort_by("uid")
    return {"images": summary["images_scored"], "load_seconds": round(loaded - start, 2),
            "score_seconds": summary["seconds"], "images_per_second": summary["images_per_second"],
            "uids": table.column("uid").to_pylist(), "scores": table.column(SCORE_COLUMN).to_numpy()}


def sides(device: str) -> list[tuple[str, str]]:
    """(label, device) of the two sides of a comparison: the CPU and the accelerator (in a dry run, the CPU again)."""
    return [("cpu", "cpu"), ("cuda", "cuda") if device == "cuda" else ("cpu_again", "cpu")]


def bench_image_scores(data: dict, work: Path, sizes: Sizes, device: str) -> dict:
    import numpy as np

    shards_dir = work / "score_shards"
    shards_dir.mkdir()
    for tar in sorted(Path(data["shards_dir"]).glob("*.tar"))[:sizes.score_shards]:
        (shards_dir / tar.name).symlink_to(tar)
    (cpu_label, _), (other_label, _) = labels = sides(device)
    results = {label: in_child(scores_on, side, sizes.model, str(shards_dir), str(work / f"scores_{label}"),
                               data["checkpoint"], timeout=sizes.side_timeout) for label, side in labels}
    cpu, other = results[cpu_label], results[other_label]
    if cpu["uids"] != other["uids"]:
        raise RuntimeError("the two devices scored different uids")
    difference = np.abs(cpu["scores"] - other["scores"])
    report = {"model": sizes.model, "column": SCORE_COLUMN, "images": cpu["images"]}
    for label, result in results.items():
        report[label] = {k: v for k, v in result.items() if k not in ("uids", "scores")}
    report.update(speedup=round(other["images_per_second"] / cpu["images_per_second"], 2),
                  max_score_difference=float(difference.max()), mean_score_difference=float(difference.mean()))
    return report


# ---------------------------------------------------------------- sections 3-4: the evaluation

def evaluation_on(device: str, model_name: str, suite_root: str, out_jsonl: str, checkpoint: str,
                  tasks: list[str] | None, reference_registry: bool) -> dict:
    from datacomp_assets.core.reference_tasks import REFERENCE_TASKS
    from datacomp_assets.evaluation.zeroshot import evaluate_checkpoint

    start = time.perf_counter()
    rows = evaluate_checkpoint(model_name, checkpoint, suite_root, out_jsonl, device=device, tasks=tasks,
                               registry=REFERENCE_TASKS if reference_registry else None)
    return {"seconds": round(time.perf_counter() - start, 2), "rows": rows}


def numeric_metrics(rows: list[dict]) -> dict[tuple[str, str], float | None]:
    """(task, metric) -> value for every number of every results line (None for null and NaN)."""
    out = {}
    for row in rows:
        for name, value in row["metrics"].items():
            if isinstance(value, bool) or not isinstance(value, (int, float, type(None))):
                continue
            out[row["key"], name] = None if value is None or not math.isfinite(value) else float(value)
    return out


def largest_difference(a: dict, b: dict) -> dict:
    """The largest absolute difference between two sets of metrics, where; and keys or nulls that differ."""
    worst, where, mismatched = 0.0, None, sorted(f"{t}/{m}" for t, m in set(a) ^ set(b))
    for key in sorted(set(a) & set(b)):
        if (a[key] is None) != (b[key] is None):
            mismatched.append(f"{key[0]}/{key[1]}")
        elif a[key] is not None and abs(a[key] - b[key]) >= worst:
            worst, where = abs(a[key] - b[key]), f"{key[0]}/{key[1]}"
    return {"max_metric_difference": worst, "at": where, "compared": len(set(a) & set(b)),
            "mismatched": mismatched}


def bench_evaluation(data: dict, work: Path, sizes: Sizes, device: str) -> dict:
    from datacomp_assets.world.eval_suite import build_suite

    suite_root = work / "tiny_suite"
    counts = build_suite(suite_root, list(sizes.eval_tasks) or None, size_scale=sizes.eval_size_scale)
    images = sum(counts.values())
    (cpu_label, _), (other_label, _) = labels = sides(device)
    results = {label: in_child(evaluation_on, side, sizes.model, str(suite_root), str(work / f"eval_{label}.jsonl"),
                               data["checkpoint"], list(counts), False, timeout=sizes.side_timeout)
               for label, side in labels}
    report = {"model": sizes.model, "tasks": len(counts), "test_images": images, "size_scale": sizes.eval_size_scale}
    for label, result in results.items():
        report[label] = {"seconds": result["seconds"], "images_per_second": round(images / result["seconds"], 1),
                         "main_metrics": {r["key"]: r["metrics"]["main_metric"] for r in result["rows"]}}
    report["speedup"] = round(results[cpu_label]["seconds"] / results[other_label]["seconds"], 2)
    report.update(largest_difference(numeric_metrics(results[cpu_label]["rows"]),
                                     numeric_metrics(results[other_label]["rows"])))
    return report


def write_reference_standin(root: Path, images: int) -> dict:
    """cifar10 as `download_evalsets.py` leaves it (djghosh/wds_cifar10_test): classnames, templates,
    test/nshards.txt and test/{i}.tar of webp + cls samples."""
    import io

    import numpy as np
    from PIL import Image

    from datacomp_assets.core.reference_tasks import REFERENCE_TASKS
    from datacomp_assets.core.shards import write_webdataset

    task_dir = root / REFERENCE_TASKS[REFERENCE_TASK].dir_name
    (task_dir / "test").mkdir(parents=True)
    (task_dir / "classnames.txt").write_text("\n".join(CIFAR10) + "\n")
    (task_dir / "zeroshot_classification_templates.txt").write_text(
        "a photo of a {c}.\na blurry photo of a {c}.\na low contrast photo of the {c}.\n")
    rng = np.random.default_rng(1)
    samples = []
    for i in range(images):
        label = i % len(CIFAR10)
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        pixels[..., label % 3] = np.clip(pixels[..., label % 3].astype(int) + 40 * label, 0, 255)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="WEBP", lossless=True)
        samples.append((f"s{i:07d}", {"webp": buffer.getvalue(), "cls": str(label).encode()}))
    shards = 2
    per_shard = -(-images // shards)
    for shard in range(shards):
        write_webdataset(task_dir / "test" / f"{shard}.tar", samples[shard * per_shard:(shard + 1) * per_shard])
    (task_dir / "test" / "nshards.txt").write_text(f"{shards}\n")
    return {"task": REFERENCE_TASK, "dir": str(task_dir), "images": images, "shards": shards}


def clip_benchmark_on(device: str, model_name: str, task_dir: str, checkpoint: str) -> dict:
    """The reference's classification of one webdataset task: DataComp's eval_utils/wds_eval.py
    (`evaluate_webdataset`) step by step, with clip_benchmark's own loader and metrics."""
    import open_clip
    import torch
    from clip_benchmark.datasets.builder import build_dataset
    from clip_benchmark.metrics import zeroshot_classification as zsc
    from sklearn.metrics import balanced_accuracy_score

    from datacomp_assets.core.models import register_model_configs

    register_model_configs()  # open_clip knows ViT-B-32; the dry run's miniature model is ours
    start = time.perf_counter()
    torch.manual_seed(0)
    model, _, transform = open_clip.create_model_and_transforms(model_name, pretrained=checkpoint)
    model.eval()
    model = model.to(device)
    dataset = build_dataset(dataset_name=f"wds/{REFERENCE_TASK}", root=task_dir, transform=transform,
                            split="test", download=False)
    # No loader workers (the reference has 4): the metrics do not depend on them, and its dataset holds a lambda
    # that a spawned worker cannot be handed.
    dataloader = torch.utils.data.DataLoader(dataset.batched(64), batch_size=None, shuffle=False, num_workers=0)
    classifier = zsc.zero_shot_classifier(model, open_clip.get_tokenizer(model_name), dataset.classes,
                                          dataset.templates, device)
    logits, target = zsc.run_classification(model, classifier, dataloader, device, amp=False)
    pred = logits.argmax(axis=1).cpu()
    target = target.cpu()
    accuracy_from = "clip_benchmark.metrics.zeroshot_classification.accuracy"
    try:
        acc1, acc5 = zsc.accuracy(logits, target, topk=(1, 5))
    except TypeError:  # 1.4.0 calls float() on a 1-element array, which NumPy 2 refuses: its formula, with item()
        top = logits.topk(5, 1, True, True)[1].t()
        correct = top.eq(target.view(1, -1).expand_as(top))
        acc1, acc5 = (correct[:k].reshape(-1).float().sum().item() / len(target) for k in (1, 5))
        accuracy_from = "clip_benchmark's accuracy formula, restated (its float() of an array fails under NumPy 2)"
    metrics = {"acc1": acc1, "acc5": acc5, "mean_per_class_recall": float(balanced_accuracy_score(target, pred))}
    return {"seconds": round(time.perf_counter() - start, 2), "accuracy_from": accuracy_from,
            "rows": [{"key": REFERENCE_TASK, "metrics": metrics}], "logits": logits.numpy(), "labels": target.numpy()}


def reference_side(device: str, model_name: str, root: str, out_jsonl: str, checkpoint: str) -> dict:
    """Our results line for the stand-in, and our logits of its test images (in shard order): a random-weights
    model may put every image in one class, where equal metrics would say little."""
    result = evaluation_on(device, model_name, root, out_jsonl, checkpoint, [REFERENCE_TASK], True)
    try:
        from datacomp_assets.core.models import load_model
        from datacomp_assets.core.reference_tasks import REFERENCE_TASKS
        from datacomp_assets.evaluation.zeroshot import classification_set_logits, read_lines, zero_shot_classifier

        task_dir = Path(root) / REFERENCE_TASKS[REFERENCE_TASK].dir_name
        model, preprocess, tokenizer = load_model(model_name, checkpoint, device=device)
        classifier = zero_shot_classifier(model, tokenizer, read_lines(task_dir / "classnames.txt"),
                                          read_lines(task_dir / "zeroshot_classification_templates.txt"), device)
        logits, labels, _ = classification_set_logits(model, preprocess, classifier, task_dir, 64, device)
        result.update(logits=logits.numpy(), labels=labels.numpy())
    except Exception as error:  # noqa: BLE001 - the evaluator's internals may move; the metrics still compare
        result["logits_error"] = f"{type(error).__name__}: {error}"
    return result


def logits_difference(a: dict, b: dict) -> dict:
    """The largest difference of two sides' logits of the same images, and how many predictions differ."""
    import numpy as np

    if "logits" not in a or "logits" not in b:
        return {"logits": a.get("logits_error") or b.get("logits_error") or "not computed"}
    if not np.array_equal(a["labels"], b["labels"]):
        return {"logits": "not compared: the two sides read the images in different orders"}
    return {"max_logit_difference": float(np.abs(a["logits"] - b["logits"]).max()),
            "predictions_differing": int((a["logits"].argmax(1) != b["logits"].argmax(1)).sum()),
            "distinct_predictions": int(len(np.unique(a["logits"].argmax(1))))}


def bench_reference(data: dict, work: Path, sizes: Sizes, device: str) -> dict:
    root = work / "reference_standins"
    standin = write_reference_standin(root, sizes.reference_images)
    (cpu_label, _), (other_label, _) = labels = sides(device)
    ours = {label: in_child(reference_side, side, sizes.model, str(root), str(work / f"reference_{label}.jsonl"),
                            data["checkpoint"], timeout=sizes.side_timeout) for label, side in labels}
    metrics = {label: numeric_metrics(result["rows"]) for label, result in ours.items()}
    report = {"standin": standin,
              "ours": {label: {metric: value for (_, metric), value in m.items()} for label, m in metrics.items()},
              f"ours_{cpu_label}_against_ours_{other_label}": {
                  **largest_difference(metrics[cpu_label], metrics[other_label]),
                  **logits_difference(ours[cpu_label], ours[other_label])}}
    version = _clip_benchmark_version()
    if version is None:
        report["clip_benchmark"] = ("absent: the reference's numbers were not computed (pip install "
                                    f"clip-benchmark=={CLIP_BENCHMARK_PIN}, DataComp's pin, to compare them); only "
                                    "our numbers on the two devices are compared")
        return report
    result = in_child(clip_benchmark_on, device, sizes.model, standin["dir"], data["checkpoint"],
                      timeout=sizes.side_timeout)
    theirs = numeric_metrics(result["rows"])
    # The reference's three metrics and its logits against ours on the same device.
    report["clip_benchmark"] = {"version": version, "reference_pin": CLIP_BENCHMARK_PIN, "device": device,
                                "seconds": result["seconds"], "accuracy_from": result["accuracy_from"],
                                "metrics": {metric: value for (_, metric), value in theirs.items()},
                                **largest_difference({k: v for k, v in metrics[other_label].items() if k in theirs},
                                                     theirs),
                                **logits_difference(ours[other_label], result)}
    return report


# ---------------------------------------------------------------- section 5: training

# The bare run: open_clip's own entry point with the argv from a file (torchrun's parser refuses `--logs`, a
# prefix of its own `--logs-specs`). Our model configs are registered as benchmarks/training.py does (ViT-B-32
# is open_clip's own; the registration only matters for a miniature model).
BARE_SCRIPT = ("import json, sys\n"
               "from datacomp_assets.core.models import register_model_configs\n"
               "register_model_configs()\n"
               "from open_clip_train.main import main\n"
               "main(json.loads(open(sys.argv[1]).read()))\n")


def training_job(pattern: str, logs_dir: Path, sizes: Sizes, dry_run: bool, workers: int):
    """The job the `checkpoint` asset would make for the small recipe here (the accelerator resource's
    placement), cut to `sizes.train_steps` optimizer steps and one checkpoint, with `workers` data loaders."""
    from datacomp_assets.core.scales import SCALES
    from resources.accelerator import AcceleratorResource

    small = SCALES["small"]
    batch = sizes.global_batch or small.global_batch
    recipe = replace(small, name="small-gpu-check", model=sizes.model, global_batch=batch,
                     samples_seen=sizes.train_steps * batch, epochs=1)
    if not dry_run:
        job = AcceleratorResource().train_job(recipe, pattern, logs_dir, "train")
        return replace(job, workers=workers)
    job = AcceleratorResource(device="cpu", allow_cpu_training=True).train_job(recipe, pattern, logs_dir, "train")
    # On the CPU the resource picks fp32 without accumulation; the dry run runs the GPU job's flags instead.
    return replace(job, precision=recipe.precision, accum_freq=2, grad_checkpointing=True, workers=workers)


def run_ours(job) -> dict:
    from training import _clock, _finish

    from datacomp_assets.core.trainer import train

    start = _clock()
    result = train(job, log=lambda message: log(f"    {message}"))
    figures = _finish(job, start, keep_checkpoint=False)
    figures["trainer_median_samples_per_second"] = result.median_samples_per_second
    return figures


def run_bare(job, script: Path) -> dict:
    from training import _clock, _finish

    from datacomp_assets.core.trainer import _child_env

    job.logs_dir.mkdir(parents=True, exist_ok=True)
    argv_file = job.logs_dir / "bare.argv.json"
    argv_file.write_text(json.dumps(job.argv()))
    command = [sys.executable, str(script), str(argv_file)]
    if job.nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={job.nproc}",
                   str(script), str(argv_file)]
    start = _clock()
    with open(job.logs_dir / "stdout.txt", "w") as out:
        proc = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=_child_env(job.threads))
    if proc.returncode != 0 or not job.final_checkpoint.exists():
        tail = (job.logs_dir / "stdout.txt").read_text(errors="replace").splitlines()[-30:]
        raise RuntimeError(f"bare open_clip run failed (exit code {proc.returncode}):\n" + "\n".join(tail))
    return _finish(job, start, keep_checkpoint=False)


def _log_tail(job, lines: int = 4) -> str:
    """The last lines open_clip logged, to say how far a failed or killed run got."""
    for path in (job.log_file, job.logs_dir / "stdout.txt"):
        if path.exists():
            return "; its log ended: " + " | ".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def train_side_by_side(pattern: str, runs_dir: str, sizes: Sizes, dry_run: bool, workers: int, repeats: int,
                       seconds: float) -> dict:
    """Ours and bare, alternating (ours, bare, bare, ours, ...) `repeats` times; each run gets an equal share of
    `seconds` and is killed past it (recorded, the others still run)."""
    from training import _summary

    from datacomp_assets.core.trainer import TrainJob, _child_env

    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True)
    script = runs_dir / "bare_open_clip.py"
    script.write_text(BARE_SCRIPT)
    # Untimed: the first child to import torch and open_clip reads them from disk, the others from the page cache.
    subprocess.run([sys.executable, "-c", "import open_clip_train.main"], check=True, env=_child_env(),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + seconds
    runs: dict[str, list[dict]] = {"ours": [], "bare": []}
    failures: list[str] = []
    order = [name for r in range(repeats) for name in (("ours", "bare") if r % 2 == 0 else ("bare", "ours"))]
    job = None
    for n, name in enumerate(order):
        job = training_job(pattern, runs_dir / f"{n}_{name}", sizes, dry_run, workers)
        share = (deadline - time.monotonic()) / (len(order) - n)
        log(f"  training {name} #{n // 2 + 1}: {job.steps_per_checkpoint} steps of {job.scale.global_batch} on "
            f"{job.nproc} x {job.device} ({job.precision}, accum {job.accum_freq}), at most {share:.0f} s")
        fired: list = []
        try:
            with watchdog(share, fired):
                figures = run_ours(job) if name == "ours" else run_bare(job, script)
            runs[name].append(figures)
            log(f"    {figures['steady_samples_per_second']} samples/s steady, "
                f"{figures['end_to_end_samples_per_second']} end to end, {figures['wall_seconds']} s")
        except Exception as error:  # noqa: BLE001 - recorded; the other side still runs
            why = f"killed after its {share:.0f} s" if fired else f"{type(error).__name__}: {error}"
            failures.append(f"{name} run {n + 1}: {why}"[:3000] + _log_tail(job))
            log(f"    failed: {failures[-1][:300]}")
            shutil.rmtree(job.checkpoint_dir, ignore_errors=True)
    report: dict = {
        "recipe": {"scale": "small", "model": job.scale.model, "global_batch": job.scale.global_batch,
                   "steps": job.steps_per_checkpoint, "samples_seen": job.samples_seen, "device": job.device,
                   "gpus": job.nproc, "precision": job.precision, "accum_freq": job.accum_freq,
                   "micro_batch": job.micro_batch, "grad_checkpointing": job.grad_checkpointing,
                   "workers": job.workers, "asset_workers": TrainJob.__dataclass_fields__["workers"].default,
                   "torchrun": job.nproc > 1},
        "argv": job.argv(), "failures": failures}
    for name, done in runs.items():
        if done:
            report[name] = _summary(done)
    if runs["ours"] and runs["bare"]:
        for kind in ("steady", "end_to_end", "loop"):
            key = f"{kind}_samples_per_second"
            report[f"overhead_ratio_{kind}"] = round(report["bare"][key] / report["ours"][key], 3)
        report["steady_samples_per_second_per_gpu"] = round(report["ours"]["steady_samples_per_second"]
                                                            / job.nproc, 1)
    if failures and not (runs["ours"] or runs["bare"]):
        raise RuntimeError("; ".join(failures))
    return report


# ---------------------------------------------------------------- the run

class Run:
    """The report and its sections, each timed and fail-soft, within one overall budget of seconds."""

    def __init__(self, report: dict, budget: float, json_out: Path | None):
        self.report, self.json_out = report, json_out
        self.start = time.monotonic()
        self.deadline = self.start + budget

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def section(self, name: str, fn, *needs: str) -> dict | None:
        missing = [n for n in needs if not self.report["sections"].get(n, {}).get("ok")]
        start = time.perf_counter()
        if missing:
            entry = {"ok": False, "skipped": f"needs the {', '.join(missing)} section, which did not succeed"}
        elif self.left() < 20:
            entry = {"ok": False, "skipped": f"the budget was spent ({self.left():.0f} s left)"}
        else:
            log(f"{name}: ({self.left():.0f} s of the budget left)")
            try:
                entry = {"ok": True, **fn()}
            except Exception as error:  # noqa: BLE001 - one section's failure must not stop the others
                entry = {"ok": False, "error": f"{type(error).__name__}: {error}"[-4000:]}
                log(f"  {name} failed: {entry['error'][-600:]}")
        entry["wall_seconds"] = round(time.perf_counter() - start, 1)
        self.report["sections"][name] = entry
        self.save()
        return entry if entry.get("ok") else None

    def save(self) -> None:
        self.report["total_seconds"] = round(time.monotonic() - self.start, 1)
        if self.json_out:
            tmp = self.json_out.with_name(self.json_out.name + ".tmp")
            tmp.write_text(json.dumps(self.report, indent=1, default=str) + "\n")
            os.replace(tmp, self.json_out)


SECTIONS = ("kmeans", "image_scores", "evaluation", "reference", "training")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--force-cpu-dry-run", action="store_true",
                        help="run every section on the CPU at miniature sizes (a check of the code, not a timing)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"any of {','.join(SECTIONS)}")
    parser.add_argument("--budget-seconds", type=float, default=420.0,
                        help="the whole run's; sections past it are skipped, and training gets what is left")
    parser.add_argument("--train-steps", type=int, default=0, help="optimizer steps per training run (0: the size's)")
    parser.add_argument("--train-repeats", type=int, default=1, help="runs of each training side, alternating")
    parser.add_argument("--workers", type=int, default=0,
                        help="data loader workers per training process (0: the cores per GPU less 2, at most 12)")
    parser.add_argument("--json-out", type=Path, help="also write the JSON here, after every section")
    parser.add_argument("--work-dir", type=Path, help="where the temporary work directory goes (default: $TMPDIR)")
    args = parser.parse_args()
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"--sections: unknown {sorted(unknown)}; known: {','.join(SECTIONS)}")

    facts = machine_facts()
    report: dict = {"benchmark": "gpu", "cuda": facts["cuda_available"], "dry_run": args.force_cpu_dry_run,
                    "machine": facts}
    if not facts["cuda_available"] and not args.force_cpu_dry_run:
        report["note"] = ("torch sees no CUDA device: nothing was measured. Run this on a CUDA machine, or with "
                          "--force-cpu-dry-run to run every section's code on the CPU at miniature sizes")
        print(json.dumps(report))
        return 0
    device = "cpu" if args.force_cpu_dry_run else "cuda"
    sizes = DRY if args.force_cpu_dry_run else FULL
    if args.train_steps:
        sizes = replace(sizes, train_steps=args.train_steps)
    gpus = facts.get("gpu_count", 0) if device == "cuda" else 1
    workers = args.workers or (1 if args.force_cpu_dry_run else max(1, min(12, (os.cpu_count() or 1) // gpus - 2)))
    report.update({"device": device, "sizes": asdict(sizes), "sections": {}})
    if args.force_cpu_dry_run:
        report["note"] = "a dry run on the CPU at miniature sizes: the code paths ran; no number here is a timing"
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
    run = Run(report, args.budget_seconds, args.json_out)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_", dir=args.work_dir))
    log(f"gpu check on {device} ({facts.get('gpus', 'no GPU')}), work directory {work}")
    try:
        data: dict = {}

        def prepare() -> dict:
            shards = write_training_shards(work / "train_shards", sizes)
            checkpoint = in_child(write_seeded_checkpoint, sizes.model, str(work / f"{sizes.model}_seed0.pt"),
                                  timeout=300)
            data.update(shards_dir=str(work / "train_shards"), pattern=shards["pattern"], checkpoint=checkpoint["path"])
            return {"shards": shards, "checkpoint": checkpoint}

        run.section("data", prepare)
        if "kmeans" in sections:
            run.section("kmeans", lambda: bench_kmeans(sizes))
        if "image_scores" in sections:
            run.section("image_scores", lambda: bench_image_scores(data, work, sizes, device), "data")
        if "evaluation" in sections:
            run.section("evaluation", lambda: bench_evaluation(data, work, sizes, device), "data")
        if "reference" in sections:
            run.section("reference", lambda: bench_reference(data, work, sizes, device), "data")
        if "training" in sections:
            def training() -> dict:
                seconds = run.left() - 10
                return in_child(train_side_by_side, data["pattern"], str(work / "runs"), sizes,
                                args.force_cpu_dry_run, workers, args.train_repeats, seconds - 20,
                                timeout=seconds)
            run.section("training", training, "data")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    run.save()
    print(json.dumps(report, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
