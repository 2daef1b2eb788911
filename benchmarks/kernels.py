"""The array kernels against a bare numpy/faiss computation of the same quantity, same inputs, same run, same threads.

    .venv/bin/python benchmarks/kernels.py [--rows 1280000] [--dim 768] [--threads 2] [--out DIR] [--keep]
        [--kernels negclip,normsim,semdedup,kmeans] [--negclip-batch-size 32768] [--negclip-batches 10]
        [--normsim-targets 10000] [--semdedup-rows-per-cluster 128] [--clusters 0] [--kmeans-sample 600000]
        [--niter 20]

Writes an on-disk float16 pool (`images.npy`, `texts.npy`: unit-norm rows, texts loosely aligned with their
images, 2% near-duplicate images), written in blocks as pool_features' scratch files are, then times in one run:

- `negclip`: `negclip.negclip_loss` against a plain loop over the same random partitions (a batch's whole
  similarity matrix at once, max-shifted log-sum-exps over its rows and columns);
- `normsim`: `negclip.normsim` (p = inf) against `abs(x @ T.T).max(1)` over pool blocks;
- `semdedup`: `semdedup.semdedup_max_similarity` against a per-cluster loop (argsort, one matrix, triangle max),
  on seeded random cluster ids at `--semdedup-rows-per-cluster` rows a cluster (the reference's density: 100,000
  clusters at 12.8M rows);
- `kmeans`: `image_based.train_centroids` on a seeded sample + `image_based.assign`, against `faiss.Kmeans` on
  the same sample (the same seeded bottom-k draw) and an `IndexFlatIP` search in blocks.

The defaults are the pipeline's (negCLIPLoss: batches of 32,768, 10 partitions; k-means: `proportional_k` clusters
on 600,000 rows, 20 iterations), which take hours on a 2-core CPU at 1.28M rows; the costs are linear in
`--negclip-batches`, so smaller settings measure the same ratio. The project's kernels read the pool through
`feature_tasks.PoolArray`, as pool_features does; the bare ones through `np.load(mmap_mode="r")`. Each computation
runs in a fresh spawned process with `--threads` BLAS/OpenMP threads: `seconds` excludes imports; `peak_rss_mb` is
its peak resident memory (memory-mapped file pages included), `peak_anon_mb` the peak of what it allocated.
`agreement` compares the two results. Progress goes to stderr; stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

from process_tree import tree_memory_mb  # beside this script

import numpy as np

SPAWN = multiprocessing.get_context("spawn")
TARGET_RATIO = 1.5
TAU = 0.01  # negCLIPLoss's temperature (the pipeline's)
SEED = 0
BLOCK = 65_536  # rows per block when writing the pool and in the bare streamed loops
SEMDEDUP_EPS = 0.05  # the threshold whose kept set the agreement counts


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the pool on disk


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.array(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)
    return x


def write_pool(directory: Path, rows: int, dim: int, targets: int) -> dict:
    """images.npy, texts.npy (float16, written a block at a time) and targets.npy (float32)."""
    start = time.perf_counter()
    rng = np.random.default_rng(SEED)
    paths = {name: directory / f"{name}.npy" for name in ("images", "texts")}
    offsets = {name: np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(rows, dim)).offset
               for name, path in paths.items()}
    with open(paths["images"], "r+b") as images, open(paths["texts"], "r+b") as texts:
        images.seek(offsets["images"])
        texts.seek(offsets["texts"])
        for lo in range(0, rows, BLOCK):
            b = min(BLOCK, rows - lo)
            v = _unit(rng.standard_normal((b, dim), dtype=np.float32))
            dups = rng.random(b) < 0.02  # near-copies of other rows of the block, as web pools have
            v[dups] = _unit(v[rng.integers(0, b, int(dups.sum()))] + 0.01 * rng.standard_normal(
                (int(dups.sum()), dim), dtype=np.float32) / math.sqrt(dim))
            t = _unit(v + 3.0 * rng.standard_normal((b, dim), dtype=np.float32) / math.sqrt(dim))  # cosine ~0.3
            images.write(v.astype(np.float16).tobytes())
            texts.write(t.astype(np.float16).tobytes())
    np.save(directory / "targets.npy", _unit(rng.standard_normal((max(targets, 1), dim), dtype=np.float32)))
    return {"seconds": round(time.perf_counter() - start, 2),
            "bytes_on_disk": sum(p.stat().st_size for p in paths.values())}


# ---------------------------------------------------------------- timing one computation in its own process


def _child(queue, threads: int, fn, args) -> None:
    import resource
    try:
        import faiss

        # imported before the clock, by both sides alike (torch and pyarrow come with them: ~1 GB resident)
        from datacomp_assets.filtering import feature_tasks, image_based, negclip, semdedup  # noqa: F401
        faiss.omp_set_num_threads(threads)
        start = time.perf_counter()
        result = fn(*args)
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        queue.put({"ok": True, "seconds": seconds, "result": result, "max_rss_mb": peak})
    except BaseException:
        queue.put({"ok": False, "error": traceback.format_exc()})


def timed(threads: int, fn, *args) -> dict:
    """fn(*args) in a fresh spawned process: seconds (imports excluded), result, peak memory (sampled every 50 ms
    and the kernel's own high-water mark)."""
    queue = SPAWN.Queue()
    proc = SPAWN.Process(target=_child, args=(queue, threads, fn, args))
    proc.start()
    peak, peak_anon, stop = 0.0, 0.0, threading.Event()

    def sample() -> None:
        nonlocal peak, peak_anon
        while not stop.wait(0.05):
            rss, anon = tree_memory_mb(proc.pid)
            peak, peak_anon = max(peak, rss), max(peak_anon, anon)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = queue.get()
    proc.join()
    stop.set()
    sampler.join()
    if not out["ok"]:
        raise RuntimeError(f"{fn.__name__} failed in its child process:\n{out['error']}")
    return {"seconds": round(out["seconds"], 2), "peak_rss_mb": round(max(peak, out["max_rss_mb"])),
            "peak_anon_mb": round(peak_anon), **(out["result"] or {})}


def _scratch(path: str):
    """The pool as pool_features hands it to the kernels: a PoolArray over the scratch copy (one file here)."""
    from datacomp_assets.filtering.feature_tasks import PoolArray

    n, width = np.load(path, mmap_mode="r").shape
    return PoolArray((path,), (0, n), width)


# ---------------------------------------------------------------- negCLIPLoss


def ours_negclip(d: str, batch_size: int, batches: int) -> None:
    from datacomp_assets.filtering.negclip import negclip_loss

    scores = negclip_loss(_scratch(f"{d}/images.npy"), _scratch(f"{d}/texts.npy"), batch_size=batch_size,
                          batches=batches, temperature=TAU, seed=SEED)
    np.save(f"{d}/negclip_ours.npy", scores)


def _lse(x: np.ndarray, axis: int) -> np.ndarray:
    m = x.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def bare_negclip(d: str, batch_size: int, batches: int) -> None:
    images, texts = np.load(f"{d}/images.npy", mmap_mode="r"), np.load(f"{d}/texts.npy", mmap_mode="r")
    n = len(images)
    rng = np.random.default_rng(SEED)
    clip, normaliser = np.zeros(n), np.zeros(n)
    for k in range(batches):
        for rows in np.array_split(rng.permutation(n), math.ceil(n / batch_size)):
            rows = np.sort(rows)
            v, t = _unit(images[rows]), _unit(texts[rows])
            logits = (v @ t.T) / TAU
            normaliser[rows] += _lse(logits, 1) + _lse(logits, 0)
            if k == 0:
                clip[rows] = (v * t).sum(axis=1)
    np.save(f"{d}/negclip_bare.npy", (clip - TAU / 2 * normaliser / batches).astype(np.float32))


# ---------------------------------------------------------------- NormSim


def ours_normsim(d: str) -> None:
    from datacomp_assets.filtering.negclip import normsim

    np.save(f"{d}/normsim_ours.npy", normsim(_scratch(f"{d}/images.npy"), np.load(f"{d}/targets.npy"), p=np.inf))


def bare_normsim(d: str) -> None:
    images, targets = np.load(f"{d}/images.npy", mmap_mode="r"), _unit(np.load(f"{d}/targets.npy"))
    out = np.empty(len(images), dtype=np.float32)
    for lo in range(0, len(images), 8192):
        out[lo:lo + 8192] = np.abs(_unit(images[lo:lo + 8192]) @ targets.T).max(axis=1)
    np.save(f"{d}/normsim_bare.npy", out)


# ---------------------------------------------------------------- SemDeDup


def ours_semdedup(d: str) -> None:
    from datacomp_assets.filtering.semdedup import semdedup_max_similarity

    np.save(f"{d}/semdedup_ours.npy",
            semdedup_max_similarity(_scratch(f"{d}/images.npy"), np.load(f"{d}/semdedup_ids.npy")))


def bare_semdedup(d: str) -> None:
    images, ids = np.load(f"{d}/images.npy", mmap_mode="r"), np.load(f"{d}/semdedup_ids.npy")
    out = np.empty(len(ids), dtype=np.float32)
    order = np.argsort(ids, kind="stable")
    bounds = np.flatnonzero(np.diff(ids[order])) + 1
    for members in np.split(order, bounds):
        x = _unit(images[members])
        centroid = x.mean(axis=0)
        centroid /= max(np.linalg.norm(centroid), 1e-30)
        rank = np.argsort(x @ centroid, kind="stable")  # least similar to the centroid first
        sims = x[rank] @ x[rank].T
        sims[np.triu_indices(len(members))] = -np.inf  # only rows ranked before count
        out[members[rank]] = np.clip(sims.max(axis=1), -1.0, 1.0)
    np.save(f"{d}/semdedup_bare.npy", out)


# ---------------------------------------------------------------- k-means


def ours_kmeans(d: str, k: int, sample: int, niter: int) -> dict:
    from datacomp_assets.filtering.image_based import assign, train_centroids

    start = time.perf_counter()
    centroids = train_centroids(_scratch(f"{d}/images.npy"), k, niter=niter, seed=SEED, max_points=sample)
    trained = time.perf_counter()
    np.save(f"{d}/kmeans_ours.npy", assign(_scratch(f"{d}/images.npy"), centroids))
    np.save(f"{d}/centroids_ours.npy", centroids)
    return {"train_seconds": round(trained - start, 2), "assign_seconds": round(time.perf_counter() - trained, 2)}


def bare_kmeans(d: str, k: int, sample: int, niter: int) -> dict:
    import faiss

    start = time.perf_counter()
    images = np.load(f"{d}/images.npy", mmap_mode="r")
    n, dim = images.shape
    keys = np.random.default_rng(SEED).random(n)  # the seeded bottom-k sample the pipeline draws
    rows = np.sort(np.argpartition(keys, sample - 1)[:sample]) if sample < n else np.arange(n)
    kmeans = faiss.Kmeans(dim, k, niter=niter, seed=SEED, spherical=False, max_points_per_centroid=10_000_000)
    kmeans.train(_unit(images[rows]))
    trained = time.perf_counter()
    index = faiss.IndexFlatIP(dim)
    index.add(kmeans.centroids)
    labels = np.empty(n, dtype=np.int64)
    for lo in range(0, n, BLOCK):
        labels[lo:lo + BLOCK] = index.search(np.ascontiguousarray(images[lo:lo + BLOCK], dtype=np.float32), 1)[1][:, 0]
    np.save(f"{d}/kmeans_bare.npy", labels)
    np.save(f"{d}/centroids_bare.npy", kmeans.centroids)
    return {"train_seconds": round(trained - start, 2), "assign_seconds": round(time.perf_counter() - trained, 2)}


# ---------------------------------------------------------------- the run


def agreement(d: Path, name: str) -> dict:
    ours, bare = np.load(d / f"{name}_ours.npy"), np.load(d / f"{name}_bare.npy")
    if name == "kmeans":
        c_ours, c_bare = np.load(d / "centroids_ours.npy"), np.load(d / "centroids_bare.npy")
        return {"assignments_equal": round(float((ours == bare).mean()), 6),
                "centroids_max_abs_difference": float(np.abs(c_ours - c_bare).max())}
    out = {"max_abs_difference": float(np.abs(ours.astype(np.float64) - bare).max()) if len(ours) else 0.0}
    if name == "semdedup":
        out["kept_differently"] = int(((ours <= 1 - SEMDEDUP_EPS) != (bare <= 1 - SEMDEDUP_EPS)).sum())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_280_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="folder for the pool (default: a temporary one, removed)")
    parser.add_argument("--keep", action="store_true", help="leave the pool and the results in --out")
    parser.add_argument("--kernels", default="negclip,normsim,semdedup,kmeans")
    parser.add_argument("--negclip-batch-size", type=int, default=32_768)
    parser.add_argument("--negclip-batches", type=int, default=10)
    parser.add_argument("--normsim-targets", type=int, default=10_000)
    parser.add_argument("--semdedup-rows-per-cluster", type=int, default=128)
    parser.add_argument("--clusters", type=int, default=0, help="k-means clusters; 0: proportional_k(rows)")
    parser.add_argument("--kmeans-sample", type=int, default=600_000)
    parser.add_argument("--niter", type=int, default=20)
    args = parser.parse_args()
    kernels = [k for k in args.kernels.split(",") if k]
    unknown = set(kernels) - {"negclip", "normsim", "semdedup", "kmeans"}
    if unknown:
        parser.error(f"unknown kernels {sorted(unknown)}")
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)  # the spawned children read these when they import numpy and faiss
    made = args.out is None
    d = Path(tempfile.mkdtemp(prefix="kernels-bench-") if made else args.out).resolve()
    d.mkdir(parents=True, exist_ok=True)
    n = args.rows
    report: dict = {"benchmark": "kernels", "rows": n, "dim": args.dim, "threads": args.threads,
                    "cpus": os.cpu_count(), "target_ratio": TARGET_RATIO, "kernels": {}}
    try:
        log(f"writing a {n:,} x {args.dim} float16 pool under {d}")
        report["pool"] = write_pool(d, n, args.dim, args.normsim_targets)
        from datacomp_assets.filtering.image_based import proportional_k

        batch_size = min(args.negclip_batch_size, n)
        k = min(n, args.clusters or proportional_k(n))
        sample = min(n, max(args.kmeans_sample, k))
        semdedup_clusters = max(1, n // args.semdedup_rows_per_cluster)
        np.save(d / "semdedup_ids.npy", np.random.default_rng(SEED + 1).integers(0, semdedup_clusters, n))
        plans = {
            "negclip": ((str(d), batch_size, args.negclip_batches),
                        {"batch_size": batch_size, "batches": args.negclip_batches, "temperature": TAU}),
            "normsim": ((str(d),), {"p": "inf", "targets": args.normsim_targets}),
            "semdedup": ((str(d),), {"clusters": semdedup_clusters, "kept_at_eps": SEMDEDUP_EPS}),
            "kmeans": ((str(d), k, sample, args.niter), {"clusters": k, "sample": sample, "niter": args.niter}),
        }
        functions = {"negclip": (ours_negclip, bare_negclip), "normsim": (ours_normsim, bare_normsim),
                     "semdedup": (ours_semdedup, bare_semdedup), "kmeans": (ours_kmeans, bare_kmeans)}
        for name in kernels:
            call, settings = plans[name]
            log(f"{name} {settings}: ours")
            ours = timed(args.threads, functions[name][0], *call)
            log(f"  {ours}; bare")
            bare = timed(args.threads, functions[name][1], *call)
            row = {"settings": settings, "ours": ours, "bare": bare,
                   "ratio": round(ours["seconds"] / max(bare["seconds"], 1e-9), 3), "agreement": agreement(d, name)}
            row["within_target"] = row["ratio"] <= TARGET_RATIO
            log(f"  {bare}; ratio {row['ratio']}, {row['agreement']}")
            report["kernels"][name] = row
    finally:
        if made and not args.keep:
            shutil.rmtree(d, ignore_errors=True)
        else:
            report["out"] = str(d)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
