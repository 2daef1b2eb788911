"""Pool-stage throughput at the tiny scale: download (with fault accounting) and metadata per feature group.

    .venv/bin/python benchmarks/pool.py [--samples 2000] [--workdir DIR]

Download throughput is measured twice in the same run: from the synthetic web (which renders each image on
request and injects faults) and, as the baseline, from a plain static-file server over the same images
pre-rendered to disk. Metadata throughput is rows per second per feature group, over the downloaded shards.
Ends by printing one JSON object.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import tempfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing import Pool
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from datacomp_assets.core.models import Scorer  # noqa: E402
from datacomp_assets.core.models import load_model  # noqa: E402
from datacomp_assets.core.scales import SCALES  # noqa: E402
from datacomp_assets.core.scorers import SCORER_MODELS  # noqa: E402
from datacomp_assets.core.shards import read_downloaded  # noqa: E402
from datacomp_assets.metadata.build import detect_faces  # noqa: E402
from datacomp_assets.core.language import caption_stats, identify_languages  # noqa: E402
from datacomp_assets.metadata.safety import image_fingerprints  # noqa: E402
from datacomp_assets.pool.download import check_against_ground_truth, download_shards  # noqa: E402
from datacomp_assets.world.index import write_pool_index  # noqa: E402
from datacomp_assets.world.web import WebConfig, image_bytes, sample  # noqa: E402
from datacomp_assets.world.web_server import SyntheticWebServer, free_port  # noqa: E402

TINY = SCALES["tiny"]


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def _write_image(args):
    config, index, directory = args
    (Path(directory) / f"{index}.jpg").write_bytes(image_bytes(sample(index, config)))


class QuietFileHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def static_baseline(config: WebConfig, n: int, work: Path, processes: int) -> dict:
    """Download the same n images from a static file server (no rendering, no faults)."""
    images = work / "static_images"
    images.mkdir()
    with Pool(processes) as pool:
        pool.map(_write_image, [(config, i, str(images)) for i in range(n)], chunksize=64)
    handler = functools.partial(QuietFileHandler, directory=str(images))
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        index = work / "static_index.parquet"
        base = f"http://127.0.0.1:{server.server_address[1]}"
        pq.write_table(pa.table({"uid": [sample(i, config).uid for i in range(n)],
                                 "url": [f"{base}/{i}.jpg" for i in range(n)],
                                 "text": [sample(i, config).text for i in range(n)]}), index)
        summary = download_shards(index, work / "static_shards", TINY.image_size, TINY.shard_size,
                                  processes=processes, timeout=TINY.download_timeout)
    finally:
        server.shutdown()
    return {"images_per_second": round(summary.images_per_second, 1), "seconds": round(summary.elapsed_s, 1),
            "successes": summary.successes}


def metadata_groups(shards_dir: Path) -> dict:
    """Rows per second of each metadata feature group over the downloaded shards."""
    records, images = [], []
    for tar in sorted(shards_dir.glob("*.tar")):
        r, i = read_downloaded(tar)
        records += r
        images += i
    texts = [r["text"] for r in records]
    n = len(records)
    _, lang_s = timed(lambda: (identify_languages(texts), caption_stats(texts)))
    figures = {"rows": n, "language_and_caption_stats": round(n / lang_s)}
    for prefix, model_name in SCORER_MODELS.items():
        model, preprocess, tokenizer = load_model(model_name)  # throughput does not depend on the weights
        _, s = timed(Scorer(prefix, model, preprocess, tokenizer).embed, images, texts)
        figures[f"embeddings_and_scores_{prefix}"] = round(n / s)
    _, s = timed(lambda: ([detect_faces(im) for im in images], image_fingerprints(images)))
    figures["image_statistics_faces_and_fingerprints"] = round(n / s)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_pool_"))
    config = WebConfig()

    with SyntheticWebServer(config, port=free_port()) as server:
        index, index_s = timed(write_pool_index, config, args.samples, server.base_url, work / "index",
                               processes=args.processes)
        web, _ = timed(download_shards, work / "index" / "index.parquet", work / "shards", TINY.image_size,
                       TINY.shard_size, processes=args.processes, timeout=TINY.download_timeout)
    audit = check_against_ground_truth(work / "shards", work / "index" / "ground_truth.parquet")
    accounted = all(v["injected"] == v["observed"] for k, v in audit.items() if k != "no_fault")
    baseline = static_baseline(config, args.samples, work, args.processes)
    figures = {
        "benchmark": "pool", "samples": args.samples, "processes": args.processes,
        "index_seconds": round(index_s, 1), "index_sha256_seconds": round(index["sha256_seconds"], 1),
        "synthetic_web": {"images_per_second": round(web.images_per_second, 1), "seconds": round(web.elapsed_s, 1),
                          "success_rate": round(web.success_rate, 4), "failures_by_kind": web.failures_by_kind},
        "static_baseline": baseline,
        "synthetic_vs_static": round(web.images_per_second / baseline["images_per_second"], 2),
        "faults_accounted": accounted,
        "unexpected_failures": audit["no_fault"]["failed"],
        "metadata_rows_per_second": metadata_groups(work / "shards"),
        "workdir": str(work),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
