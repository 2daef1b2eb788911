"""The tiny zero-shot evaluation suite, written in clip_benchmark's webdataset layout.

Each task is a miniature analogue of a DataComp evaluation set, in the reference's groups:

    ImageNet                       objects (ImageNet-1k)
    ImageNet distribution shifts   objects_sketch (-Sketch), objects_v2 (-V2), objects_rendition (-R),
                                   objects_hard (-A / ObjectNet)
    VTAB                           counting (CLEVR Counts), colors, styles (DTD), house_numbers (SVHN),
                                   position (CLEVR Distance / dSprites position)
    Retrieval                      retrieval (Flickr30k), retrieval_coco (MSCOCO)
    other                          digits (MNIST; real handwritten digits)

Classification tasks are laid out like the `djghosh/wds_{task}_test` repos:

    <root>/<task>/classnames.txt                           one class name per line
    <root>/<task>/zeroshot_classification_templates.txt    one prompt template per line, with {c}
    <root>/<task>/test/nshards.txt                         number of shards
    <root>/<task>/test/{i}.tar                             samples <key>.jpg + <key>.cls (label as text)

Retrieval tasks have only `test/` with samples <key>.jpg + <key>.txt (captions, one per line).
Every task also gets an `info.json` (not part of clip_benchmark's layout) recording what was built, so a
rebuild can tell a complete task from a stale one.

Synthetic images come from `pool.synthetic_web` under a namespace of their own ("eval/<task>"), so no
evaluation image coincides with a pool image. Sizes are a few hundred images per task: every checkpoint is
scored on the whole suite, so its cost is paid once per strategy. This module imports no Dagster.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageOps

from datacomp_assets.core.files import temporary_sibling
from datacomp_assets.core.shards import write_webdataset
from datacomp_assets.world.web import (
    COLORS, NUMBER_WORDS, OBJECT_STYLES, OBJECTS, STYLES, clean_sample, encode_jpeg, english_caption, render, sample,
)

OBJECTS_TASK = "objects"  # the ImageNet analogue: its class names are the text-based filter's vocabulary
IMAGE_SIDE = 64  # stored resolution; the tiny models see 32x32 after preprocessing
SAMPLES_PER_SHARD = 1000
PAPER = (250, 250, 250)  # the plain ground `render` draws drawings and sketches on
PLACEMENT_SEED = 31337  # seeds what the suite draws beyond `sample` (placements, glyphs), apart from the pool's
SUITE_FORMAT_VERSION = 2  # bump when builders change, so old suites are rebuilt

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

def _task_rng(task_key: str, index: int) -> np.random.Generator:
    """Randomness for what `sample` does not draw (placements, glyphs), from the task's own namespace."""
    ns = int.from_bytes(hashlib.blake2b(f"eval/{task_key}".encode(), digest_size=4).digest(), "little")
    return np.random.default_rng([PLACEMENT_SEED, ns, index])


def _to_stored_image(s) -> Image.Image:
    return _stored(render(s))


def _stored(img: Image.Image) -> Image.Image:
    return img.resize((IMAGE_SIDE, IMAGE_SIDE), Image.LANCZOS)


def _object_cutout(s) -> Image.Image:
    """The sample's one object in drawing style, as RGBA cropped to it and transparent around it."""
    pixels = np.asarray(render(replace(s, count=1, style="drawing")))
    # Drawings are rendered on plain paper, so every other pixel belongs to the object.
    alpha = np.any(pixels != PAPER, axis=-1).astype(np.uint8) * 255
    cutout = Image.fromarray(np.dstack([pixels, alpha]), "RGBA")
    return cutout.crop(cutout.getbbox())


def _fit(cutout: Image.Image, longest: float) -> Image.Image:
    """The cutout resized so that its longer side is `longest` pixels."""
    k = longest / max(cutout.size)
    return cutout.resize((max(1, round(cutout.width * k)), max(1, round(cutout.height * k))), Image.LANCZOS)


def _per_class(size_scale: float, full: int) -> int:
    return max(1, round(full * size_scale))


def _balanced_labels(n_classes: int, per_class: int) -> Iterator[tuple[int, int]]:
    """(index, label) pairs cycling through the classes, so every prefix is nearly balanced."""
    for i in range(n_classes * per_class):
        yield i, i % n_classes


# ---------------------------------------------------------------- ImageNet and its distribution shifts


OBJECT_TEMPLATES = (
    "a photo of a {c}.", "a picture of a {c}.", "an image of a {c}.", "a drawing of a {c}.",
    "a painting of a {c}.", "a sketch of a {c}.", "a {c} on a plain background.", "a photo of the {c}.",
)


def _object_samples(task_key: str, size_scale: float, per_class_full: int) -> Iterator[tuple[int, object]]:
    """(label, sample) of the ImageNet analogue's distribution: one object, the pool's common styles."""
    for i, label in _balanced_labels(len(OBJECTS), _per_class(size_scale, per_class_full)):
        style = OBJECT_STYLES[(i // len(OBJECTS)) % len(OBJECT_STYLES)]
        yield label, clean_sample(task_key, i, object=OBJECTS[label], count=1, style=style)


def build_objects(size_scale: float) -> Iterator[Example]:
    """ImageNet analogue: which object, one of it, in any colour and a common style."""
    # The pool's eval_copy samples copy these images (synthetic_web.eval_objects_sample): keep them as is.
    for label, s in _object_samples("objects", size_scale, 50):
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
    for i, label in _balanced_labels(len(OBJECTS), _per_class(size_scale, 20)):
        s = clean_sample("objects_sketch", i, object=OBJECTS[label], count=1, style="sketch")
        yield _to_stored_image(s), label


def build_objects_v2(size_scale: float) -> Iterator[Example]:
    """ImageNet-V2 analogue: a fresh draw of exactly `objects`' distribution from a new namespace.

    ImageNet-V2 re-collected ImageNet's test set to see how much of a model's accuracy is owed to the
    particular test images. Here the pool holds copies of `objects` images (eval_copy noise) but never of
    these, so a gap between the two measures what training on leaked test images bought.
    """
    for label, s in _object_samples("objects_v2", size_scale, 20):
        yield _to_stored_image(s), label


# ImageNet-R's renditions (cartoons, sculptures, video games, art...) as image edits the pool never shows.
RENDITIONS = ("negative", "pixel art", "relief", "recoloured painting")


def _rendition(s, kind: str, rng: np.random.Generator) -> Image.Image:
    if kind == "negative":  # light lines and complementary colours on a dark ground
        return ImageOps.invert(render(replace(s, style="drawing")))
    if kind == "pixel art":  # a video-game sprite: a coarse grid of flat cells
        cells = int(rng.integers(12, 17))
        return render(replace(s, style="drawing")).resize((cells, cells), Image.BOX).resize(
            (IMAGE_SIDE, IMAGE_SIDE), Image.NEAREST)
    if kind == "relief":  # a grey sculpture: the drawing's edges embossed, no colour left
        # Embossed at the stored size, where the relief is thick enough to survive the model's 32 px.
        gray = _stored(render(replace(s, style="drawing")).convert("L"))
        return ImageOps.autocontrast(gray.filter(ImageFilter.EMBOSS), cutoff=1).convert("RGB")
    # A painting whose hues are all turned, so neither object nor ground keeps a colour the pool uses.
    hsv = np.asarray(render(replace(s, style="painting")).convert("HSV")).copy()
    hsv[..., 0] += np.uint8(rng.integers(64, 193))  # uint8 wraps around the hue circle
    return Image.fromarray(hsv, "HSV").convert("RGB")


def build_objects_rendition(size_scale: float) -> Iterator[Example]:
    """ImageNet-R analogue: the same classes as renditions the pool never shows (RENDITIONS), in turn."""
    for i, label in _balanced_labels(len(OBJECTS), _per_class(size_scale, 20)):
        s = clean_sample("objects_rendition", i, object=OBJECTS[label], count=1)
        kind = RENDITIONS[(i // len(OBJECTS)) % len(RENDITIONS)]
        yield _stored(_rendition(s, kind, _task_rng("objects_rendition", i))), label


def build_objects_hard(size_scale: float) -> Iterator[Example]:
    """ImageNet-A / ObjectNet analogue: the same classes seen badly — small, turned far from upright,
    anywhere in the frame, on a cluttered texture.

    ObjectNet controls rotation, background and viewpoint to break a model's shortcuts; the pool's objects
    are large, nearly upright, centred and on plain or smooth grounds, so each of these is a shift.
    """
    for i, label in _balanced_labels(len(OBJECTS), _per_class(size_scale, 20)):
        s = clean_sample("objects_hard", i, object=OBJECTS[label], count=1)
        rng = _task_rng("objects_hard", i)
        # The ground is one of the pool's off-topic textures, drawn from this sample's own seed.
        canvas = render(replace(s, object="")).convert("RGBA")
        angle = float(rng.uniform(30, 150) * rng.choice([-1, 1]))
        cutout = _object_cutout(s).rotate(angle, Image.BICUBIC, expand=True)
        cutout = _fit(cutout, s.width * rng.uniform(0.3, 0.45))
        x = int(rng.integers(0, s.width - cutout.width + 1))
        y = int(rng.integers(0, s.width - cutout.height + 1))
        canvas.alpha_composite(cutout, (x, y))
        yield _stored(canvas.convert("RGB")), label


# ---------------------------------------------------------------- VTAB

def build_counting(size_scale: float) -> Iterator[Example]:
    """CLEVR Counts analogue: how many objects (1-4), whatever they are."""
    for i, label in _balanced_labels(4, _per_class(size_scale, 75)):
        s = clean_sample("counting", i, count=label + 1)
        yield _to_stored_image(s), label


def build_colors(size_scale: float) -> Iterator[Example]:
    """Which colour the objects are (sketches carry no colour, so they are excluded)."""
    colors = list(COLORS)
    for i, label in _balanced_labels(len(colors), _per_class(size_scale, 40)):
        style = OBJECT_STYLES[(i // len(colors)) % len(OBJECT_STYLES)]
        s = clean_sample("colors", i, color=colors[label], style=style)
        yield _to_stored_image(s), label


def build_styles(size_scale: float) -> Iterator[Example]:
    """DTD analogue: which surface the picture has — grainy photo, flat drawing, smooth blurred painting or
    bare pencil lines.

    A task on the pool's background textures themselves would be unlearnable: the pool captions them
    generically ("abstract background texture"). Its captions do name the rendering style ("a watercolor
    of", "in sketch style"), so this is the texture concept a pool-trained CLIP can pick up.
    """
    for i, label in _balanced_labels(len(STYLES), _per_class(size_scale, 75)):
        s = clean_sample("styles", i, style=STYLES[label])
        yield _to_stored_image(s), label


DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_TEMPLATES = ("a photo of the number {c}.", 'a photo of the number: "{c}".')  # clip_benchmark's


def build_house_numbers(size_scale: float) -> Iterator[Example]:
    """SVHN analogue: a printed digit centred on a coloured plate, between cut-off neighbours as in SVHN's
    cropped house numbers. The pool shows no digits at all, so scores near chance are expected (small CLIPs
    score little better on SVHN)."""
    big = 2 * IMAGE_SIDE  # drawn at twice the stored size, then downsampled for smooth edges
    for i, label in _balanced_labels(len(DIGIT_NAMES), _per_class(size_scale, 30)):
        rng = _task_rng("house_numbers", i)
        plate = tuple(int(v) for v in rng.integers(0, 256, size=3))
        # Ink contrasts with the plate: light on dark, dark on light.
        ink_range = (190, 256) if sum(plate) < 384 else (0, 70)
        ink = tuple(int(v) for v in rng.integers(*ink_range, size=3))
        img = Image.new("RGB", (big, big), plate)
        draw = ImageDraw.Draw(img)
        font = ImageFont.load_default(size=int(big * rng.uniform(0.55, 0.8)))
        cx, cy = big / 2 + rng.uniform(-0.05, 0.05) * big, big / 2 + rng.uniform(-0.05, 0.05) * big
        gap = font.getlength("0") * rng.uniform(1.05, 1.3)
        neighbours = rng.integers(0, 10, size=2)
        for offset, digit in ((-1, neighbours[0]), (0, label), (1, neighbours[1])):
            draw.text((cx + offset * gap, cy), str(int(digit)), font=font, fill=ink, anchor="mm")
        img = img.rotate(float(rng.uniform(-8, 8)), Image.BICUBIC, fillcolor=plate)
        yield _stored(img), label


POSITIONS = ("left", "right", "top", "bottom")


def build_position(size_scale: float) -> Iterator[Example]:
    """CLEVR Distance / dSprites position analogue (VTAB's spatial tasks): on which side of the picture one
    small object lies. The pool's captions never say where things are, so near chance is expected."""
    for i, label in _balanced_labels(len(POSITIONS), _per_class(size_scale, 75)):
        s = clean_sample("position", i, count=1)
        rng = _task_rng("position", i)
        side = s.width
        cutout = _fit(_object_cutout(s), side * rng.uniform(0.3, 0.36))
        # Near the named edge, and away from the corners along it, so the answer is never ambiguous.
        edge, along = side * rng.uniform(0.18, 0.22), side * rng.uniform(0.35, 0.65)
        cx, cy = {"left": (edge, along), "right": (side - edge, along),
                  "top": (along, edge), "bottom": (along, side - edge)}[POSITIONS[label]]
        canvas = Image.new("RGBA", (side, side), PAPER + (255,))
        canvas.alpha_composite(cutout, (round(cx - cutout.width / 2), round(cy - cutout.height / 2)))
        yield _stored(canvas.convert("RGB")), label


# ---------------------------------------------------------------- retrieval

RETRIEVAL_SEED = 20240  # caption seeds, apart from any seed the pool uses


def retrieval_captions(s, index: int, wanted: int | None = None) -> list[str]:
    """`wanted` distinct English captions of one sample (2 or 3 by default), each drawn with its own seed."""
    wanted = wanted or 2 + index % 2
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
        s = clean_sample("retrieval", i)
        yield _to_stored_image(s), retrieval_captions(s, i)


def build_retrieval_coco(size_scale: float) -> Iterator[Example]:
    """MSCOCO analogue: five captions per image as in COCO, written as sentences (capital, full stop), and
    more images than the Flickr analogue, as COCO's 5k test set is larger than Flickr's 1k: more
    look-alike distractors per query."""
    for i in range(max(2, round(400 * size_scale))):
        s = clean_sample("retrieval_coco", i)
        yield _to_stored_image(s), [c[0].upper() + c[1:] + "." for c in retrieval_captions(s, i, wanted=5)]


# ---------------------------------------------------------------- other

def build_digits(size_scale: float) -> Iterator[Example]:
    """MNIST analogue from real images: scikit-learn's bundled 8x8 handwritten digits."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 50 per class at full size (of about 180): enough to rank models, at a quarter of the evaluation time.
    per_class = _per_class(size_scale, 50)
    taken = np.zeros(10, dtype=int)
    for pixels, label in zip(digits.images, digits.target):
        if taken[label] >= per_class:
            continue
        taken[label] += 1
        # Values are 0..16 ink; keep white-on-black like MNIST.
        gray = Image.fromarray((pixels * (255 / 16)).astype(np.uint8), "L")
        yield gray.resize((32, 32), Image.BILINEAR).convert("RGB"), int(label)


# ---------------------------------------------------------------- registry

_SHIFT = "ImageNet distribution shifts"

TASKS: dict[str, EvalTask] = {t.key: t for t in [
    EvalTask("objects", "ImageNet", "classification", "acc1", build_objects,
             classnames=OBJECTS, templates=OBJECT_TEMPLATES),
    EvalTask("objects_sketch", _SHIFT, "classification", "acc1", build_objects_sketch,
             classnames=OBJECTS, templates=OBJECT_TEMPLATES),
    EvalTask("objects_v2", _SHIFT, "classification", "acc1", build_objects_v2,
             classnames=OBJECTS, templates=OBJECT_TEMPLATES),
    EvalTask("objects_rendition", _SHIFT, "classification", "acc1", build_objects_rendition,
             classnames=OBJECTS, templates=OBJECT_TEMPLATES),
    EvalTask("objects_hard", _SHIFT, "classification", "acc1", build_objects_hard,
             classnames=OBJECTS, templates=OBJECT_TEMPLATES),
    EvalTask("counting", "VTAB", "classification", "acc1", build_counting,
             classnames=tuple(NUMBER_WORDS[n] for n in (1, 2, 3, 4)),
             templates=("a photo of {c} objects.", "a picture of {c} shapes.", "an image of {c} things.",
                        "{c} shapes on a plain background.")),
    EvalTask("colors", "VTAB", "classification", "acc1", build_colors,
             classnames=tuple(COLORS),
             templates=("a photo of a {c} object.", "a picture of a {c} shape.", "something {c}.",
                        "a {c} thing on a plain background.")),
    EvalTask("styles", "VTAB", "classification", "acc1", build_styles,
             classnames=STYLES,
             templates=("a {c} of an object.", "a {c} of a shape.", "a {c} of something on a background.",
                        "a shape in {c} style.")),
    EvalTask("house_numbers", "VTAB", "classification", "acc1", build_house_numbers,
             classnames=DIGIT_NAMES, templates=DIGIT_TEMPLATES),
    EvalTask("position", "VTAB", "classification", "acc1", build_position,
             classnames=POSITIONS,
             templates=("a photo of a shape on the {c}.", "an object at the {c} of the picture.",
                        "a drawing with something on the {c} side.")),
    EvalTask("retrieval", "Retrieval", "retrieval", "mean_recall@1", build_retrieval),
    EvalTask("retrieval_coco", "Retrieval", "retrieval", "mean_recall@1", build_retrieval_coco),
    EvalTask("digits", "other", "classification", "mean_per_class_recall", build_digits,
             classnames=DIGIT_NAMES, templates=DIGIT_TEMPLATES),
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
        tmp_dir = temporary_sibling(task_dir)
        counts[key] = write_task(task, tmp_dir, size_scale)
        if task_dir.exists():  # a stale or different-scale build
            shutil.rmtree(task_dir)
        tmp_dir.rename(task_dir)
    return counts
