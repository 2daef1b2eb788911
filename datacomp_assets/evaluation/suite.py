"""The tiny zero-shot evaluation suite, written in clip_benchmark's webdataset layout.

Each task is a miniature analogue of a DataComp evaluation set (ImageNet, ImageNet-Sketch, CLEVR Counts,
MNIST, Flickr30k ...). Classification tasks are laid out like the `djghosh/wds_{task}_test` repos:

    <root>/<task>/classnames.txt                           one class name per line
    <root>/<task>/zeroshot_classification_templates.txt    one prompt template per line, with {c}
    <root>/<task>/test/nshards.txt                         number of shards
    <root>/<task>/test/{i}.tar                             samples <key>.jpg + <key>.cls (label as text)

Retrieval tasks have only `test/` with samples <key>.jpg + <key>.txt (captions, one per line).
Every task also gets an `info.json` (not part of clip_benchmark's layout) recording what was built, so a
rebuild can tell a complete task from a stale one.

Synthetic images come from `pool.synthetic_web` under a namespace of their own ("eval/<task>"), so no
evaluation image coincides with a pool image. This module imports no Dagster.
"""

from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from datacomp_assets.pool.shards import write_webdataset

from datacomp_assets.pool.synthetic_web import (
    COLORS, NUMBER_WORDS, OBJECTS, english_caption, encode_jpeg, render, sample,
)

IMAGE_SIDE = 64  # stored resolution; the tiny models see 32x32 after preprocessing
SAMPLES_PER_SHARD = 1000
SUITE_FORMAT_VERSION = 1  # bump when builders change, so old suites are rebuilt

# What a builder yields: an image and its target (an int label, or a list of captions for retrieval).
Example = tuple[Image.Image, "int | list[str]"]


@dataclass(frozen=True)
class EvalTask:
    """One evaluation task: how it is scored and how its test set is generated."""

    key: str
    group: str
    kind: str  # "classification" or "retrieval"
    main_metric: str
    builder: Callable[[float], Iterator[Example]]
    classnames: tuple[str, ...] = ()
    templates: tuple[str, ...] = ()


# ---------------------------------------------------------------- synthetic images

def _clean_sample(task_key: str, index: int, **fixed):
    """A clean synthetic sample of the task's namespace with some attributes forced, drawn square."""
    s = sample(index, namespace=f"eval/{task_key}", noise={})
    # A square canvas keeps the whole scene inside CLIP's centre crop.
    return replace(s, height=s.width, **fixed)


def _to_stored_image(s) -> Image.Image:
    return render(s).resize((IMAGE_SIDE, IMAGE_SIDE), Image.LANCZOS)


def _per_class(size_scale: float, full: int) -> int:
    return max(1, round(full * size_scale))


def _balanced_labels(n_classes: int, per_class: int) -> Iterator[tuple[int, int]]:
    """(index, label) pairs cycling through the classes, so every prefix is nearly balanced."""
    for i in range(n_classes * per_class):
        yield i, i % n_classes


# ---------------------------------------------------------------- builders

OBJECT_STYLES = ("photo", "drawing", "painting")  # the pool's common styles; "sketch" is the shift

OBJECT_TEMPLATES = (
    "a photo of a {c}.", "a picture of a {c}.", "an image of a {c}.", "a drawing of a {c}.",
    "a painting of a {c}.", "a sketch of a {c}.", "a {c} on a plain background.", "a photo of the {c}.",
)


def build_objects(size_scale: float) -> Iterator[Example]:
    """ImageNet analogue: which object, one of it, in any colour and a common style."""
    for i, label in _balanced_labels(len(OBJECTS), _per_class(size_scale, 50)):
        style = OBJECT_STYLES[(i // len(OBJECTS)) % len(OBJECT_STYLES)]
        s = _clean_sample("objects", i, object=OBJECTS[label], count=1, style=style)
        yield _to_stored_image(s), label


def objects_training_images(per_class: int) -> Iterator[Example]:
    """The ImageNet analogue's *training* images: same classes and styles as `objects`, drawn from their own
    namespace, so never a test image. Filters use them as their target set (image_based, VAS)."""
    for i, label in _balanced_labels(len(OBJECTS), per_class):
        style = OBJECT_STYLES[(i // len(OBJECTS)) % len(OBJECT_STYLES)]
        s = replace(sample(i, namespace="train/objects", noise={}), object=OBJECTS[label], count=1, style=style)
        yield _to_stored_image(replace(s, height=s.width)), label


def build_objects_sketch(size_scale: float) -> Iterator[Example]:
    """ImageNet-Sketch analogue: the same classes, drawn only as sketches (rare in the pool)."""
    for i, label in _balanced_labels(len(OBJECTS), _per_class(size_scale, 25)):
        s = _clean_sample("objects_sketch", i, object=OBJECTS[label], count=1, style="sketch")
        yield _to_stored_image(s), label


def build_counting(size_scale: float) -> Iterator[Example]:
    """CLEVR Counts analogue: how many objects (1-4), whatever they are."""
    for i, label in _balanced_labels(4, _per_class(size_scale, 100)):
        s = _clean_sample("counting", i, count=label + 1)
        yield _to_stored_image(s), label


def build_colors(size_scale: float) -> Iterator[Example]:
    """Which colour the objects are (sketches carry no colour, so they are excluded)."""
    colors = list(COLORS)
    for i, label in _balanced_labels(len(colors), _per_class(size_scale, 50)):
        style = OBJECT_STYLES[(i // len(colors)) % len(OBJECT_STYLES)]
        s = _clean_sample("colors", i, color=colors[label], style=style)
        yield _to_stored_image(s), label


def build_digits(size_scale: float) -> Iterator[Example]:
    """MNIST analogue from real images: scikit-learn's bundled 8x8 handwritten digits."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    per_class = _per_class(size_scale, int(np.bincount(digits.target).max()))
    taken = np.zeros(10, dtype=int)
    for pixels, label in zip(digits.images, digits.target):
        if taken[label] >= per_class:
            continue
        taken[label] += 1
        # Values are 0..16 ink; keep white-on-black like MNIST.
        gray = Image.fromarray((pixels * (255 / 16)).astype(np.uint8), "L")
        yield gray.resize((32, 32), Image.BILINEAR).convert("RGB"), int(label)


RETRIEVAL_SEED = 20240  # caption seeds, apart from any seed the pool uses


def retrieval_captions(s, index: int) -> list[str]:
    """2 or 3 distinct English captions of one sample, each drawn with its own seed."""
    wanted = 2 + index % 2
    captions: list[str] = []
    for attempt in range(100):
        rng = np.random.default_rng([RETRIEVAL_SEED, index, attempt])
        caption = english_caption(rng, s.object, s.color, s.count, s.style)
        if caption not in captions:
            captions.append(caption)
        if len(captions) == wanted:
            break
    return captions


def build_retrieval(size_scale: float) -> Iterator[Example]:
    """Flickr30k analogue: clean images of the pool's distribution, each with several captions."""
    for i in range(max(2, round(300 * size_scale))):
        s = _clean_sample("retrieval", i)
        yield _to_stored_image(s), retrieval_captions(s, i)


# ---------------------------------------------------------------- registry

TASKS: dict[str, EvalTask] = {t.key: t for t in [
    EvalTask("objects", "ImageNet", "classification", "acc1", build_objects,
             classnames=OBJECTS, templates=OBJECT_TEMPLATES),
    EvalTask("objects_sketch", "ImageNet distribution shifts", "classification", "acc1",
             build_objects_sketch, classnames=OBJECTS, templates=OBJECT_TEMPLATES),
    EvalTask("counting", "VTAB", "classification", "acc1", build_counting,
             classnames=tuple(NUMBER_WORDS[n] for n in (1, 2, 3, 4)),
             templates=("a photo of {c} objects.", "a picture of {c} shapes.", "an image of {c} things.",
                        "{c} shapes on a plain background.")),
    EvalTask("colors", "VTAB", "classification", "acc1", build_colors,
             classnames=tuple(COLORS),
             templates=("a photo of a {c} object.", "a picture of a {c} shape.", "something {c}.",
                        "a {c} thing on a plain background.")),
    EvalTask("digits", "other", "classification", "mean_per_class_recall", build_digits,
             classnames=("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
             templates=("a photo of the number {c}.", 'a photo of the number: "{c}".')),
    EvalTask("retrieval", "Retrieval", "retrieval", "mean_recall@1", build_retrieval),
]}


# ---------------------------------------------------------------- writing

def write_task(task: EvalTask, task_dir: Path, size_scale: float) -> int:
    """Write one task's files into task_dir (which must not exist); returns the number of samples."""
    test_dir = task_dir / "test"
    test_dir.mkdir(parents=True)
    if task.kind == "classification":
        (task_dir / "classnames.txt").write_text("\n".join(task.classnames) + "\n")
        (task_dir / "zeroshot_classification_templates.txt").write_text("\n".join(task.templates) + "\n")
    def encoded():
        for i, (image, target) in enumerate(task.builder(size_scale)):
            label = str(int(target)) if task.kind == "classification" else "\n".join(target)
            yield f"{i:06d}", {"jpg": encode_jpeg(image), "cls" if task.kind == "classification" else "txt":
                               label.encode()}

    samples, count, shard = encoded(), 0, 0
    while chunk := list(itertools.islice(samples, SAMPLES_PER_SHARD)):
        count += write_webdataset(test_dir / f"{shard}.tar", chunk)
        shard += 1
    (test_dir / "nshards.txt").write_text(f"{shard}\n")
    info = {"key": task.key, "group": task.group, "kind": task.kind, "main_metric": task.main_metric,
            "num_samples": count, "size_scale": size_scale, "format_version": SUITE_FORMAT_VERSION,
            "classnames": list(task.classnames)}
    (task_dir / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    return count


def read_info(task_dir: Path) -> dict | None:
    try:
        return json.loads((Path(task_dir) / "info.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def is_complete(task_dir: Path, size_scale: float) -> bool:
    """True when task_dir holds a finished build of the same scale and format."""
    info = read_info(task_dir)
    if info is None:
        return False
    # A different scale, format or class list (e.g. the synthetic world's OBJECTS changed) is stale.
    expected = {"size_scale": size_scale, "format_version": SUITE_FORMAT_VERSION,
                "classnames": list(TASKS[info["key"]].classnames) if info.get("key") in TASKS else None}
    if any(info.get(k) != v for k, v in expected.items()):
        return False
    nshards_file = Path(task_dir) / "test" / "nshards.txt"
    if not nshards_file.exists():
        return False
    nshards = int(nshards_file.read_text().strip())
    return all((Path(task_dir) / "test" / f"{i}.tar").exists() for i in range(nshards))


def build_suite(root: str | Path, tasks: list[str] | None = None, size_scale: float = 1.0) -> dict[str, int]:
    """Build the suite under root (idempotent); returns the number of test samples per task.

    A complete task of the same size_scale is left alone. Others are written to `<task>.tmp` and then
    renamed into place, so a crash never leaves a half-written task that looks complete.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    for key in tasks or list(TASKS):
        task = TASKS[key]
        task_dir = root / key
        if is_complete(task_dir, size_scale):
            counts[key] = read_info(task_dir)["num_samples"]
            continue
        tmp_dir = root / f"{key}.tmp"
        shutil.rmtree(tmp_dir, ignore_errors=True)
        counts[key] = write_task(task, tmp_dir, size_scale)
        if task_dir.exists():  # a stale or different-scale build
            shutil.rmtree(task_dir)
        tmp_dir.rename(task_dir)
    return counts
