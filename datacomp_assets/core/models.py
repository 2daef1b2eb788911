"""Model loading and embedding: the miniature CLIP architectures registered with open_clip by name, checkpoints
read with weights_only=True, and normalised image and caption embeddings."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
# The tiny captioner's tokenizer merges (core/bpe.py), named by its config relative to MODEL_CONFIG_DIR.
CAPTIONER_VOCABULARY = MODEL_CONFIG_DIR / "datacomp-tiny-coca-bpe.txt.gz"


def register_model_configs() -> None:
    """Make `datacomp-tiny-*` known to open_clip (idempotent).

    open_clip opens a config's `text_cfg.tokenizer_kwargs.bpe_path` as given, so the relative paths of our
    configs are resolved here, in every process that registers them (the trainer's too). open_clip keeps its
    registry in a module dictionary that `get_model_config` only copies: it is the one place to resolve them."""
    initialize_coca_decoders()
    if "datacomp-tiny" not in open_clip.list_models():
        open_clip.add_model_config(MODEL_CONFIG_DIR)
    registry = open_clip.factory._MODEL_CONFIGS
    for config_file in MODEL_CONFIG_DIR.glob("*.json"):
        kwargs = registry.get(config_file.stem, {}).get("text_cfg", {}).get("tokenizer_kwargs", {})
        if "bpe_path" in kwargs:
            kwargs["bpe_path"] = str(MODEL_CONFIG_DIR / kwargs["bpe_path"])  # an absolute path stays as it is


def initialize_coca_decoders() -> None:
    """Make a new CoCa's text decoder start from initialised weights (idempotent).

    open_clip's `MultimodalTransformer` (the decoder of every CoCa) creates its vocabulary projection with
    `torch.empty` and never runs its `init_parameters` (which names attributes it lacks: open_clip issue #554,
    PR #551), so a CoCa trained from scratch starts from whatever memory held, NaN at times. This runs, after its
    constructor, the initialisation that method means: that of open_clip's text tower. Loaded checkpoints replace
    these weights; only training from scratch (the tiny captioner) depends on it."""
    decoder = open_clip.transformer.MultimodalTransformer
    if getattr(decoder.__init__, "initializes_parameters", False):
        return
    constructor = decoder.__init__

    def __init__(self, *args, **kwargs):
        constructor(self, *args, **kwargs)
        proj_std = (self.width ** -0.5) * ((2 * self.layers) ** -0.5)
        attn_std, fc_std = self.width ** -0.5, (2 * self.width) ** -0.5
        for block in (*self.resblocks, *self.cross_attn):
            torch.nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            torch.nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            torch.nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            torch.nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        torch.nn.init.normal_(self.text_projection, std=self.width ** -0.5)

    __init__.initializes_parameters = True
    decoder.__init__ = __init__


def load_model(model_name: str, checkpoint: str | Path | None = None, device: str = "cpu"):
    """(model, preprocess, tokenizer) for a model name and an optional open_clip checkpoint file.

    Checkpoints are read with `weights_only=True`; open_clip's trainer saves `state_dict` under a
    `module.` prefix when it ran distributed, which is stripped here.
    """
    import torch

    register_model_configs()
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=None, device=device)
    if checkpoint is not None:
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        state = state.get("state_dict", state)
        state = {k.removeprefix("module."): v for k, v in state.items()}
        model.load_state_dict(state)
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(model_name)


def forward_check(model_name: str, checkpoint: str | Path) -> str | None:
    """None when the checkpoint loads with weights_only=True and one forward pass gives finite embeddings;
    otherwise what went wrong, in one line."""
    import torch

    try:
        model, _, tokenizer = load_model(model_name, checkpoint)
        size = model.visual.image_size
        size = size if isinstance(size, tuple) else (size, size)
        with torch.no_grad():
            image = model.encode_image(torch.zeros(2, 3, *size))
            text = model.encode_text(tokenizer(["a photo of a red circle", "two blue squares"]))
    except Exception as error:  # unreadable file, wrong architecture, missing keys ...
        return f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
    if not (torch.isfinite(image).all() and torch.isfinite(text).all()):
        return "the forward pass gave non-finite embeddings"
    return None


@torch.no_grad()
def encode_image_batches(model, batches: Iterable[torch.Tensor], device: str) -> torch.Tensor:
    """Normalised features of preprocessed image batches, concatenated on the CPU."""
    feats = [F.normalize(model.encode_image(batch.to(device)).float(), dim=-1).cpu() for batch in batches]
    return torch.cat(feats) if feats else torch.zeros(0)


def encode_images(model, preprocess, images: Iterable[Image.Image], batch_size: int, device: str) -> torch.Tensor:
    """Normalised features of PIL images, preprocessed batch by batch (the images may be a stream)."""
    def batches():
        batch = []
        for image in images:
            batch.append(preprocess(image))
            if len(batch) == batch_size:
                yield torch.stack(batch)
                batch = []
        if batch:
            yield torch.stack(batch)

    return encode_image_batches(model, batches(), device)


@dataclass
class Scorer:
    """A CLIP model that embeds images and captions (prefix `b32` or `l14`, as in the reference's keys)."""

    prefix: str
    model: torch.nn.Module
    preprocess: Callable
    tokenizer: Callable
    device: str = "cpu"

    @torch.no_grad()
    def embed_text(self, texts: list[str], batch_size: int = 512):
        """Normalised caption embeddings (float32 numpy), from the text tower alone."""
        out = []
        for i in range(0, len(texts), batch_size):
            t = self.tokenizer(texts[i:i + batch_size]).to(self.device)
            out.append(torch.nn.functional.normalize(self.model.encode_text(t).float(), dim=-1).cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)

    @torch.no_grad()
    def embed(self, images: list[Image.Image], texts: list[str], batch_size: int = 512):
        img, txt = [], []
        for i in range(0, len(images), batch_size):
            x = torch.stack([self.preprocess(im) for im in images[i:i + batch_size]]).to(self.device)
            img.append(torch.nn.functional.normalize(self.model.encode_image(x).float(), dim=-1).cpu())
            t = self.tokenizer(texts[i:i + batch_size]).to(self.device)
            txt.append(torch.nn.functional.normalize(self.model.encode_text(t).float(), dim=-1).cpu())
        return torch.cat(img).numpy(), torch.cat(txt).numpy()
