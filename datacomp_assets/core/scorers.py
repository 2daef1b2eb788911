"""The two scorer CLIPs that give the tiny pool its `clip_b32_*` and `clip_l14_*` columns.

No pretrained CLIP can be fetched offline, so at `tiny` the pipeline trains two CLIPs of different sizes
on the curated source (the Data Filtering Networks idea: a filter network trained on high-quality
pairs) and uses them where the paper uses OpenAI's ViT-B/32 and ViT-L/14.
"""

from __future__ import annotations

from dataclasses import replace

from datacomp_assets.core.scales import ScaleConfig

# reference npz/column prefix -> our architecture standing in for it
SCORER_MODELS = {"b32": "datacomp-tiny-b32", "l14": "datacomp-tiny-l14"}


def scorer_recipe(scale: ScaleConfig, prefix: str, samples_seen: int) -> ScaleConfig:
    """The scale's training recipe, with the scorer's architecture and budget."""
    return replace(scale, name=f"{scale.name}-scorer-{prefix}", model=SCORER_MODELS[prefix],
                   samples_seen=samples_seen)


DFN_MODEL = "datacomp-tiny"  # the data filtering network: the benchmark's own architecture


def dfn_recipe(scale: ScaleConfig) -> ScaleConfig:
    """The scale's recipe for the tiny data filtering network (trained on the curated source)."""
    return replace(scale, name=f"{scale.name}-dfn", model=DFN_MODEL, samples_seen=scale.samples_seen)
