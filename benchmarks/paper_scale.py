"""The filtering stage at the DataComp `small` and `medium` scales' sizes, through Dagster, against bare baselines.

    .venv/bin/python benchmarks/paper_scale.py [--rows 12800000] [--small-rows 1280000] [--medium-rows 128000000]
                                               [--files 26] [--clusters 1000] [--[no-]l14-at-13m]
                                               [--scales bench_1m bench_13m bench_128m] [--work-dir DIR] [--keep]

Three scales are declared in a scale file written into the work directory (`$DATACOMP_SCALES`), each over a
synthetic mirror in DataComp's published layout (`world.published_mirror.write_synthetic_mirror`):

- `bench_1m`: `--small-rows` rows (a tenth of small) with every npz key, in proportionally fewer files (at least
  2);
- `bench_13m`: `--rows` rows (the small pool's 12.8M) in `--files` parquet files (26), with npz files that hold
  `l14_img` alone (20 GB at 12.8M rows; the whole npz would be 67 GB), so pool_features' image-embedding methods
  run at small's size; `--no-l14-at-13m` writes no npz;
- `bench_128m`: `--medium-rows` rows (medium's 128M, about 21 GB) in proportionally more files, parquet only:
  the metadata-only path at medium's size.

With embeddings, a scale gets `kmeans_clusters = --clusters` and a stand-in for ImageNet's L/14 embeddings (rows
of the mirror's own l14_img). The mirrors still to be written must fit in 90% of the free disk, or the run stops
at once saying so.

Mirrors already in the work directory with the same size are reused (`--keep` keeps them for the next run); the
pipeline's storage and Dagster instance are fresh each run. Each step is materialized through Dagster, as
`python -m datacomp_assets.run --subsets-only` does, in its own subprocess (`--step SCALE ASSET [STRATEGY]`), so
its peak memory is its own: per scale, (a) pool_index + pool_metadata, (b) pool_features (where there is an npz), (c) each
subset with its blocking check. The bare baselines run in subprocesses too (`--bare KIND ...`), right after the
pipeline step they are compared with, on the same files:

1. pool_metadata links the published files and writes the uid index (timed; no baseline: no caption feature is
   computed there any more, the rules compute what they read, on the rows they need);
2. each rule (subset): one DuckDB query over the pool_metadata parquet files (joined on uid with pool_features and
   with the caption features the pipeline stored, where the rule reads them), fetched to Arrow; the kept row
   count must equal the subset's (target: 2x; 1.5x at bench_128m, medium's size). A rule's subset seconds include the caption features it computed;
3. image k-means (pool_features): faiss on the same caption-filtered L/14 sample (target: within 2x).

Every step's peak memory: `peak_rss_mb` is the larger of the step process's and its largest child's ru_maxrss
(target: 4 GB); `tree_peak_rss_mb` / `tree_peak_anon_mb` sum the whole process tree (sampled from /proc).
Progress goes to stderr (each subprocess's log to a file in the work directory); one JSON object to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from process_tree import tree_memory_mb  # beside this script

ROOT = Path(__file__).resolve().parents[1]
SMALL_ROWS, SMALL_FILES = 12_800_000, 26
MEDIUM_ROWS = 128_000_000
SCALE_128M, SCALE_13M, SCALE_1M = "bench_128m", "bench_13m", "bench_1m"
# What a mirror's npz holds: every key (bench_1m), L/14's image embeddings alone (bench_13m: the image-embedding
# methods at 12.8M rows in 20 GB instead of 67), or none (bench_128m: the metadata-only path).
ALL_KEYS, L14_IMAGES, NO_NPZ = "all", "l14_img", "none"
BYTES_PER_ROW = {"parquet": 170, ALL_KEYS: 5120, L14_IMAGES: 1536, NO_NPZ: 0}  # on disk, measured on the mirrors
# Rules over the metadata alone (both scales), and those that read pool_features (bench_1m only: no npz at 13M).
METADATA_RULES = ["no_filter", "random_10pct", "basic", "clip_score_b32_30pct", "clip_score_l14_30pct", "laion2b"]
FEATURE_RULES = ["text_based", "image_based", "image_based_clip_score_l14_30pct"]
TARGETS = {"pool_metadata": None, "pool_features": 2.0, "subset": 2.0}
SUBSET_TARGET_AT = {SCALE_128M: 1.5}  # the target at medium's size, where fixed costs no longer dominate
MEMORY_TARGET_MB = 4096
TARGET_IMAGES = 1000  # rows of the stand-in for ImageNet's L/14 embeddings
MIRROR_MARKER = ".paper_scale.json"


def log(message: str) -> None:
    print(f"[paper_scale {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def peak_rss_mb() -> int:
    """The larger of this process's peak resident memory and its largest waited-for child's (KB on Linux)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round(max(own, children) / 1024)


def emit(result: dict) -> None:
    """A subprocess's answer: one JSON object on its last stdout line."""
    print(json.dumps(result, default=str), flush=True)


# ---------------------------------------------------------------- the subprocess modes


def write_mirror(out_dir: str, rows: int, files: int, npz: str) -> dict:
    from datacomp_assets.core.schema import NPZ_KEYS
    from datacomp_assets.world.published_mirror import write_synthetic_mirror

    start = time.perf_counter()
    write_synthetic_mirror(out_dir, rows, files, seed=0, embeddings=npz != NO_NPZ,
                           npz_keys=NPZ_KEYS if npz == ALL_KEYS else (npz,), progress=lambda m: log(f"mirror {m}"))
    return {"seconds": round(time.perf_counter() - start, 1)}


def _jsonable(value):
    if isinstance(value, (bool, int, float)) or value is None:
        return value
    if isinstance(value, str):
        return value if len(value) <= 200 else None  # markdown tables (the audit) are left out
    if isinstance(value, dict):
        return value
    return str(value)


def latest_metadata(instance, asset: str, partition: str | None) -> dict:
    """The asset's latest materialization metadata for the partition (as tests/test_assets.py reads it)."""
    import dagster as dg

    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition] if partition else None),
        limit=1).records
    if not records:
        return {}
    values = {k: _jsonable(v.value) for k, v in records[0].asset_materialization.metadata.items()}
    return {k: v for k, v in values.items() if v is not None}


def step_durations(instance, run_id: str) -> dict[str, float]:
    """Seconds from each Dagster step's start to its end, from the run's event log."""
    import dagster as dg

    kinds = {dg.DagsterEventType.STEP_START, dg.DagsterEventType.STEP_SUCCESS, dg.DagsterEventType.STEP_FAILURE}
    starts, out = {}, {}
    for entry in instance.all_logs(run_id, of_type=kinds):
        if entry.dagster_event.event_type == dg.DagsterEventType.STEP_START:
            starts[entry.step_key] = entry.timestamp
        elif entry.step_key in starts:
            out[entry.step_key] = round(entry.timestamp - starts[entry.step_key], 2)
    return out


def run_step(scale: str, asset: str, strategy: str | None) -> dict:
    """Materialize one step through Dagster, as datacomp_assets.run does (in-process, the code location's
    assets, checks and resources, the instance of $DAGSTER_HOME)."""
    start = time.perf_counter()
    import dagster as dg

    from datacomp_assets.definitions import ALL_ASSETS, CHECKS, RESOURCES
    from datacomp_assets.filtering.assets import pool_features, strategy_definitions, subset
    from datacomp_assets.instance import free_orphaned_slots
    from datacomp_assets.metadata.assets import pool_metadata
    from datacomp_assets.pool.assets import pool_index

    instance = dg.DagsterInstance.get()
    free_orphaned_slots(instance)  # as run_scale: a killed earlier run may hold the `gpu` slot
    if asset == "pool_metadata":  # run_scale observes the strategy definitions first
        dg.materialize([strategy_definitions], selection=[strategy_definitions], instance=instance)
        selection, key, assets = [pool_index, pool_metadata], scale, ["pool_index", "pool_metadata"]
    elif asset == "pool_features":
        selection, key, assets = [pool_features], scale, ["pool_features"]
    elif asset == "subset":
        selection, key, assets = [subset], dg.MultiPartitionKey({"scale": scale, "strategy": strategy}), ["subset"]
    else:
        raise SystemExit(f"unknown step asset {asset!r}: pool_metadata, pool_features or subset")
    setup = time.perf_counter()
    result = dg.materialize([*ALL_ASSETS, *CHECKS], selection=selection, partition_key=key, instance=instance,
                            resources=RESOURCES, raise_on_error=False)
    end = time.perf_counter()
    errors = [event.step_failure_data.error.message.strip() for event in result.all_events
              if event.is_step_failure and event.step_failure_data and event.step_failure_data.error]
    return {
        "ok": bool(result.success), "errors": errors,
        "setup_seconds": round(setup - start, 2), "materialize_seconds": round(end - setup, 2),
        "dagster_steps": step_durations(instance, result.run_id),
        "metadata": {name: latest_metadata(instance, name, str(key)) for name in assets},
        "checks": {e.check_name: bool(e.passed) for e in result.get_asset_check_evaluations()},
        "peak_rss_mb": peak_rss_mb(),
    }


def bare_queries(metadata_dir: str, features_dir: str, store_dir: str, pool_rows: int) -> dict[str, str]:
    """Each rule as one hand-written DuckDB query (thresholds as the reference's), over the metadata, pool_features
    and the caption features the pipeline's rules stored (the rows each needed)."""
    m = f"read_parquet('{metadata_dir}/*.parquet')"
    concepts, clusters = (f"read_parquet('{features_dir}/{method}/*.parquet')"  # pool_features' method folders
                          for method in ("text_concept", "image_clusters"))
    counts, fasttext, cld3 = (f"read_parquet('{store_dir}/{group}/*.parquet') AS {group}"
                              for group in ("counts", "fasttext", "cld3"))
    captions = f"{m} AS m JOIN {counts} USING (uid) JOIN {fasttext} USING (uid)"
    l14_top = f"clip_l14_similarity_score >= (SELECT quantile_disc(clip_l14_similarity_score, 0.7) FROM {m})"
    image_based = "language = 'en' AND num_tokens > 1 AND num_chars > 5 AND in_target_cluster"
    return {
        "no_filter": f"SELECT uid FROM {m}",
        # the subset keeps exactly round(10%) of the pool: an exact-size sample, not Bernoulli's approximate one
        "random_10pct": f"SELECT uid FROM {m} USING SAMPLE reservoir({round(0.1 * pool_rows)} ROWS) REPEATABLE (0)",
        "basic": f"""SELECT uid FROM {captions} WHERE language = 'en' AND num_words > 2 AND num_chars > 5
                     AND least(original_width, original_height) >= 200
                     AND greatest(original_width, original_height) / least(original_width, original_height) <= 3""",
        "clip_score_b32_30pct": f"""SELECT uid FROM {m} WHERE clip_b32_similarity_score >=
                                    (SELECT quantile_disc(clip_b32_similarity_score, 0.7) FROM {m})""",
        "clip_score_l14_30pct": f"SELECT uid FROM {m} WHERE {l14_top}",
        "laion2b": f"""SELECT uid FROM {m} AS m JOIN {cld3} USING (uid)
                       WHERE cld3_language = 'en' AND clip_b32_similarity_score >= 0.28""",
        "text_based": f"SELECT uid FROM {m} AS m JOIN {fasttext} USING (uid) JOIN {concepts} AS f USING (uid) "
                      "WHERE language = 'en' AND text_concept IS NOT NULL",
        "image_based": f"SELECT uid FROM {captions} JOIN {clusters} AS f USING (uid) WHERE {image_based}",
        "image_based_clip_score_l14_30pct": f"SELECT uid FROM {captions} JOIN {clusters} AS f USING (uid) "
                                            f"WHERE {image_based} AND {l14_top}",
    }


def bare_query(metadata_dir: str, features_dir: str, store_dir: str, strategy: str) -> dict:
    import duckdb
    import pyarrow.parquet as pq

    start = time.perf_counter()
    pool_rows = sum(pq.read_metadata(p).num_rows for p in Path(metadata_dir).glob("*.parquet"))
    query = bare_queries(metadata_dir, features_dir, store_dir, pool_rows)[strategy]
    table = duckdb.connect().sql(query).to_arrow_table()
    return {"seconds": round(time.perf_counter() - start, 2), "rows": table.num_rows, "peak_rss_mb": peak_rss_mb()}


def bare_kmeans(metadata_dir: str, store_dir: str, k: int, max_points: int, seed: int = 0, niter: int = 20) -> dict:
    """faiss k-means on the rows the pipeline trains on: the caption-filtered (fastText English, > 1 token, > 5
    characters, as the pipeline stored them) L/14 image embeddings in pool order, capped to `max_points` rows by
    the same seeded bottom-k draw. `seconds` is faiss' training alone; reading and selecting the rows is
    `load_seconds`."""
    import duckdb
    import faiss
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    start = time.perf_counter()
    files = sorted(Path(metadata_dir).glob("*.parquet"))
    passing = duckdb.sql(f"""SELECT uid FROM read_parquet('{store_dir}/counts/*.parquet') AS counts
                             JOIN read_parquet('{store_dir}/fasttext/*.parquet') AS fasttext USING (uid)
                             WHERE language = 'en' AND num_tokens > 1 AND num_chars > 5""").to_arrow_table()
    masks = [pc.is_in(pq.read_table(path, columns=["uid"])["uid"], value_set=passing["uid"]).to_numpy()
             for path in files]
    x = None
    offset = 0
    for path, mask in zip(files, masks):
        with np.load(path.with_suffix(".npz")) as npz:
            rows = npz["l14_img"][mask]
        if x is None:
            x = np.empty((int(sum(m.sum() for m in masks)), rows.shape[1]), dtype=np.float32)
        x[offset:offset + len(rows)] = rows
        offset += len(rows)
    captioned = len(x)
    if captioned > max_points:  # the pipeline's sample: the max_points smallest seeded keys, in pool order
        keys = np.random.default_rng(seed).random(captioned)
        x = x[np.sort(np.argpartition(keys, max_points - 1)[:max_points])]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    loaded = time.perf_counter()
    kmeans = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, spherical=False, verbose=False,
                          max_points_per_centroid=10**9)
    kmeans.train(x)
    end = time.perf_counter()
    return {"seconds": round(end - loaded, 2), "load_seconds": round(loaded - start, 2), "captioned_rows": captioned,
            "train_rows": len(x), "clusters": k, "niter": niter, "peak_rss_mb": peak_rss_mb()}


# ---------------------------------------------------------------- the parent: subprocesses and their memory


def subprocess_json(args: list[str], env: dict, log_file: Path) -> dict:
    """Run this script with `args` in a subprocess (stderr to `log_file`); its last stdout line (JSON), plus the
    wall seconds seen from here and the process tree's sampled peak memory."""
    start = time.perf_counter()
    with open(log_file, "w") as err:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *args], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=err, text=True)
        peak, peak_anon, stop = [0.0], [0.0], threading.Event()

        def sample() -> None:
            while not stop.wait(0.25):
                rss, anon = tree_memory_mb(proc.pid)
                peak[0], peak_anon[0] = max(peak[0], rss), max(peak_anon[0], anon)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            stdout, _ = proc.communicate()
        finally:
            stop.set()
            sampler.join()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    wall = time.perf_counter() - start
    lines = [line for line in stdout.splitlines() if line.strip()]
    try:
        out = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        tail = log_file.read_text(errors="replace")[-3000:]
        out = {"ok": False, "errors": [f"exit code {proc.returncode}; log tail:\n{tail}"]}
    out.setdefault("ok", proc.returncode == 0)
    out.update(wall_seconds=round(wall, 1), tree_peak_rss_mb=round(peak[0]), tree_peak_anon_mb=round(peak_anon[0]),
               exit_code=proc.returncode)
    return out


def file_count(rows: int) -> int:
    """The published layout's files for `rows` rows: 26 at 12.8M, proportionally more or fewer, at least 2."""
    return max(2, round(SMALL_FILES * rows / SMALL_ROWS))


def file_counts(args) -> tuple[int, int]:
    files = args.files or file_count(args.rows)
    return files, max(2, round(files * args.small_rows / args.rows))


def bytes_needed(spec: dict) -> int:
    return spec["rows"] * (BYTES_PER_ROW["parquet"] + BYTES_PER_ROW[spec["npz"]])


def require_disk(work: Path, specs: dict[str, dict]) -> None:
    """Refuse at once when the mirrors still to be written would not fit, rather than fill the disk half-way."""
    missing = {scale: spec for scale, spec in specs.items() if not _mirror_current(work, scale, spec)}
    needed = sum(map(bytes_needed, missing.values()))
    free = shutil.disk_usage(work).free
    if needed > 0.9 * free:
        sizes = ", ".join(f"{scale} {bytes_needed(spec) / 1e9:.0f} GB" for scale, spec in missing.items())
        raise SystemExit(f"paper_scale: the mirrors to write need about {needed / 1e9:.0f} GB ({sizes}) and "
                         f"{work} has {free / 1e9:.0f} GB free: choose fewer --scales, smaller --rows / "
                         "--medium-rows, --no-l14-at-13m, or another --work-dir")


def _mirror_wanted(spec: dict) -> dict:
    return {"rows": spec["rows"], "files": spec["files"], "npz": spec["npz"], "seed": 0}


def _mirror_current(work: Path, scale: str, spec: dict) -> bool:
    marker = work / "mirrors" / scale / MIRROR_MARKER
    return marker.exists() and json.loads(marker.read_text()) == _mirror_wanted(spec)


def ensure_mirrors(work: Path, specs: dict[str, dict], env: dict) -> dict:
    """Write the mirrors that are not already there with the same size, in parallel subprocesses."""
    report, running = {}, []
    for scale, spec in specs.items():
        directory = work / "mirrors" / scale
        marker = directory / MIRROR_MARKER
        wanted = _mirror_wanted(spec)
        if _mirror_current(work, scale, spec):
            log(f"{scale}: mirror of {spec['rows']:,} rows already in {directory}, reused")
            report[scale] = {"reused": True}
            continue
        marker.unlink(missing_ok=True)
        log(f"{scale}: writing a mirror of {spec['rows']:,} rows in {spec['files']} files "
            f"({'parquet only' if spec['npz'] == NO_NPZ else 'parquet + npz (' + spec['npz'] + ')'}) to {directory}")
        args = ["--write-mirror", str(directory), str(spec["rows"]), str(spec["files"]), spec["npz"]]
        thread_out: dict = {}
        thread = threading.Thread(target=lambda a=args, s=scale, o=thread_out: o.update(
            subprocess_json(a, env, work / "logs" / f"mirror_{s}.log")))
        thread.start()
        running.append((scale, thread, thread_out, marker, wanted))
    for scale, thread, out, marker, wanted in running:
        thread.join()
        if not out.get("ok"):
            raise RuntimeError(f"writing the {scale} mirror failed: {out.get('errors')}")
        marker.write_text(json.dumps(wanted))
        report[scale] = {"reused": False, "seconds": out["seconds"], "wall_seconds": out["wall_seconds"],
                         "peak_rss_mb": out["peak_rss_mb"]}
    for scale in specs:
        directory = work / "mirrors" / scale
        report[scale]["bytes"] = sum(p.stat().st_size for p in directory.iterdir() if p.is_file())
    return report


def write_target_embeddings(mirror: Path, out: Path) -> None:
    """Stand-in for ImageNet's L/14 image embeddings: TARGET_IMAGES rows of the mirror's first npz, spread over it."""
    import numpy as np

    out.parent.mkdir(parents=True, exist_ok=True)
    with np.load(sorted(mirror.glob("*.npz"))[0]) as npz:
        images = npz["l14_img"]
        rows = np.unique(np.linspace(0, len(images) - 1, min(TARGET_IMAGES, len(images))).astype(np.int64))
        x = images[rows].astype(np.float32)
    np.save(out, x / np.linalg.norm(x, axis=1, keepdims=True))


SCALE_ENTRY = """
[{scale}]
inherit = "small"
pool_size = {rows}
samples_seen = {rows}
mirror_dir = "mirrors/{scale}"
"""
EMBEDDING_ENTRY = """kmeans_clusters = {clusters}
imagenet_embeddings = "inputs/imagenet_l14_{scale}.npy"
"""


def scale_file(specs: dict[str, dict], clusters: int) -> str:
    """The benchmark's scales: the small scale's recipe over each mirror (and, with embeddings, the clusters and
    the stand-in for ImageNet's L/14 embeddings)."""
    return "# Written by benchmarks/paper_scale.py: the small scale's recipe over synthetic mirrors.\n" + "".join(
        SCALE_ENTRY.format(scale=scale, rows=spec["rows"])
        + (EMBEDDING_ENTRY.format(clusters=clusters, scale=scale) if spec["npz"] != NO_NPZ else "")
        for scale, spec in specs.items())


def compare(step: dict, pipeline_seconds, baseline: dict | None, target: float) -> dict:
    """A step's row of the report: the pipeline's own seconds against the baseline's, and its memory."""
    row = {"pipeline_seconds": pipeline_seconds, "wall_seconds": step.get("wall_seconds"),
           "peak_rss_mb": step.get("peak_rss_mb"), "tree_peak_rss_mb": step.get("tree_peak_rss_mb"),
           "tree_peak_anon_mb": step.get("tree_peak_anon_mb"), "ok": step.get("ok", False)}
    if not row["ok"]:
        row["errors"] = step.get("errors")
    if baseline is not None:
        row["baseline_seconds"] = baseline.get("seconds")
        row["baseline_peak_rss_mb"] = baseline.get("peak_rss_mb")
        if not baseline.get("ok", False):
            row["baseline_errors"] = baseline.get("errors")
    base = row.get("baseline_seconds")
    row["ratio"] = round(pipeline_seconds / base, 3) if pipeline_seconds is not None and base else None
    row["target"] = target
    row["met"] = target is None or (row["ratio"] is not None and row["ratio"] <= target)
    row["memory_target_mb"] = MEMORY_TARGET_MB
    row["memory_met"] = row["peak_rss_mb"] is not None and row["peak_rss_mb"] <= MEMORY_TARGET_MB
    return row


def run_scale(scale: str, spec: dict, work: Path, env: dict, args) -> dict:
    data = work / "data" / scale
    logs = work / "logs"
    steps: dict[str, dict] = {}

    def step(*step_args: str) -> dict:
        name = "_".join(step_args[1:])
        log(f"{scale}: materializing {' '.join(step_args[1:])}")
        out = subprocess_json(["--step", *step_args], env, logs / f"{scale}_{name}.log")
        if not out.get("ok"):
            log(f"{scale}: {name} FAILED: {out.get('errors')}")
        return out

    def bare(kind: str, *bare_args: str) -> dict:
        out = subprocess_json(["--bare", kind, *bare_args], env, logs / f"{scale}_bare_{kind}_{bare_args[-1]}.log")
        if not out.get("ok"):
            log(f"{scale}: bare {kind} FAILED: {out.get('errors')}")
        return out

    # (a) pool_index + pool_metadata (the published files linked, the uid index written; no time target: no
    # caption feature is computed here, the rules compute what they read)
    pool = step(scale, "pool_metadata")
    meta = pool.get("metadata", {}).get("pool_metadata", {})
    row = compare(pool, meta.get("seconds"), None, TARGETS["pool_metadata"])
    row.update(
        rows=meta.get("rows"), uid_index_seconds=meta.get("uid_index_seconds"),
        dagster_steps=pool.get("dagster_steps"), materialize_seconds=pool.get("materialize_seconds"),
        pool_index_rows=pool.get("metadata", {}).get("pool_index", {}).get("rows"),
        note="pipeline_seconds: pool_metadata's own `seconds` (links and the uid index); the subprocess also "
             "starts Python and Dagster, runs pool_index and hashes the pool's version")
    steps["pool_metadata"] = row
    log(f"{scale}: pool_metadata {row['pipeline_seconds']} s (subprocess {row['wall_seconds']} s), "
        f"peak {row['peak_rss_mb']} MB")
    if not pool.get("ok"):
        return steps

    # (b) pool_features, against bare faiss k-means on the same sample
    if spec["npz"] != NO_NPZ:
        features = step(scale, "pool_features")
        fmeta = features.get("metadata", {}).get("pool_features", {})
        kmeans = bare("kmeans", str(data / "pool_metadata"), str(data / "caption_features"), str(args.clusters),
                      str(kmeans_max_points()))
        row = compare(features, fmeta.get("image_kmeans_seconds"), kmeans, TARGETS["pool_features"])
        row.update(timings={k: v for k, v in fmeta.items() if k.endswith("seconds")},
                   clusters=fmeta.get("clusters"), target_clusters=fmeta.get("target_clusters"),
                   baseline_train_rows=kmeans.get("train_rows"), baseline_load_seconds=kmeans.get("load_seconds"),
                   dagster_steps=features.get("dagster_steps"), materialize_seconds=features.get("materialize_seconds"),
                   note="pipeline_seconds: image_kmeans_seconds (sampling the caption-filtered rows from the scratch "
                        "memmap and faiss training); baseline_seconds: faiss training alone on the same rows")
        steps["pool_features"] = row
        log(f"{scale}: pool_features k-means {row['pipeline_seconds']} s (step {fmeta.get('seconds')} s, subprocess "
            f"{row['wall_seconds']} s), bare faiss {row.get('baseline_seconds')} s, ratio {row['ratio']}, "
            f"peak {row['peak_rss_mb']} MB")
        if not features.get("ok"):
            spec = {**spec, "strategies": [s for s in spec["strategies"] if s not in FEATURE_RULES]}

    # (c) each subset (with its blocking check), against a bare DuckDB query
    for strategy in spec["strategies"]:
        sub = step(scale, "subset", strategy)
        smeta = sub.get("metadata", {}).get("subset", {})
        computed = {k: v for k, v in smeta.items() if k.startswith("caption_features_")}
        first_seconds = smeta.get("seconds")
        if computed and sub.get("ok"):  # compared after its features, as the bare query is; both figures kept
            sub = step(scale, "subset", strategy)
            smeta = sub.get("metadata", {}).get("subset", {})
        query = bare("query", str(data / "pool_metadata"), str(data / "pool_features"), str(data / "caption_features"),
                     strategy)
        row = compare(sub, smeta.get("seconds"), query, SUBSET_TARGET_AT.get(scale, TARGETS["subset"]))
        row.update(dataset_size=smeta.get("dataset_size"), baseline_rows=query.get("rows"),
                   rows_equal=smeta.get("dataset_size") is not None and smeta.get("dataset_size") == query.get("rows"),
                   check_passed=sub.get("checks", {}).get("subset_is_valid"),
                   dagster_steps=sub.get("dagster_steps"), materialize_seconds=sub.get("materialize_seconds"),
                   from_nothing_seconds=first_seconds, caption_features_computed=computed)
        steps[f"subset:{strategy}"] = row
        log(f"{scale}: {strategy}: kept {row['dataset_size']} (bare {row['baseline_rows']}); "
            f"{row['pipeline_seconds']} s (subprocess {row['wall_seconds']} s), bare {row.get('baseline_seconds')} s, "
            f"ratio {row['ratio']}, peak {row['peak_rss_mb']} MB")
    return steps


def summarize(steps: dict) -> dict:
    missed_time, missed_memory, failed, rows_differ = [], [], [], []
    for scale, rows in steps.items():
        for name, row in rows.items():
            label = f"{scale}/{name}"
            if not row["ok"] or row.get("baseline_errors"):
                failed.append(label)
            if not row["met"]:
                missed_time.append(label)
            if not row["memory_met"]:
                missed_memory.append(label)
            if "rows_equal" in row and not row["rows_equal"]:
                rows_differ.append(label)
            if row.get("check_passed") is False:
                failed.append(f"{label} (subset_is_valid)")
    return {"all_met": not (missed_time or missed_memory or failed or rows_differ), "failed": failed,
            "time_target_missed": missed_time, "memory_target_missed": missed_memory,
            "rows_differ_from_baseline": rows_differ}


def kmeans_max_points() -> int:
    """The k-means sample cap of the benchmark's scales (they inherit small's)."""
    from datacomp_assets.core.scales import SCALES

    return SCALES["small"].kmeans_max_points


def notes(args, files: int, small_files: int) -> list[str]:
    return [
        f"{SCALE_1M} ({args.small_rows:,} rows, {small_files} files) carries every npz key (5,120 bytes a row). "
        f"{SCALE_13M} ({args.rows:,} rows, {files} files) carries " + ("l14_img alone (1,536 bytes a row; the whole "
        "npz would be 67 GB at 12.8M rows)" if args.l14_at_13m else "no npz") + f"; {SCALE_128M} "
        f"({args.medium_rows:,} rows, {file_count(args.medium_rows)} files) carries none: the metadata-only path.",
        "pool_features and the rules that read its columns (" + ", ".join(FEATURE_RULES) + ") run where there is an "
        "npz; without l14_txt, negCLIPLoss and HYPE are left out. The metadata-only rules run at every size.",
        f"{SCALE_1M} clusters into kmeans_clusters = {args.clusters:,}: the reference's 100,000 clusters cannot be "
        f"trained on a 2-core CPU in reasonable time (upstream trains them on GPUs). The pipeline trains on at most "
        f"kmeans_max_points = {kmeans_max_points():,} caption-filtered rows; the bare faiss baseline trains on the "
        "same rows. SemDeDup's k-means of the whole pool and VAS (its targets default to imagenet_embeddings) also "
        "run inside pool_features: see its `timings`.",
        "No metaclip_entries file is configured, so pool_features leaves the MetaCLIP columns out (no timed rule "
        "reads them).",
        f"imagenet_embeddings is a stand-in: {TARGET_IMAGES:,} rows of the {SCALE_1M} mirror's own l14_img "
        "(float32, unit rows), so in_target_cluster (and image_based's size) is not the reference's.",
        "Captions, sizes, scores and embeddings are synthetic (world.published_mirror), in the published layout: "
        "timings and memory are representative, kept fractions are not DataComp's.",
        "Caption features are computed by the rules that read them (subset, and pool_features for the image-based "
        "caption terms), with the resource's default processes (0: every core), and count in those steps' seconds; "
        "the bare queries join what the pipeline stored. benchmarks/filters.py times them from nothing against bare "
        "fastText and CLD3.",
        "Bare queries fetch to Arrow; random_10pct's is an exact-size reservoir sample (the subset keeps exactly "
        "round(10%) of the pool), so row counts can be compared.",
        "peak_rss_mb is max(ru_maxrss of the step process, of its largest child) and counts resident pages of "
        "memory-mapped files (pool_features' scratch copy of the embeddings); tree_peak_* are sums over the process "
        "tree sampled every 0.25 s (anon: memory the processes allocated).",
        "The machine may be shared: timings of the pipeline and its baseline are taken back to back to see the "
        "same load.",
    ]


def orchestrate(args) -> dict:
    started = time.perf_counter()
    if args.small_rows > args.rows:
        raise SystemExit("--small-rows must not exceed --rows")
    specs = {
        SCALE_1M: {"npz": ALL_KEYS, "strategies": METADATA_RULES + FEATURE_RULES},
        SCALE_13M: {"npz": L14_IMAGES if args.l14_at_13m else NO_NPZ,
                    "strategies": METADATA_RULES + (FEATURE_RULES if args.l14_at_13m else [])},
        SCALE_128M: {"npz": NO_NPZ, "strategies": METADATA_RULES},
    }
    files, small_files = file_counts(args)
    work = Path(args.work_dir).resolve()
    for fresh in ("data", "dagster", "logs"):  # the pipeline's state is new each run; the mirrors are reused
        shutil.rmtree(work / fresh, ignore_errors=True)
    (work / "logs").mkdir(parents=True)
    (work / "dagster").mkdir()
    shutil.copy(ROOT / "instance" / "dagster.yaml", work / "dagster" / "dagster.yaml")  # as bin/setup does
    env = {**os.environ, "DATACOMP_HOME": str(work / "data"), "DAGSTER_HOME": str(work / "dagster"),
           "DATACOMP_SCALES": str(work / "scales.toml"), "DATACOMP_MIRROR": "", "PYTHONUNBUFFERED": "1"}
    sizes = {SCALE_1M: (args.small_rows, small_files), SCALE_13M: (args.rows, files),
             SCALE_128M: (args.medium_rows, file_count(args.medium_rows))}
    specs = {scale: {"rows": sizes[scale][0], "files": sizes[scale][1], **spec}
             for scale, spec in specs.items() if scale in args.scales}
    (work / "scales.toml").write_text(scale_file(specs, args.clusters))
    log(f"work directory {work}")
    require_disk(work, specs)
    mirrors = ensure_mirrors(work, specs, env)
    for scale, spec in specs.items():
        if spec["npz"] != NO_NPZ:
            write_target_embeddings(work / "mirrors" / scale, work / "inputs" / f"imagenet_l14_{scale}.npy")
    steps = {}
    for scale, spec in specs.items():
        steps[scale] = run_scale(scale, spec, work, env, args)
    import dagster
    import duckdb
    import faiss

    return {
        "benchmark": "paper_scale",
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "dagster": dagster.__version__, "duckdb": duckdb.__version__, "faiss": faiss.__version__},
        "sizes": {scale: {k: spec[k] for k in ("rows", "files", "npz")} | {"strategies": spec["strategies"]}
                  for scale, spec in specs.items()},
        "clusters": args.clusters,
        "mirrors": mirrors,
        "steps": steps,
        "summary": summarize(steps),
        "notes": notes(args, files, small_files),
        "work_dir": str(work), "kept": args.keep,
        "total_seconds": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=SMALL_ROWS, help="rows of the parquet-only mirror (bench_13m)")
    parser.add_argument("--small-rows", type=int, default=SMALL_ROWS // 10,
                        help="rows of the mirror with embeddings (bench_1m)")
    parser.add_argument("--files", type=int, default=0,
                        help="files of the bench_13m mirror (default: 26 at 12.8M rows, proportionally fewer, >= 2); "
                             "bench_1m gets proportionally fewer, at least 2")
    parser.add_argument("--clusters", type=int, default=1000, help="bench_1m's kmeans_clusters")
    parser.add_argument("--medium-rows", type=int, default=MEDIUM_ROWS,
                        help="rows of the parquet-only mirror at medium's size (bench_128m)")
    parser.add_argument("--l14-at-13m", action=argparse.BooleanOptionalAction, default=True,
                        help="bench_13m's npz holds l14_img (20 GB at 12.8M rows), so pool_features runs there too")
    parser.add_argument("--scales", nargs="+", default=[SCALE_1M, SCALE_13M, SCALE_128M],
                        choices=[SCALE_1M, SCALE_13M, SCALE_128M])
    parser.add_argument("--work-dir", default="/tmp/datacomp_paper_scale")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (mirrors reused next run)")
    # Subprocess modes (used by the run itself; each prints one JSON line)
    parser.add_argument("--step", nargs="+", metavar="ARG", help="SCALE ASSET [STRATEGY]: materialize one step")
    parser.add_argument("--bare", nargs="+", metavar="ARG", help="KIND ARGS...: one bare baseline")
    parser.add_argument("--write-mirror", nargs=4, metavar=("DIR", "ROWS", "FILES", "NPZ"))
    args = parser.parse_args()

    if args.step:
        emit(run_step(args.step[0], args.step[1], args.step[2] if len(args.step) > 2 else None))
        return
    if args.bare:
        kind, rest = args.bare[0], args.bare[1:]
        if kind == "query":
            emit({"ok": True, **bare_query(*rest)})
        elif kind == "kmeans":
            emit({"ok": True, **bare_kmeans(rest[0], rest[1], int(rest[2]), int(rest[3]))})
        else:
            raise SystemExit(f"unknown baseline {kind!r}")
        return
    if args.write_mirror:
        out_dir, rows, files, npz = args.write_mirror
        written = write_mirror(out_dir, int(rows), int(files), npz)
        emit({"ok": True, **written, "peak_rss_mb": peak_rss_mb()})
        return

    try:
        report = orchestrate(args)
    finally:
        if not args.keep:
            shutil.rmtree(Path(args.work_dir).resolve(), ignore_errors=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
