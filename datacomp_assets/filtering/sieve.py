"""SIEVE (Mahmoud et al., CVPR 2024): how well an alt-text matches the captions a captioner writes for its image
(plain Python; no Dagster).

A captioner trained on small, well-aligned data writes several captions per image by nucleus sampling; generic
phrases ("an image of", "stock photo") are masked from the alt-text and from each caption; the score is the
largest cosine, in a sentence-embedding space, between the masked alt-text and a masked caption
(facebookresearch/SIEVE: `webdataset_inference.py`, `sentence_similarity_inference.py`). Its sampling settings are
the reference's (BLIP's `generate(sample=True, top_p=0.9, max_length=20, min_length=5)`, 8 sequences, repetition
penalty 1.1: with BLIP's 4-token prompt, 1 to 16 new tokens). The captioner is an open_clip CoCa here, and the
sentence encoder the L/14 CLIP's text tower (the reference's `--clip_text_encoder` option) instead of
all-MiniLM-L6-v2, which cannot be fetched offline (docs/strategies.md).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

# SIEVE's generic ("medium") phrases, in its order: each is removed, case-insensitively and wherever it occurs
# (inside words too, as the reference's `re.sub` does), from the alt-text and from every generated caption.
GENERIC_PHRASES = ("an image of", "a photo of", "stock photo", "photo stock", "a photo", "an image", "image", "photo")
N_CAPTIONS = 8
TOP_P = 0.9
MIN_NEW_TOKENS = 1
MAX_NEW_TOKENS = 16
REPETITION_PENALTY = 1.1

TextEncoder = Callable[[list[str]], np.ndarray]  # texts -> one (L2-normalised) embedding per row
_PATTERNS = [re.compile(re.escape(phrase), re.IGNORECASE) for phrase in GENERIC_PHRASES]


def mask_generic_phrases(texts: Sequence[str]) -> list[str]:
    """Each text with SIEVE's generic phrases removed (then runs of spaces closed up)."""
    out = []
    for text in texts:
        for pattern in _PATTERNS:
            text = pattern.sub("", text)
        out.append(" ".join(text.split()))
    return out


def _nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Probabilities restricted to the smallest set of most likely tokens whose mass reaches top_p (as
    transformers' TopPLogitsWarper keeps them), renormalised by `multinomial`."""
    probs = logits.float().softmax(-1)
    sorted_probs, order = probs.sort(-1, descending=True)
    before = sorted_probs.cumsum(-1) - sorted_probs  # the mass of the more likely tokens
    sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs)


@torch.no_grad()
def generated_captions(model, tokenizer, preprocess, images: Sequence[Image.Image], n_captions: int = N_CAPTIONS,
                       seed: int = 0, *, batch_size: int = 64, top_p: float = TOP_P,
                       min_new_tokens: int = MIN_NEW_TOKENS, max_new_tokens: int = MAX_NEW_TOKENS,
                       repetition_penalty: float = REPETITION_PENALTY, device: str = "cpu") -> list[list[str]]:
    """`n_captions` captions per image from an open_clip CoCa by nucleus sampling, `batch_size` images (times
    n_captions sequences) at a time, from a generator seeded with `seed`: the same images and seed give the
    same captions.

    The loop is open_clip's `CoCa.generate(generation_type="top_p")` (the image encoded once, the text decoder
    run on the sequence so far at each step), written out so that it samples from its own seeded generator and
    does not need `transformers` for its logits processors. On a CPU it runs on one intra-op thread: its ops are
    small, and on 2 busy cores two threads captioned 3x slower than one (32 against 92 images/s, 8 captions each)."""
    threads = torch.get_num_threads()
    if torch.device(device).type == "cpu":
        torch.set_num_threads(1)
    try:
        return _sample_captions(model, tokenizer, preprocess, images, n_captions, seed, batch_size, top_p,
                                min_new_tokens, max_new_tokens, repetition_penalty, device)
    finally:
        torch.set_num_threads(threads)


def _sample_captions(model, tokenizer, preprocess, images, n_captions, seed, batch_size, top_p, min_new_tokens,
                     max_new_tokens, repetition_penalty, device) -> list[list[str]]:
    sot, eot, pad = tokenizer.sot_token_id, tokenizer.eot_token_id, getattr(model, "pad_id", 0)
    max_new_tokens = min(max_new_tokens, tokenizer.context_length - 1)  # sot + tokens within the text tower
    generator = torch.Generator(device).manual_seed(seed)
    captions: list[list[str]] = []
    for start in range(0, len(images), batch_size):
        pixels = torch.stack([preprocess(image) for image in images[start:start + batch_size]]).to(device)
        encoded = model(pixels)
        latent = encoded["image_features"].repeat_interleave(n_captions, 0)
        embs = encoded["image_embs"].repeat_interleave(n_captions, 0)
        seqs = torch.full((len(latent), 1), sot, dtype=torch.long, device=device)
        done = torch.zeros(len(latent), dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            active = (~done).nonzero().squeeze(1)
            x = seqs[active]
            logits = model(None, x, image_latent=latent[active], image_embs=embs[active],
                           output_labels=False)["logits"][:, -1].float()
            seen = logits.gather(1, x)  # transformers' RepetitionPenaltyLogitsProcessor
            logits.scatter_(1, x, torch.where(seen < 0, seen * repetition_penalty, seen / repetition_penalty))
            logits[:, [sot, pad]] = float("-inf")  # never text (open_clip's generate ends a caption at a pad)
            if step < min_new_tokens:
                logits[:, eot] = float("-inf")
            token = torch.multinomial(_nucleus(logits, top_p), 1, generator=generator).squeeze(1)
            column = torch.full((len(seqs),), eot, dtype=torch.long, device=device)
            column[active] = token
            seqs = torch.cat([seqs, column[:, None]], 1)
            done[active] = token == eot
            if done.all():
                break
        for row in seqs[:, 1:].tolist():
            row = row[:row.index(eot)] if eot in row else row
            captions.append(" ".join(tokenizer.decode(row).split()))
    return [captions[i:i + n_captions] for i in range(0, len(captions), n_captions)]


def sieve_scores(alt_texts: Sequence[str], generated: Sequence[Sequence[str]],
                 text_encoder: TextEncoder) -> tuple[np.ndarray, list[str]]:
    """(SIEVE's score of each pair, the generated caption that gave it): the largest cosine between the masked
    alt-text and a masked generated caption of its image. A pair whose best caption masks to nothing scores 0, as
    in the reference. Every image needs the same number of captions."""
    n = len(alt_texts)
    if n == 0:
        return np.empty(0, np.float32), []
    k = len(generated[0])
    if len(generated) != n or k == 0 or any(len(caps) != k for caps in generated):
        raise ValueError(f"sieve_scores needs the same number (> 0) of captions for each of the {n} alt-texts")
    masked = mask_generic_phrases([c for caps in generated for c in caps])
    texts = mask_generic_phrases(alt_texts) + masked
    unique, row = np.unique(np.array(texts, dtype=object), return_inverse=True)  # each text embedded once
    embedded = np.asarray(text_encoder(list(unique)), np.float64)
    embedded /= np.maximum(np.linalg.norm(embedded, axis=1, keepdims=True), 1e-12)
    alt, gen = embedded[row[:n]], embedded[row[n:]]
    cosine = np.einsum("nkd,nd->nk", gen.reshape(n, k, -1), alt)
    best = cosine.argmax(1)
    scores = cosine[np.arange(n), best].astype(np.float32)
    scores[[masked[i * k + b] == "" for i, b in enumerate(best)]] = 0.0
    return scores, [generated[i][b] for i, b in enumerate(best)]


def shard_seed(seed: int, shard: str) -> int:
    """The sampling seed of one shard: a resumed run writes the captions an uninterrupted one would have."""
    return zlib.crc32(f"{seed}:{shard}".encode())


@dataclass
class SieveScoring:
    """The score function of `image_scores.write_shard_scores` for SIEVE: a shard's captions, then its scores;
    its extra column `generated_caption` holds the caption that gave each score."""

    captioner: torch.nn.Module
    tokenizer: Callable
    preprocess: Callable
    text_encoder: TextEncoder
    seed: int = 0
    n_captions: int = N_CAPTIONS
    batch_size: int = 64
    device: str = "cpu"

    def __call__(self, shard: str, records: list[dict], images: list[Image.Image]):
        generated = generated_captions(self.captioner, self.tokenizer, self.preprocess, images, self.n_captions,
                                       shard_seed(self.seed, shard), batch_size=self.batch_size, device=self.device)
        scores, best = sieve_scores([r["text"] for r in records], generated, self.text_encoder)
        return scores, {"generated_caption": np.array(best, dtype=str)}
