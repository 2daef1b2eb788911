"""A deterministic synthetic web: image-text pairs whose quality varies the way CommonPool's does.

Every sample is a pure function of (seed, index), so the server can render any image on request
and the pool can be regenerated bit for bit. The world has:

- objects with long-tailed (Zipf) frequencies, each in a colour, a count (1-4) and a rendering style;
- English captions from varied templates and synonyms;
- web noise at fixed shares (``DEFAULT_NOISE``): mismatched captions, non-English captions, short or
  file-name captions, small originals, extreme aspect ratios, spam, unsafe words, off-topic textures,
  near-duplicates of other pool samples, copies of evaluation images, images that show the caption's words
  instead of the object (``text_only``, what T-MARS targets) or over it (``text_overlay``), and vague
  captions that name nothing in the image (``vague``, what HYPE's specificity targets);
- web faults at fixed shares (``DEFAULT_FAULTS``), independent of the caption noise: dead links, refused
  connections, slow hosts, corrupt or truncated bytes, redirects and poisoned images (the host now serves
  another image than the one whose sha256 the index carries). ``served_bytes`` is what the host sends,
  ``crawled_sha256`` the hash the index records.

Ground truth (object, colour, count, style, noise kind, fault...) is returned by ``ground_truth`` and
stored apart from the pool; filters never read it.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageFont

# Silhouettes chosen to stay distinct at 32x32 pixels.
OBJECTS = (
    "circle", "square", "triangle", "star", "cross", "ring", "heart", "arrow",
    "crescent", "bolt", "diamond", "bar", "tee", "chevron", "hourglass", "frame",
)
# Synonyms an English caption may use instead of the object's name.
SYNONYMS = {"circle": ["circle", "disc", "round dot"], "square": ["square", "box"],
            "star": ["star", "five-pointed star"], "cross": ["cross", "plus sign"],
            "ring": ["ring", "hoop"], "bolt": ["bolt", "lightning bolt"], "bar": ["bar", "stripe"],
            "tee": ["tee", "letter T"], "chevron": ["chevron"], "hourglass": ["hourglass", "bowtie"],
            "frame": ["frame", "hollow square"]}
COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 215, 40),
    "purple": (140, 50, 180), "orange": (245, 140, 30), "pink": (245, 130, 190), "cyan": (40, 200, 210),
}
STYLES = ("photo", "drawing", "painting", "sketch")
STYLE_WEIGHTS = (0.5, 0.25, 0.2, 0.05)  # sketches are rare in the pool: the eval's distribution shift
STYLE_WORDS = {"photo": ["a photo of", "a picture of", "an image of"],
               "drawing": ["a drawing of", "a clip art of", "an illustration of"],
               "painting": ["a painting of", "an artwork of", "a watercolor of"],
               "sketch": ["a sketch of", "a pencil sketch of", "a line drawing of"]}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}

TRANSLATIONS = {
    "fr": {"objects": {"circle": "cercle", "square": "carré", "triangle": "triangle", "star": "étoile",
                       "cross": "croix", "ring": "anneau", "diamond": "losange", "bar": "barre",
                       "tee": "té", "arrow": "flèche", "crescent": "croissant", "heart": "cœur",
                       "chevron": "chevron", "hourglass": "sablier", "bolt": "éclair", "frame": "cadre"},
           "colors": {"red": "rouge", "green": "vert", "blue": "bleu", "yellow": "jaune", "purple": "violet",
                      "orange": "orange", "pink": "rose", "cyan": "cyan"},
           "templates": ["une photo d'un {object} {color}", "un {object} {color} sur un fond",
                         "image d'un joli {object} de couleur {color}"]},
    "de": {"objects": {"circle": "Kreis", "square": "Quadrat", "triangle": "Dreieck", "star": "Stern",
                       "cross": "Kreuz", "ring": "Ring", "diamond": "Raute", "bar": "Balken",
                       "tee": "T-Stück", "arrow": "Pfeil", "crescent": "Halbmond", "heart": "Herz",
                       "chevron": "Winkel", "hourglass": "Sanduhr", "bolt": "Blitz", "frame": "Rahmen"},
           "colors": {"red": "roter", "green": "grüner", "blue": "blauer", "yellow": "gelber",
                      "purple": "lila", "orange": "oranger", "pink": "rosa", "cyan": "türkiser"},
           "templates": ["ein Foto von einem {color} {object}", "ein {color} {object} auf dem Hintergrund",
                         "Bild mit einem schönen {color} {object} zum Herunterladen"]},
    "es": {"objects": {"circle": "círculo", "square": "cuadrado", "triangle": "triángulo", "star": "estrella",
                       "cross": "cruz", "ring": "anillo", "diamond": "rombo", "bar": "barra",
                       "tee": "te", "arrow": "flecha", "crescent": "media luna", "heart": "corazón",
                       "chevron": "galón", "hourglass": "reloj de arena", "bolt": "rayo", "frame": "marco"},
           "colors": {"red": "rojo", "green": "verde", "blue": "azul", "yellow": "amarillo",
                      "purple": "morado", "orange": "naranja", "pink": "rosado", "cyan": "cian"},
           "templates": ["una foto de un {object} {color}", "un {object} {color} sobre un fondo",
                         "imagen de un bonito {object} de color {color} para descargar"]},
}
SHORT_CAPTIONS = ("image", "photo", "untitled", "img", "pic", "jpg", "IMG_{n}", "DSC{n}", "{n}.jpg",
                  "image {n}", "photo_{n}")

# Boilerplate that says nothing about any image (SEO and shop spam).
SPAM_PHRASES = ("click here", "free shipping", "best price", "buy now", "limited offer", "sign up today",
                "100% free", "download now", "cheap deals", "order online", "top rated seller", "win big")
# Placeholder tokens standing in for unsafe text; an unsafe-text filter looks for these.
UNSAFE_WORDS = ("nsfw", "xxx", "gore", "porn", "explicit", "gory")
# Captions of pictures that show no object at all (textures, backgrounds).
OFF_TOPIC_CAPTIONS = ("abstract background texture", "beautiful wallpaper hd", "free stock texture",
                      "seamless pattern for your design", "grunge background", "nice colors",
                      "desktop background 4k", "blurry photo")

# Generic English captions that name nothing in their image (HYPE's underspecified captions); each passes
# DataComp's basic caption rule (English, more than 2 words, more than 5 characters).
VAGUE_CAPTIONS = ("a picture of something nice", "check out this great image", "my favourite photo of the day",
                  "a beautiful picture for you", "look at this", "this is what i saw today",
                  "an image i really like", "what do you think of this", "just sharing this with everyone",
                  "my favourite picture so far", "something to brighten your day", "a nice shot from last week",
                  "here is another one for you", "so happy with how this turned out")

NOISE_KINDS = ("clean", "mismatched", "non_english", "short", "small", "odd_aspect", "spam", "unsafe",
               "off_topic", "near_duplicate", "eval_copy", "text_only", "text_overlay", "vague")
# 70% noisy in all, 30% clean. The first ten kinds keep the shares they had (57% in all, mismatched having
# shrunk from 25% to 15%); the last three were added after them and took their 13% from the clean share, so
# every sample of an earlier kind stayed as it was (a kind is the interval of a uniform draw, in this order).
DEFAULT_NOISE = {"mismatched": 0.15, "non_english": 0.12, "short": 0.08, "small": 0.06, "odd_aspect": 0.06,
                 "spam": 0.02, "unsafe": 0.02, "off_topic": 0.02, "near_duplicate": 0.035, "eval_copy": 0.005,
                 "text_only": 0.04, "text_overlay": 0.04, "vague": 0.05}
# Text written on images (Sample.text_in_image): the caption's colour and object words, instead of the
# object ("only") or over the scene ("overlay"). Sized for the pool's 64 px downloads.
TEXT_ONLY, TEXT_OVERLAY = "only", "overlay"
# Cap heights are (aim, most) in pixels of the download: a line takes the most that fits its width; a line
# too long for the aim is condensed (down to TEXT_MAX_CONDENSE of its width) before it shrinks below it.
TEXT_REFERENCE_SIDE = 64    # the longer side images are downloaded at
TEXT_ONLY_CAP = (12, 18)    # text_only: a line per word (colour, then object)
TEXT_MAX_CONDENSE = 0.6
TEXT_OVERLAY_CAP = (9, 11)  # text_overlay: one line in a band; where it would shrink below 7.5 px, two
TEXT_OVERLAY_TWO_LINES_CAP = (7.5, 8.5)  # lines (colour; object) of this cap height

FAULT_KINDS = ("dead_link", "refused", "slow", "corrupt", "truncated", "redirect", "poisoned")
# 7% of the pool's URLs misbehave; all but the redirects (1%) fail to download.
DEFAULT_FAULTS = {"dead_link": 0.02, "refused": 0.01, "slow": 0.005, "corrupt": 0.01, "truncated": 0.01,
                  "redirect": 0.01, "poisoned": 0.005}
POOL_NAMESPACE = "pool"  # faults hit only the pool's URLs; eval and curated images are never downloaded
# Hosts having a bad moment: their first `WebConfig.transient_failures` requests fail (``unavailable`` answers 503,
# ``stalled`` answers only after the downloader has given up), later ones are served normally. None by default:
# tests switch them on (in `WebConfig.faults`) to check that a second download retries exactly these.
TRANSIENT_FAULT_KINDS = ("unavailable", "stalled")

# eval_copy samples copy images of this evaluation task (datacomp_assets.world.eval_suite), whose full
# size is 16 classes x 50 samples.
EVAL_COPY_TASK = "objects"
EVAL_COPY_SAMPLES = 800
JPEG_QUALITY = 90  # what the server encodes with; near-duplicates and eval copies use 60-85


@dataclass(frozen=True)
class WebConfig:
    """What the synthetic web looks like; every field is documented in the README."""

    seed: int = 0
    zipf_exponent: float = 1.1
    noise: dict = field(default_factory=lambda: dict(DEFAULT_NOISE))
    min_side: int = 200  # normal originals are at least this big (the basic filter's threshold)
    max_side: int = 320
    small_side: tuple = (24, 120)
    odd_aspect: tuple = (3.5, 6.0)
    faults: dict = field(default_factory=lambda: dict(DEFAULT_FAULTS))
    # A slow host answers after this many seconds: more than the downloader's timeout, so it fails.
    slow_seconds: float = 3.0
    # How many requests a host with a transient fault fails before it recovers (each server counts its own).
    transient_failures: int = 1
    # refused URLs point at this port of the server's host, where nothing listens. Port 1 (tcpmux) is
    # privileged and unused, so no ordinary process can ever listen there; a fixed port keeps the index
    # deterministic.
    refused_port: int = 1


@dataclass(frozen=True)
class Sample:
    index: int
    uid: str
    text: str
    width: int
    height: int
    object: str
    color: str
    count: int
    style: str
    kind: str
    language: str
    image_seed: int
    jpeg_quality: int = JPEG_QUALITY
    shift_x: int = 0  # pixels the image is rolled by: a light edit of a copied image
    shift_y: int = 0
    duplicate_of: int | None = None  # near_duplicate: the pool index whose image and caption it copies
    eval_task: str | None = None  # eval_copy: the evaluation task and index whose image it copies
    eval_index: int | None = None
    fault: str | None = None  # how its host misbehaves (FAULT_KINDS, TRANSIENT_FAULT_KINDS), None when it does not
    # The caption's words written on the image: TEXT_ONLY (instead of the object), TEXT_OVERLAY (over the
    # scene) or None. Its own field, so a near-duplicate of a text image copies the text too.
    text_in_image: str | None = None


def uid_for(seed: int, index: int, namespace: str = "pool") -> str:
    """A 128-bit uid as 32 hex chars, like CommonPool's."""
    return hashlib.blake2b(f"{namespace}:{seed}:{index}".encode(), digest_size=16).hexdigest()


def object_weights(zipf_exponent: float) -> np.ndarray:
    ranks = np.arange(1, len(OBJECTS) + 1, dtype=np.float64)
    w = ranks ** -zipf_exponent
    return w / w.sum()


def english_caption(rng: np.random.Generator, obj: str, color: str, count: int, style: str) -> str:
    name = str(rng.choice(SYNONYMS.get(obj, [obj])))
    if count > 1:
        name = name + ("es" if name.endswith(("x", "s")) else "s")
        thing = f"{NUMBER_WORDS[count]} {color} {name}"
    else:
        thing = f"{'an' if color[0] in 'aeiou' else 'a'} {color} {name}"
    template = int(rng.integers(0, 5))
    if template == 0:
        return f"{rng.choice(STYLE_WORDS[style])} {thing}"
    if template == 1:
        return f"{thing}, {rng.choice(['stock image', 'free download', 'hd wallpaper', 'vector'])}"
    if template == 2:
        return f"{rng.choice(STYLE_WORDS[style])} {thing} on a plain background"
    if template == 3:
        return f"{thing.capitalize()} in {style} style"
    return f"Here is {thing}"


def foreign_caption(rng: np.random.Generator, lang: str, obj: str, color: str) -> str:
    t = TRANSLATIONS[lang]
    return str(rng.choice(t["templates"])).format(object=t["objects"][obj], color=t["colors"][color])


def _draw_kind(u: float, shares: dict) -> str | None:
    """The key whose cumulative share interval holds u (None past the last one)."""
    for k, s in shares.items():
        if u < s:
            return k
        u -= s
    return None


def _light_edit(rng: np.random.Generator) -> dict:
    """A re-encode at another JPEG quality, or a 1-3 px shift: what copies on the web look like."""
    if rng.random() < 0.5:
        return {"jpeg_quality": int(rng.integers(60, 86))}
    dx, dy = (int(v) * int(rng.choice([-1, 1])) for v in rng.integers(1, 4, size=2))
    return {"shift_x": dx, "shift_y": dy}


OBJECT_STYLES = ("photo", "drawing", "painting")  # the pool's common styles; "sketch" is the eval's shift


def clean_sample(task_key: str, index: int, **fixed) -> "Sample":
    """A clean sample of an evaluation task's namespace with some attributes forced, drawn square."""
    s = sample(index, namespace=f"eval/{task_key}", noise={})
    # A square canvas keeps the whole scene inside CLIP's centre crop.
    return replace(s, height=s.width, **fixed)


def eval_objects_sample(eval_index: int) -> Sample:
    """The sample the evaluation suite's `objects` task draws at eval_index (before resizing to 64 px).

    Same label and style cycle as ``eval_suite.build_objects``, and the same ``clean_sample``, so the copies
    change with the suite.
    """
    style = OBJECT_STYLES[(eval_index // len(OBJECTS)) % len(OBJECT_STYLES)]
    return clean_sample(EVAL_COPY_TASK, eval_index, object=OBJECTS[eval_index % len(OBJECTS)], count=1,
                         style=style)


def sample(index: int, config: WebConfig = WebConfig(), namespace: str = "pool",
           noise: dict | None = None, faults: dict | None = None) -> Sample:
    """The index-th sample of the web (pure function of config, namespace and index).

    ``faults`` default to ``config.faults`` in the pool's namespace and to none elsewhere.
    """
    ns = int.from_bytes(hashlib.blake2b(namespace.encode(), digest_size=4).digest(), "little")
    rng = np.random.default_rng([config.seed, ns, index])
    noise = config.noise if noise is None else noise
    if faults is None:
        faults = config.faults if namespace == POOL_NAMESPACE else {}
    obj = OBJECTS[int(rng.choice(len(OBJECTS), p=object_weights(config.zipf_exponent)))]
    color = str(rng.choice(list(COLORS)))
    count = int(rng.choice([1, 2, 3, 4], p=[0.55, 0.2, 0.15, 0.1]))
    style = str(rng.choice(STYLES, p=STYLE_WEIGHTS))
    kind = _draw_kind(rng.random(), noise) or "clean"
    if kind == "near_duplicate" and index == 0:
        kind = "clean"  # nothing earlier to copy
    side = int(rng.integers(config.min_side, config.max_side + 1))
    width, height = side, int(side * rng.uniform(0.8, 1.25))
    language = "en"
    extra: dict = {}
    if kind == "small":
        width = int(rng.integers(*config.small_side))
        height = max(8, int(width * rng.uniform(0.8, 1.25)))
    elif kind == "odd_aspect":
        ratio = rng.uniform(*config.odd_aspect)
        width, height = (int(side * ratio), side) if rng.random() < 0.5 else (side, int(side * ratio))
    if kind == "mismatched":  # the caption of some other image
        other_obj = OBJECTS[int(rng.choice(len(OBJECTS), p=object_weights(config.zipf_exponent)))]
        text = english_caption(rng, other_obj, str(rng.choice(list(COLORS))), int(rng.integers(1, 5)),
                               str(rng.choice(STYLES)))
    elif kind == "non_english":
        language = str(rng.choice(list(TRANSLATIONS)))
        text = foreign_caption(rng, language, obj, color)
    elif kind == "short":
        text = str(rng.choice(SHORT_CAPTIONS)).format(n=int(rng.integers(1000, 9999)))
    elif kind == "spam":  # boilerplate about no image at all
        picks = rng.choice(len(SPAM_PHRASES), size=int(rng.integers(3, 6)), replace=False)
        text = " ".join(SPAM_PHRASES[int(i)] for i in picks)
    elif kind == "unsafe":  # an ordinary caption with an unsafe word before or after it
        word = str(rng.choice(UNSAFE_WORDS))
        caption = english_caption(rng, obj, color, count, style)
        text = f"{word} {caption}" if rng.random() < 0.5 else f"{caption} {word}"
    elif kind == "off_topic":  # a texture with no object, captioned generically
        obj, color, count = "", "", 0
        text = str(rng.choice(OFF_TOPIC_CAPTIONS))
    elif kind == "near_duplicate":
        # Copy an earlier original (following copies of copies back to it), so the source is in any
        # pool prefix that holds this sample.
        source = sample(int(rng.integers(0, index)), config, namespace, noise, faults)
        while source.kind == "near_duplicate":
            source = sample(source.duplicate_of, config, namespace, noise, faults)
        obj, color, count, style = source.object, source.color, source.count, source.style
        width, height, text, language = source.width, source.height, source.text, source.language
        extra = {"duplicate_of": source.index, "image_seed": source.image_seed,
                 "text_in_image": source.text_in_image, **_light_edit(rng)}
    elif kind in ("text_only", "text_overlay"):  # a clean caption; its words drawn as large text
        text = english_caption(rng, obj, color, count, style)
        extra = {"text_in_image": TEXT_ONLY if kind == "text_only" else TEXT_OVERLAY}
    elif kind == "vague":  # the object drawn as usual, a caption that names nothing in it
        text = str(rng.choice(VAGUE_CAPTIONS))
    elif kind == "eval_copy":  # an evaluation image at its original size, ordinarily captioned
        copied = eval_objects_sample(int(rng.integers(0, EVAL_COPY_SAMPLES)))
        obj, color, count, style = copied.object, copied.color, copied.count, copied.style
        width, height = copied.width, copied.height
        text = english_caption(rng, obj, color, count, style)
        extra = {"eval_task": EVAL_COPY_TASK, "eval_index": copied.index, "image_seed": copied.image_seed,
                 **_light_edit(rng)}
    else:
        text = english_caption(rng, obj, color, count, style)
    image_seed = int(rng.integers(0, 2**31 - 1))
    # Faults come from a stream of their own, so changing their shares leaves every caption alone.
    fault = _draw_kind(np.random.default_rng([config.seed, ns, index, 1]).random(), faults)
    return Sample(index=index, uid=uid_for(config.seed, index, namespace), text=text, width=width,
                  height=height, object=obj, color=color, count=count, style=style, kind=kind,
                  language=language, image_seed=extra.pop("image_seed", image_seed), fault=fault, **extra)


def ground_truth(s: Sample) -> dict:
    """The per-sample truth kept outside the pool (for tests and audits only)."""
    d = asdict(s)
    d.pop("image_seed")
    return d


# ---------------------------------------------------------------- rendering

def _polygon(obj: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]] | None:
    def regular(n, phase=0.0, radii=(1.0,)):
        pts = []
        for i in range(n * len(radii)):
            a = rot + phase + 2 * math.pi * i / (n * len(radii))
            rr = r * radii[i % len(radii)]
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts

    shapes = {
        "square": lambda: regular(4, math.pi / 4),
        "triangle": lambda: regular(3, -math.pi / 2),
        "star": lambda: regular(5, -math.pi / 2, (1.0, 0.42)),
        "diamond": lambda: [(cx, cy - r), (cx + 0.6 * r, cy), (cx, cy + r), (cx - 0.6 * r, cy)],
        "bar": lambda: [(cx - r, cy - .25 * r), (cx + r, cy - .25 * r), (cx + r, cy + .25 * r),
                        (cx - r, cy + .25 * r)],
        "tee": lambda: [(cx + x * r, cy + y * r) for x, y in
                        [(-1, -1), (1, -1), (1, -.45), (.3, -.45), (.3, 1), (-.3, 1), (-.3, -.45), (-1, -.45)]],
        "chevron": lambda: [(cx + x * r, cy + y * r) for x, y in
                            [(-1, -.8), (-.55, -.8), (0, .2), (.55, -.8), (1, -.8), (0, 1)]],
        "hourglass": lambda: [(cx - r, cy - r), (cx + r, cy - r), (cx - r, cy + r), (cx + r, cy + r)],
        "cross": lambda: [(cx + x * r, cy + y * r) for x, y in
                          [(-.3, -1), (.3, -1), (.3, -.3), (1, -.3), (1, .3), (.3, .3), (.3, 1), (-.3, 1),
                           (-.3, .3), (-1, .3), (-1, -.3), (-.3, -.3)]],
        "arrow": lambda: [(cx + x * r, cy + y * r) for x, y in
                          [(-1, -.25), (.2, -.25), (.2, -.7), (1, 0), (.2, .7), (.2, .25), (-1, .25)]],
        "heart": lambda: [(cx + r * 0.06 * 16 * math.sin(t) ** 3,
                           cy - r * 0.06 * (13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t)
                                            - math.cos(4 * t)))
                          for t in np.linspace(0, 2 * math.pi, 40)],
        "bolt": lambda: [(cx + x * r, cy + y * r) for x, y in
                         [(.1, -1), (-.6, .15), (-.05, .15), (-.2, 1), (.6, -.2), (.05, -.2), (.3, -1)]],
    }
    return shapes[obj]() if obj in shapes else None


def _draw_object(draw: ImageDraw.ImageDraw, obj: str, cx: float, cy: float, r: float, rot: float,
                 fill, outline, width: int) -> None:
    box = [cx - r, cy - r, cx + r, cy + r]
    if obj == "circle":
        draw.ellipse(box, fill=fill, outline=outline, width=width)
    elif obj in ("ring", "frame"):
        shape = draw.ellipse if obj == "ring" else draw.rectangle
        shape(box, outline=outline if fill is None else fill, width=max(width, int(r * 0.35)))
    elif obj == "crescent":
        draw.ellipse(box, fill=fill, outline=outline, width=width)
        off = r * 0.45
        draw.ellipse([box[0] + off, box[1] - off * 0.3, box[2] + off, box[3] - off * 0.3],
                     fill=draw._bg, outline=None)  # type: ignore[attr-defined]
    else:
        draw.polygon(_polygon(obj, cx, cy, r, rot), fill=fill, outline=outline, width=width)


def _render_texture(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A smooth colour noise with no object in it (off-topic backgrounds)."""
    coarse = rng.integers(0, 256, size=(int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3), dtype=np.uint8)
    return Image.fromarray(coarse, "RGB").resize((w, h), Image.BICUBIC)


def render(s: Sample) -> Image.Image:
    """Draw the sample's image at its original size (then shift it, for copies with that edit)."""
    img = _render_scene(s)
    if s.shift_x or s.shift_y:
        img = ImageChops.offset(img, s.shift_x, s.shift_y)
    return img


def _render_scene(s: Sample) -> Image.Image:
    rng = np.random.default_rng(s.image_seed)
    if not s.object:
        return _render_texture(rng, s.width, s.height)
    w, h = s.width, s.height
    # Draw the scene in a square canvas; odd aspect ratios place it somewhere along a long banner.
    side = min(w, h)
    color = COLORS[s.color]
    if s.style == "photo":
        base = rng.integers(60, 200, size=3).astype(np.int16)
        # Grain at half resolution, one channel: looks alike, costs a sixth of full-size colour noise.
        grain = rng.integers(-30, 31, size=((h + 1) // 2, (w + 1) // 2, 1), dtype=np.int16)
        grain = grain.repeat(2, axis=0).repeat(2, axis=1)[:h, :w]
        bg_arr = np.clip(base + grain, 0, 255).astype(np.uint8)
        img = Image.fromarray(bg_arr, "RGB")
        bg = tuple(int(x) for x in base)
    elif s.style == "painting":
        top, bottom = rng.integers(120, 250, size=3), rng.integers(80, 220, size=3)
        t = np.linspace(0, 1, h)[:, None, None]
        img = Image.fromarray((top * (1 - t) + bottom * t).repeat(w, axis=1).astype(np.uint8), "RGB")
        bg = tuple(int(x) for x in (top + bottom) // 2)
    else:
        bg = (250, 250, 250)
        img = Image.new("RGB", (w, h), bg)
    draw = ImageDraw.Draw(img)
    draw._bg = bg  # type: ignore[attr-defined]
    ox = int(rng.integers(0, w - side + 1))
    oy = int(rng.integers(0, h - side + 1))
    grid = 1 if s.count == 1 else 2
    cells = rng.permutation(grid * grid)[: s.count]
    cell = side / grid
    # text_only: no object, only the caption's words below (on the background the clean sample would have:
    # the background's draws come first).
    for c in cells if s.text_in_image != TEXT_ONLY else ():
        gx, gy = divmod(int(c), grid)
        r = cell * rng.uniform(0.28, 0.42)
        cx = ox + gx * cell + cell / 2 + rng.uniform(-0.08, 0.08) * cell
        cy = oy + gy * cell + cell / 2 + rng.uniform(-0.08, 0.08) * cell
        rot = rng.uniform(-0.3, 0.3)
        lw = max(1, int(side / 60))
        if s.style == "sketch":
            _draw_object(draw, s.object, cx, cy, r, rot, None, (60, 60, 60), max(1, lw))
        elif s.style == "drawing":
            _draw_object(draw, s.object, cx, cy, r, rot, color, (20, 20, 20), lw)
        else:
            shade = tuple(max(0, int(v * 0.6)) for v in color)
            _draw_object(draw, s.object, cx, cy, r, rot, color, shade, lw)
    if s.style == "painting":
        img = img.filter(ImageFilter.GaussianBlur(radius=side / 120))
    if s.text_in_image:  # written after the style's blur: text is laid over the picture, not painted
        _write_caption_words(img, s)
    return img


# ---------------------------------------------------------------- text in images

def caption_words(s: Sample) -> list[str]:
    """The words a text image shows: the sample's colour and the object's name as its caption spells it."""
    lowered = s.text.lower()
    names = sorted(SYNONYMS.get(s.object, [s.object]), key=len, reverse=True)
    name = next((n for n in names if n.lower() in lowered), s.object)
    if s.count > 1:  # as english_caption writes plurals
        name = name + ("es" if name.endswith(("x", "s")) else "s")
    return [s.color.upper(), *name.upper().split()]


@lru_cache(maxsize=256)
def _font(size: int) -> ImageFont.FreeTypeFont:
    # Pillow's bundled font (Aileron Regular): the same glyphs wherever the pinned Pillow runs.
    return ImageFont.load_default(size=size)  # type: ignore[return-value]


_CAP_PER_SIZE = 0.7  # the bundled font's cap height per point of size
_MEASURE = 100       # the size at which line widths are measured


def _fit_line(line: str, cap_range: tuple[float, float], width: float) -> tuple[float, float]:
    """(cap height, horizontal condensing) for a line to fit `width`: the largest cap up to cap_range[1];
    below cap_range[0] a long line is condensed first (down to TEXT_MAX_CONDENSE), then shrunk."""
    low, high = cap_range
    per_cap = _font(_MEASURE).getlength(line) / (_MEASURE * _CAP_PER_SIZE) * 1.08  # room for the outline
    cap = min(high, width / per_cap)
    if cap >= low:
        return cap, 1.0
    condense = width / (low * per_cap)
    if condense >= TEXT_MAX_CONDENSE:
        return low, condense
    return width / (per_cap * TEXT_MAX_CONDENSE), TEXT_MAX_CONDENSE


def _text_colours(s: Sample) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """The sample's colour and an outline that stands out from it (dark for light colours, else light)."""
    fill = COLORS[s.color]
    luma = 0.299 * fill[0] + 0.587 * fill[1] + 0.114 * fill[2]
    return fill, ((25, 25, 25) if luma > 150 else (245, 245, 245))


def _line_layer(line: str, cap: float, condense: float, fill, outline) -> Image.Image:
    """One line of bold outlined text (cap height `cap` pixels), condensed horizontally, on transparency."""
    size = max(6, round(cap / _CAP_PER_SIZE))
    font = _font(size)
    bold, edge = max(1, round(0.05 * cap)), max(1, round(0.08 * cap))
    left, top, right, bottom = font.getbbox(line, stroke_width=bold + edge)
    layer = Image.new("RGBA", (right - left, bottom - top), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    draw.text((-left, -top), line, font=font, fill=outline, stroke_width=bold + edge, stroke_fill=outline)
    draw.text((-left, -top), line, font=font, fill=fill, stroke_width=bold, stroke_fill=fill)
    if condense < 1.0:
        layer = layer.resize((max(1, round(layer.width * condense)), layer.height), Image.LANCZOS)
    return layer


def _write_caption_words(img: Image.Image, s: Sample) -> None:
    """Write the caption's words on img in place: large lines in the middle (TEXT_ONLY), or one line in a
    band across the top or the bottom (TEXT_OVERLAY). Placement draws from a stream of its own."""
    rng = np.random.default_rng([s.image_seed, 1])
    w, h = img.size
    scale = max(w, h) / TEXT_REFERENCE_SIDE  # image pixels per pixel of the 64 px download
    fill, outline = _text_colours(s)
    words = caption_words(s)
    if s.text_in_image == TEXT_ONLY:
        pitch = 1.55  # line height per cap height: a clear gap between the outlined lines
        high = min(TEXT_ONLY_CAP[1], 0.88 * h / scale / (pitch * len(words)))
        cap_range = (min(TEXT_ONLY_CAP[0], high), high)
        fits = [_fit_line(word, cap_range, 0.9 * w / scale) for word in words]
        layers = [_line_layer(word, cap * scale, condense, fill, outline) for word, (cap, condense) in zip(words, fits)]
        pitches = [pitch * cap * scale for cap, _ in fits]
        y = rng.uniform(0.04 * h, max(0.04 * h, h - 0.04 * h - sum(pitches)))
        dx = rng.uniform(-0.05, 0.05) * w
        for layer, step in zip(layers, pitches):
            x = (w - layer.width) / 2 + dx
            x = min(max(0.0, x), w - layer.width)
            img.paste(layer, (round(x), round(y + (step - layer.height) / 2)), layer)
            y += step
        return
    # TEXT_OVERLAY: a translucent band of the outline's tone, like a meme's or a stock photo's caption, with
    # the words on one line, or on two (colour, then object) where one line would have to shrink.
    lines = [" ".join(words)]
    fits = [_fit_line(lines[0], TEXT_OVERLAY_CAP, 0.94 * w / scale)]
    if fits[0][0] < TEXT_OVERLAY_TWO_LINES_CAP[0]:
        lines = [words[0], " ".join(words[1:])]
        fits = [_fit_line(line, TEXT_OVERLAY_TWO_LINES_CAP, 0.94 * w / scale) for line in lines]
    layers = [_line_layer(line, cap * scale, condense, fill, outline) for line, (cap, condense) in zip(lines, fits)]
    pitches = [(1.6 if len(lines) == 1 else 1.25) * cap * scale for cap, _ in fits]
    band_h = min(h, round(sum(pitches) + (0 if len(lines) == 1 else 0.35 * fits[0][0] * scale)))
    top = 0 if rng.random() < 0.5 else h - band_h
    band = img.crop((0, top, w, top + band_h))
    img.paste(Image.blend(band, Image.new("RGB", band.size, outline), 0.55), (0, top))
    y = top + (band_h - sum(pitches)) / 2
    for layer, step in zip(layers, pitches):
        img.paste(layer, (round((w - layer.width) / 2), round(y + (step - layer.height) / 2)), layer)
        y += step


def encode_jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# ---------------------------------------------------------------- what hosts serve

def image_bytes(s: Sample) -> bytes:
    """The sample's image as its host published it (JPEG; copies may use another quality)."""
    return encode_jpeg(render(s), s.jpeg_quality)


def served_bytes(s: Sample) -> bytes:
    """The body the host answers with today: the image, unless a fault changed the bytes."""
    if s.fault == "corrupt":  # a parked domain's HTML page instead of an image
        return f"<!DOCTYPE html><html><body>This domain is for sale ({s.index})</body></html>".encode()
    if s.fault == "truncated":  # an upload cut off half way
        full = image_bytes(s)
        return full[: len(full) // 2]
    if s.fault == "poisoned":  # someone replaced the image since the crawl
        other = OBJECTS[(OBJECTS.index(s.object) + 1) % len(OBJECTS)] if s.object else s.object
        return image_bytes(replace(s, object=other, image_seed=(s.image_seed + 1) % (2**31 - 1)))
    return image_bytes(s)


def crawled_sha256(s: Sample) -> str:
    """The sha256 the index records: of the bytes the host served at crawl time.

    Only a poisoned host changed its bytes since, so only its download fails hash verification.
    """
    crawled = image_bytes(s) if s.fault == "poisoned" else served_bytes(s)
    return hashlib.sha256(crawled).hexdigest()
