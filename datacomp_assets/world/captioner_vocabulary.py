"""The tiny captioner's vocabulary: BPE merges learned from the curated source's captions.

`datacomp_assets/core/model_configs/datacomp-tiny-coca-bpe.txt.gz` is written by this module
(`python -m datacomp_assets.world.captioner_vocabulary`) and shipped: the captioner's model config names it, and a
model's vocabulary must not change under its checkpoints. Every English word the curated source uses becomes one
token; anything else (the pool's other languages, spam) still tokenizes, byte by byte.
"""

from __future__ import annotations

import sys
from dataclasses import replace

from datacomp_assets.core.bpe import learn_merges, write_merges
from datacomp_assets.core.models import CAPTIONER_VOCABULARY
from datacomp_assets.world.curated import CURATED_NOISE, NAMESPACE
from datacomp_assets.world.web import WebConfig, sample

CORPUS_SIZE = 10_000  # the tiny scale's curated source
MAX_MERGES = 2_000


def curated_captions(n: int = CORPUS_SIZE, config: WebConfig | None = None) -> list[str]:
    """The captions of the curated source's first n pairs (as `write_curated_source` draws them)."""
    balanced = replace(config or WebConfig(), zipf_exponent=0.0)
    return [sample(i, balanced, namespace=NAMESPACE, noise=dict(CURATED_NOISE)).text for i in range(n)]


def captioner_merges() -> list[tuple[str, str]]:
    return learn_merges(curated_captions(), MAX_MERGES)


def main() -> None:
    merges = captioner_merges()
    write_merges(merges, CAPTIONER_VOCABULARY)
    print(f"{len(merges)} merges -> {CAPTIONER_VOCABULARY}", file=sys.stderr)


if __name__ == "__main__":
    main()
