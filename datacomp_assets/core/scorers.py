"""The two scorer CLIPs that give the tiny pool its `clip_b32_*` and `clip_l14_*` columns.

No pretrained CLIP can be fetched offline, so at `tiny` the pipeline trains two CLIPs of different sizes
on the curated source (the Data Filtering Networks idea: a filter network trained on high-quality
pairs) and uses them where the paper uses OpenAI's ViT-B/32 and ViT-L/14.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from datacomp_assets.core.layout import Layout, run_checkpoint
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


DFN_RUN = "dfn"  # the DFN's training run, under the dfn_model folder

# SIEVE's captioner: an open_clip CoCa (contrastive + captioning losses), trained on the curated source at tiny.
CAPTIONER_MODEL = "datacomp-tiny-coca"
CAPTIONER_RUN = "captioner"  # its training run, under the captioner_model folder


def captioner_recipe(scale: ScaleConfig) -> ScaleConfig:
    """The scale's recipe for the tiny captioner: the scorers' budget on the curated source (open_clip's trainer
    picks its CoCa loss from the model's name)."""
    return replace(scale, name=f"{scale.name}-captioner", model=CAPTIONER_MODEL, samples_seen=scale.scorer_samples_seen)


# Models scored over the pool's downloaded images (the image_scores asset), each giving a `<name>_score` column:
# the data filtering network's cosine; T-MARS's L/14 cosine with the image's text masked; the L/14 cosine of the
# horizontally flipped image (The Devil Is in the Details: a flip breaks the reading of text, not the seeing);
# SIEVE's best match between the alt-text and the captioner's captions of the image (filtering/sieve.py).
IMAGE_SCORERS = ("dfn", "tmars", "flipped", "sieve")
# The bring-your-own-data source of the pool's images with the captioner's captions (filtering/recaption.py).
RECAPTIONED_SOURCE = "recaptioned"
# The CLIP each scorer runs: the DFN, or the model behind the `clip_l14_*` columns (OpenAI's L/14; at tiny the
# L/14 scorer trained here), whose text tower is SIEVE's sentence encoder (SIEVE also runs the captioner).
SCORER_MODEL = {"dfn": "dfn", "tmars": "l14", "flipped": "l14", "sieve": "l14"}


def image_score_column(scorer: str) -> str:
    return f"{scorer}_score"


def scorer_checkpoint(layout: Layout, scale: ScaleConfig, prefix: str) -> Path:
    """The trained scorer standing in for OpenAI's CLIP `prefix` (b32 or l14)."""
    recipe = scorer_recipe(scale, prefix, scale.scorer_samples_seen)
    return run_checkpoint(layout.scorer_models(scale.name), prefix, recipe.epochs)


def dfn_checkpoint(layout: Layout, scale: ScaleConfig) -> Path:
    return run_checkpoint(layout.dfn_model(scale.name), DFN_RUN, dfn_recipe(scale).epochs)


def captioner_checkpoint(layout: Layout, scale: ScaleConfig) -> Path:
    return run_checkpoint(layout.captioner_model(scale.name), CAPTIONER_RUN, captioner_recipe(scale).epochs)
