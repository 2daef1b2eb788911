"""The files a paper scale's methods need that this project cannot ship, each named in the scale's configuration.

At `tiny` the miniature makes its own stand-ins (trained scorers, the ImageNet analogue, entries from the
curated source). At a published pool each is a file the user supplies; a missing one fails at once, naming the
setting, what the file is and where the public one comes from (`docs/scales.md` shows the same table).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from datacomp_assets.core.scales import ScaleConfig


@dataclass(frozen=True)
class UserInput:
    setting: str        # the ScaleConfig field that names the file
    what: str
    public_source: str
    columns: tuple[str, ...]  # the per-sample columns computed from it


INPUTS = {
    "imagenet_embeddings": UserInput(
        "imagenet_embeddings",
        "a .npy array (N x 768, float16 or float32) of OpenAI CLIP ViT-L/14 image embeddings of ImageNet-1k "
        "training images, L2-normalized: the image-based baseline's targets",
        "embed the ImageNet-1k training set (image-net.org) with open_clip's ViT-L-14 'openai' weights; DataComp's "
        "baselines code (baselines/image_based_clustering.py) does the same",
        ("in_target_cluster", "normsim")),
    "vas_target_embeddings": UserInput(
        "vas_target_embeddings",
        "a .npy array (N x 768) of L/14 image embeddings of VAS's target distribution (the VAS paper uses "
        "ImageNet-1k's training images); empty: imagenet_embeddings is used",
        "as imagenet_embeddings, or the target set of github.com/hanshen95/VAS",
        ("vas_score",)),
    "metaclip_entries": UserInput(
        "metaclip_entries",
        "MetaCLIP's metadata: a JSON list of strings, or a text file of one entry per line (about 500k "
        "WordNet synsets, Wikipedia unigrams, bigrams and titles)",
        "metadata.json in github.com/facebookresearch/MetaCLIP",
        ("metaclip_keep_probability", "metaclip_draw")),
    "dfn_checkpoint": UserInput(
        "dfn_checkpoint",
        "an open_clip checkpoint of a data filtering network, of the architecture named by dfn_architecture",
        "Apple's DFN weights (huggingface.co/apple/DFN-public), or a CLIP you trained on high-quality pairs",
        ("dfn_score",)),
    "clip_l14_checkpoint": UserInput(
        "clip_l14_checkpoint",
        "an open_clip checkpoint of OpenAI's CLIP ViT-L/14 (the model behind the metadata's clip_l14_* columns), of "
        "the architecture named by clip_l14_architecture: it re-scores images with their text masked or flipped, and "
        "scores generated captions",
        "open_clip's ViT-L-14 'openai' weights (open_clip.create_model_and_transforms('ViT-L-14', "
        "pretrained='openai') downloads them; save the state_dict)",
        ("tmars_score", "text_area_share", "flipped_score", "sieve_score")),
    "captioner_checkpoint": UserInput(
        "captioner_checkpoint",
        "an open_clip checkpoint of a CoCa captioner, of the architecture named by captioner_architecture: SIEVE "
        "samples 8 captions of each downloaded image with it (its sentence encoder is clip_l14_checkpoint's text "
        "tower), recaptioning one",
        "open_clip's coca_ViT-L-14 'mscoco_finetuned_laion2B-s13B-b90k' weights (open_clip.create_model_and_transforms("
        "'coca_ViT-L-14', pretrained='mscoco_finetuned_laion2B-s13B-b90k') downloads them; save the state_dict)",
        ("sieve_score", "generated_caption")),
    "hype_heads": UserInput(
        "hype_heads",
        "HYPE's hyperbolic heads: a file written by datacomp_assets.filtering.hyperbolic.save_heads, trained on "
        "L/14 embeddings of high-quality pairs (the MERU loss); it maps the published L/14 embeddings into the "
        "Lorentz model",
        "train them with hyperbolic.train_heads on the L/14 embeddings of a curated set (e.g. CC12M); HYPE's own "
        "MERU checkpoints (github.com/naver-ai/hype) embed pixels, not the published embeddings",
        ("hype_score", "hype_image_specificity", "hype_text_specificity", "hype_entailment")),
}


def input_path(scale: ScaleConfig, name: str) -> Path | None:
    """The configured file of input `name` (None when the scale names none); VAS falls back to ImageNet's."""
    value = getattr(scale, name) or (scale.imagenet_embeddings if name == "vas_target_embeddings" else "")
    return Path(value) if value else None


def missing_message(scale: ScaleConfig, name: str, problem: str) -> str:
    spec = INPUTS[name]
    return (f"scale {scale.name!r}: {problem}. `{spec.setting}` is {spec.what}. Public source: {spec.public_source}. "
            f"Set `{spec.setting} = \"/path/to/file\"` under [{scale.name}] in a scale file named by "
            f"$DATACOMP_SCALES (docs/scales.md).")


def require_input(scale: ScaleConfig, name: str) -> Path:
    """The input's file, or FileNotFoundError naming the setting, the file and where the public one comes from."""
    path = input_path(scale, name)
    if path is None:
        raise FileNotFoundError(missing_message(scale, name, f"no `{INPUTS[name].setting}` is configured"))
    if not path.is_file():
        raise FileNotFoundError(missing_message(scale, name, f"`{INPUTS[name].setting}` = {path} does not exist"))
    return path


def inputs_for_columns(columns: Iterable[str]) -> list[str]:
    """The inputs whose features these columns are."""
    wanted = set(columns)
    return [name for name, spec in INPUTS.items() if wanted & set(spec.columns)]


def configured_problems(scale: ScaleConfig, names: Iterable[str]) -> list[str]:
    """For each input in `names`: the message of a missing or unset file (an empty list: all there)."""
    problems = []
    for name in names:
        try:
            require_input(scale, name)
        except FileNotFoundError as err:
            problems.append(str(err))
    return problems
