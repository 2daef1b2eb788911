"""The pool's source: where a scale's candidate pool comes from, chosen by the scale's `pool_source`.

Two implementations answer the same questions, so asset bodies ask the source instead of branching on the
scale: the synthetic web (the `tiny` miniature, served on loopback while img2dataset downloads it, with ground
truth kept apart) and the published metadata (the paper's scales: DataComp's parquet files from the Hugging Face
Hub or a local mirror, and the real urls).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import dagster as dg

from datacomp_assets.core.layout import Asset, Layout
from datacomp_assets.core.published import (
    PublishedSource, fetch_published_metadata, published_files, write_download_index)
from datacomp_assets.core.scales import ScaleConfig
from resources.published import PublishedMetadataResource
from resources.synthetic_web import SyntheticWebResource

SOURCES = ("synthetic_web", "published")


def count_table(name: str, counts: dict) -> dg.MetadataValue:
    return dg.MetadataValue.md(f"| {name} | samples |\n|---|---|\n"
                               + "\n".join(f"| {k} | {v} |" for k, v in sorted(counts.items())))


class SyntheticWebPool:
    """The miniature's pool: the synthetic web's pages, a curated source and a noisy one beside it."""

    # Its CLIP scores come from stand-in scorers trained here, so the reference's score thresholds are
    # carried over as pool shares rather than read literally.
    reference_scorers = False
    metadata_published = False  # the metadata is computed here, from the downloaded images
    processes = 1  # the miniature's metadata has its caption features: a rule never computes them

    def __init__(self, web: SyntheticWebResource, scale: ScaleConfig, layout: Layout):
        self.web, self.scale, self.layout = web, scale, layout

    def write_index(self) -> dict:
        """The urls and alt-texts img2dataset reads, and each sample's ground truth in a separate file."""
        from datacomp_assets.world.index import write_pool_index

        config = self.web.web_config()
        summary = write_pool_index(config, self.scale.pool_size, self.web.base_url,
                                   self.layout.pool_index(self.scale.name))
        return {
            "path": dg.MetadataValue.path(str(self.layout.pool_index_file(self.scale.name))),
            "ground_truth": dg.MetadataValue.path(summary["ground_truth_path"]),
            "rows": summary["rows"],
            "sha256_seconds": round(summary["sha256_seconds"], 1),
            "web": dg.MetadataValue.json(config.__dict__),
            "ground_truth_kinds": count_table("kind", summary["kind_counts"]),
            "injected_faults": count_table("fault", summary["fault_counts"]),
        }

    def serving(self) -> contextlib.AbstractContextManager:
        """Serve the web's images on loopback while img2dataset downloads them."""
        return self.web.serve()

    def ground_truth(self) -> Path | None:
        path = self.layout.ground_truth_file(self.scale.name)
        return path if path.exists() else None

    def require_miniature(self, what: str) -> None:
        """Assets that exist only in the miniature (the scorers trained here, the curated source) may run."""

    def write_curated_source(self, out: Path) -> dict:
        """Clean, balanced pairs apart from the pool: what the scorer CLIPs and the DFN train on."""
        from datacomp_assets.world.curated import write_curated_source

        s = self.scale
        return write_curated_source(self.web.web_config(), s.curated_size, out, s.image_size, s.shard_size)

    def write_noisy_source(self, out: Path) -> dict | None:
        """A bring-your-own-data stand-in: the same world with half its captions mismatched."""
        from datacomp_assets.world.curated import write_noisy_source

        s = self.scale
        return write_noisy_source(self.web.web_config(), s.curated_size, out, s.image_size, s.shard_size)


class PublishedPool:
    """A paper scale's pool: DataComp's published metadata, and the real urls it lists."""

    reference_scorers = True  # the metadata's scores are OpenAI CLIP's, as the reference thresholds assume
    metadata_published = True  # the metadata is DataComp's files, joined with caption features

    def __init__(self, published: PublishedMetadataResource, scale: ScaleConfig, layout: Layout):
        self.published, self.scale, self.layout = published, scale, layout

    @property
    def processes(self) -> int:
        """Worker processes for per-file work over the metadata (caption features, on demand)."""
        return self.published.processes or os.cpu_count() or 1

    def metadata_files(self) -> list[Path]:
        """The published parquet files pool_index fetched (or linked from the mirror), in order."""
        return published_files(self.layout.published_metadata(self.scale.name))

    def write_index(self) -> dict:
        # The scale's own mirror first (a user's scale file), then the resource's ($DATACOMP_MIRROR).
        mirror = self.scale.mirror_dir or self.published.published_mirror_dir or None
        source = PublishedSource(self.scale.name, mirror_dir=mirror, include_npz=self.published.include_npz)
        files = fetch_published_metadata(source, self.layout.published_metadata(self.scale.name))
        summary = write_download_index(files, self.layout.pool_index_file(self.scale.name))
        return {"path": dg.MetadataValue.path(summary["path"]), "rows": summary["rows"],
                "metadata_files": len(files), "source": source.mirror_dir or source.repo_id}

    def serving(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def ground_truth(self) -> Path | None:
        return None

    def require_miniature(self, what: str) -> None:
        raise ValueError(
            f"{what} is built only at a scale whose pool is the synthetic web (`tiny`); at {self.scale.name!r} "
            f"its part is played by the published DataComp metadata (OpenAI CLIP's scores and embeddings) and by "
            f"files you supply (docs/scales.md).")

    def write_curated_source(self, out: Path) -> dict:
        self.require_miniature(Asset.CURATED_SOURCE)
        return {}

    def write_noisy_source(self, out: Path) -> dict | None:
        return None


class PoolSourceResource(dg.ConfigurableResource):
    """Where each scale's pool comes from: `for_scale` picks the synthetic web or the published metadata by
    the scale's `pool_source`, configured by the two resources inside."""

    synthetic_web: SyntheticWebResource
    published: PublishedMetadataResource

    def for_scale(self, scale: ScaleConfig, layout: Layout) -> SyntheticWebPool | PublishedPool:
        if scale.pool_source == "synthetic_web":
            return SyntheticWebPool(self.synthetic_web, scale, layout)
        if scale.pool_source == "published":
            return PublishedPool(self.published, scale, layout)
        raise ValueError(f"scale {scale.name!r}: unknown pool_source {scale.pool_source!r}; "
                         f"choose one of {', '.join(SOURCES)}")
