"""Zero-shot evaluation of an open_clip model: the tiny suite (`suite.py`) and DataComp's 38 tasks (`reference.py`).

Follows clip_benchmark, which DataComp's harness uses: a class embedding is the normalised mean of the
normalised embeddings of its prompts; retrieval recall@k is computed both ways. WILDS and fairness tasks add
the metrics of `reference_metrics` from each sample's metadata; WinoGAViL is scored as DataComp's
eval_utils/wino_eval.py scores it. Results are one JSON line per task in the reference format, written as each
task finishes, so an interrupted run resumes where it stopped. Images are streamed, never all held in memory.

A task is any object with `key`, `group`, `kind` ("classification", "retrieval" or "winogavil") and
`main_metric`; a reference task also has `name` (the line's "dataset") and `dir_name` (its folder).
This module imports no Dagster.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from datacomp_assets.core.reference_tasks import TASKLIST
from datacomp_assets.core.results import aggregate, read_results
from datacomp_assets.core.shards import iter_shard_samples
from datacomp_assets.evaluation import fairness, hub_rows, noise
from datacomp_assets.evaluation.reference import MissingEvalData, missing_tasks, task_directory
from datacomp_assets.evaluation.reference_metrics import (
    classification_outcome, metadata_metrics, winogavil_metrics, winogavil_outcome)
from datacomp_assets.world.eval_suite import TASKS

IMAGE_EXTENSIONS = ("webp", "png", "jpg", "jpeg")  # the image keys clip_benchmark reads, in its order
RECALL_AT = (1, 5, 10)  # the recall@k DataComp reports for retrieval
# evaluate.py's --batch_size default. On CUDA the batch shapes pick the fp16 kernels, so they can move a near tie.
REFERENCE_BATCH_SIZE = 64

# ---------------------------------------------------------------- reading the test sets


def read_lines(path: Path) -> list[str]:
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


def sample_image(sample: dict[str, bytes]) -> bytes:
    """The encoded image of a webdataset sample (the first of clip_benchmark's image keys it has)."""
    return next(sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample)


def decode_image(data: bytes) -> Image.Image:
    """A webdataset image as clip_benchmark's loader decodes it: webdataset's "pil" handler converts to RGB on
    reading, before the model's transform."""
    return Image.open(io.BytesIO(data)).convert("RGB")


def hub_image(value) -> Image.Image:
    """A Hub task's image as the `datasets` library hands it to DataComp's transform: in its own mode (palette,
    RGBA, ...), so that open_clip's transform converts it to RGB after resizing, as the reference does."""
    if isinstance(value, Image.Image):
        return value
    image = Image.open(io.BytesIO(value))
    image.load()
    return image


def reference_autocast(device: str):
    """fp16 autocast on CUDA where the reference runs under `torch.cuda.amp.autocast()` (the classifier's text
    embeddings, retrieval, WinoGAViL); fp32 elsewhere, as there, since that autocast leaves CPU work alone."""
    if str(device).startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def sample_label(sample: dict[str, bytes]) -> int:
    return int(sample["cls"].decode().strip())


def sample_metadata(sample: dict[str, bytes]) -> np.ndarray:
    """The sample's metadata row (its `.npy`, as webdataset decodes it); empty when it has none."""
    if "npy" not in sample:
        return np.zeros(0, dtype=np.int64)
    return np.atleast_1d(np.load(io.BytesIO(sample["npy"]), allow_pickle=False))


def load_classification(task_dir: str | Path) -> tuple[list[Image.Image], list[int], list[str], list[str]]:
    """(images, labels, classnames, templates) of a classification task, all in memory (small suites only)."""
    images, labels = [], []
    for s in iter_shard_samples(task_dir):
        images.append(decode_image(sample_image(s)))
        labels.append(sample_label(s))
    task_dir = Path(task_dir)
    return (images, labels, read_lines(task_dir / "classnames.txt"),
            read_lines(task_dir / "zeroshot_classification_templates.txt"))


def retrieval_examples(task_dir: str | Path) -> Iterator[tuple[Image.Image, list[str]]]:
    """(image, its captions) of a retrieval task, each image decoded as its reference loader decodes it: the
    nlphuji rows if the folder holds them, else webdataset samples <key>.jpg + <key>.txt (captions, one per line)."""
    if hub_rows.has_rows(Path(task_dir)):
        for image, captions in hub_rows.retrieval_examples(Path(task_dir)):
            yield hub_image(image), captions
        return
    for s in iter_shard_samples(task_dir):
        yield decode_image(sample_image(s)), [c for c in s["txt"].decode().split("\n") if c.strip()]


# ---------------------------------------------------------------- metrics (pure functions of scores)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float | None]:
    """acc1, acc5 and mean per-class recall, valued as DataComp's wds_eval.py values them: accuracies are
    hits / n in float64 (clip_benchmark's `accuracy`), acc5 is None (a JSON null) with fewer than 5 classes, and
    the recall is scikit-learn's balanced accuracy of the argmax, over the classes that occur in the labels."""
    labels = torch.as_tensor(labels)
    n, n_classes = logits.shape
    hits = logits.topk(min(5, n_classes), dim=1).indices == labels[:, None]
    metrics = {"acc1": hits[:, 0].sum().item() / n,
               "acc5": hits.any(dim=1).sum().item() / n if n_classes >= 5 else None}
    correct = (logits.argmax(dim=1) == labels).numpy()
    labels = labels.numpy()
    recalls = [correct[labels == c].sum() / np.sum(labels == c) for c in np.unique(labels)]
    metrics["mean_per_class_recall"] = float(np.mean(recalls))
    return metrics


def image_retrieval_hits(scores: torch.Tensor, text_to_image, k: int) -> torch.Tensor:
    """Per caption: is its image among the k best-scored images? (scores[text, image]; text_to_image[t] is the
    image caption t belongs to.)"""
    return (scores.topk(k, dim=1).indices == torch.as_tensor(text_to_image)[:, None]).any(dim=1)


def text_retrieval_hits(scores: torch.Tensor, text_to_image, k: int) -> torch.Tensor:
    """Per image: is one of its captions among the k best-scored captions?"""
    top_texts = scores.topk(k, dim=0).indices  # (k, images)
    return (torch.as_tensor(text_to_image)[top_texts] == torch.arange(scores.shape[1])[None, :]).any(dim=0)


def retrieval_metrics(scores: torch.Tensor, text_to_image: torch.Tensor,
                      recall_at: Iterable[int] = RECALL_AT) -> dict[str, float]:
    """Recall@k both ways from scores[text, image], clip_benchmark's definitions and float32 means; a k larger
    than the number of candidates is left out. `mean_recall@1` is DataComp's main metric (retr_eval.py)."""
    n_texts, n_images = scores.shape
    metrics = {}
    for k in recall_at:
        if k <= n_images:
            metrics[f"image_retrieval_recall@{k}"] = image_retrieval_hits(scores, text_to_image, k).float().mean().item()
        if k <= n_texts:
            metrics[f"text_retrieval_recall@{k}"] = text_retrieval_hits(scores, text_to_image, k).float().mean().item()
    metrics["mean_recall@1"] = 0.5 * (metrics["text_retrieval_recall@1"] + metrics["image_retrieval_recall@1"])
    return metrics


def retrieval_outcome(scores: torch.Tensor, text_to_image) -> dict[str, np.ndarray]:
    """Per-query hits@1 both ways, for resampling `mean_recall@1` over the test images (evaluation/noise.py)."""
    return {"kind": np.array("retrieval"), "image_hits": image_retrieval_hits(scores, text_to_image, 1).numpy(),
            "text_image": torch.as_tensor(text_to_image).numpy(),
            "text_hits": text_retrieval_hits(scores, text_to_image, 1).numpy()}


# ---------------------------------------------------------------- model side


@torch.no_grad()
def zero_shot_classifier(model, tokenizer, classnames: list[str], templates: list[str], device: str) -> torch.Tensor:
    """The (dim, classes) classifier on `device`, built as clip_benchmark builds it (one batch of prompts per
    class; the normalised mean of their normalised embeddings), under its autocast."""
    weights = []
    with reference_autocast(device):
        for classname in classnames:
            tokens = tokenizer([template.format(c=classname) for template in templates]).to(device)
            embedding = F.normalize(model.encode_text(tokens), dim=-1).mean(dim=0)
            embedding /= embedding.norm()
            weights.append(embedding)
        return torch.stack(weights, dim=1).to(device)


@torch.no_grad()
def classification_logits(model, classifier: torch.Tensor, image_batches: Iterable[torch.Tensor],
                          device: str) -> torch.Tensor:
    """Logits of preprocessed image batches, computed on `device` as clip_benchmark's run_classification does with
    DataComp's amp=False: images in full precision on every device."""
    logits = [(100. * F.normalize(model.encode_image(images.to(device)), dim=-1) @ classifier).float().cpu()
              for images in image_batches]
    return torch.cat(logits) if logits else torch.zeros(0, classifier.shape[1])


class ClassificationSamples(torch.utils.data.IterableDataset):
    """(preprocessed image, label, metadata row) of a webdataset classification task, in shard order.

    With DataLoader workers, worker i decodes every n-th sample: decoding is the slow part, and each sample's
    label and metadata travel with its image, so the order the workers' batches arrive in does not matter.
    """

    def __init__(self, task_dir: Path, preprocess):
        self.task_dir, self.preprocess = Path(task_dir), preprocess

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for i, sample in enumerate(iter_shard_samples(self.task_dir)):
            if i % workers == worker:
                yield (self.preprocess(decode_image(sample_image(sample))), sample_label(sample),
                       sample_metadata(sample))


class PreprocessedSets:
    """Preprocessed test batches, kept between the checkpoints one process scores: the main command scores every
    seed of every strategy on the same suite, and at `tiny` decoding is most of an evaluation. Bounded: a set
    that does not fit in the room left (a paper-scale task) is decoded again each time, as it streams."""

    def __init__(self, room_bytes: int):
        self.room = room_bytes
        self.sets: dict[tuple, list[tuple]] = {}

    def batches(self, key: tuple, decode: Callable[[], Iterable[tuple]]) -> Iterator[tuple]:
        if key in self.sets:
            yield from self.sets[key]
            return
        kept: list[tuple] | None = []
        size = 0
        for batch in decode():
            if kept is not None:
                size += sum(part.nbytes for part in batch if hasattr(part, "nbytes"))
                if size <= self.room:
                    kept.append(batch)
                else:
                    kept = None
            yield batch
        if kept is not None:
            self.sets[key] = kept
            self.room -= size


PREPROCESSED = PreprocessedSets(room_bytes=512 * 2**20)


def classification_set_logits(model, preprocess, classifier: torch.Tensor, task_dir: Path, batch_size: int,
                               device: str, num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """(logits, labels, metadata rows) of every test sample."""
    def decode():
        yield from torch.utils.data.DataLoader(ClassificationSamples(task_dir, preprocess), batch_size=batch_size,
                                               num_workers=num_workers)

    labels, metadata = [], []

    def images():
        for image_batch, label_batch, metadata_batch in PREPROCESSED.batches(
                (str(task_dir), repr(preprocess), batch_size), decode):
            labels.append(label_batch)
            metadata.append(metadata_batch.numpy())
            yield image_batch

    logits = classification_logits(model, classifier, images(), device)
    return logits, torch.cat(labels), np.concatenate(metadata)


def evaluate_classification(task, task_dir: Path, model, preprocess, tokenizer, batch_size: int, device: str,
                            num_workers: int = 0) -> tuple[dict, dict | None]:
    classifier = zero_shot_classifier(model, tokenizer, read_lines(task_dir / "classnames.txt"),
                                      read_lines(task_dir / "zeroshot_classification_templates.txt"), device)
    logits, labels, metadata = classification_set_logits(model, preprocess, classifier, task_dir, batch_size,
                                                         device, num_workers)
    metrics = classification_metrics(logits, labels)
    metrics.update(metadata_metrics(task.key, logits.numpy(), labels.numpy(), metadata))
    return metrics, classification_outcome(task.key, task.main_metric, logits.numpy(), labels.numpy(), metadata)


@torch.no_grad()
def evaluate_retrieval(task_dir: Path, model, preprocess, tokenizer, batch_size: int, device: str) -> tuple[dict, dict]:
    """As clip_benchmark's zeroshot_retrieval.evaluate: each batch of images and its captions embedded together,
    under its autocast; the scores on the CPU."""
    def decode():
        batch: list[tuple[torch.Tensor, list[str]]] = []
        for image, caps in retrieval_examples(task_dir):
            batch.append((preprocess(image), caps))
            if len(batch) == batch_size:
                yield torch.stack([image for image, _ in batch]), [caps for _, caps in batch]
                batch = []
        if batch:
            yield torch.stack([image for image, _ in batch]), [caps for _, caps in batch]

    image_embs, text_embs, text_to_image = [], [], []
    for image_batch, caption_batch in PREPROCESSED.batches((str(task_dir), repr(preprocess), batch_size), decode):
        tokens = tokenizer([c for caps in caption_batch for c in caps]).to(device)
        with reference_autocast(device):
            image_embs.append(F.normalize(model.encode_image(image_batch.to(device)), dim=-1).cpu())
            text_embs.append(F.normalize(model.encode_text(tokens), dim=-1).cpu())
        first = sum(len(batch) for batch in image_embs[:-1])
        text_to_image += [first + i for i, caps in enumerate(caption_batch) for _ in caps]
    scores = torch.cat(text_embs) @ torch.cat(image_embs).T
    return retrieval_metrics(scores, torch.tensor(text_to_image)), retrieval_outcome(scores, text_to_image)


def winogavil_prompt(cue: str) -> str:
    """DataComp's prompt for a WinoGAViL cue (wino_eval.get_clip_prompt): "A <cue>" or "An <cue>", lower case."""
    cue = cue.lower()
    return f"An {cue}" if cue[:1] in ("a", "e", "i", "o", "u") else f"A {cue}"


@torch.no_grad()
def evaluate_winogavil(task, task_dir: Path, model, preprocess, tokenizer, batch_size: int,
                       device: str) -> tuple[dict, dict]:
    """Per instance: score the candidate images against the cue, pick as many as there are associations
    (wino_eval.py: embeddings and scores under its autocast, so on CUDA the scores are fp16, ties included)."""
    scores, truths = [], []
    for cue, candidates, associations, images in hub_rows.winogavil_examples(task_dir):
        pixels = torch.stack([preprocess(hub_image(image)) for image in images]).to(device)
        tokens = tokenizer([winogavil_prompt(cue)]).to(device)
        with reference_autocast(device):
            # open_clip's encode_*(normalize=True), which wino_eval.py calls, is this F.normalize
            image_features = F.normalize(model.encode_image(pixels), dim=-1)
            text_features = F.normalize(model.encode_text(tokens), dim=-1)
            scores.append((text_features @ image_features.T).squeeze(0).cpu().numpy())
        truths.append(np.isin(candidates, associations))
    return winogavil_metrics(scores, truths), winogavil_outcome(task.main_metric, scores, truths)


def evaluate_task(task, task_dir: Path, model, preprocess, tokenizer, batch_size: int = 64, device: str = "cpu",
                  num_workers: int = 0, outcomes: dict | None = None) -> dict[str, float]:
    """All metrics of one task plus `main_metric`. If `outcomes` is given, the per-sample outcomes its main metric
    is computed from go to outcomes[task.key] (for the evaluation noise, evaluation/noise.py)."""
    task_dir = Path(task_dir)
    outcome = None  # a task without one (no main metric) has no noise interval
    if task.kind == "classification":
        metrics, outcome = evaluate_classification(task, task_dir, model, preprocess, tokenizer, batch_size, device,
                                                   num_workers)
    elif task.kind == "retrieval":
        metrics, outcome = evaluate_retrieval(task_dir, model, preprocess, tokenizer, batch_size, device)
    elif task.kind == "winogavil":
        metrics, outcome = evaluate_winogavil(task, task_dir, model, preprocess, tokenizer, batch_size, device)
    elif task.kind == "fairface":  # FairFace, UTKFace (outside the average), with the classification tasks' parts
        metrics = fairness.evaluate_fairface(
            task_dir, preprocess, batch_size, num_workers,
            classifier=lambda names, templates: zero_shot_classifier(model, tokenizer, names, templates, device),
            logits=lambda batches, classifier: classification_logits(model, classifier, batches, device))
    else:
        raise ValueError(f"task {task.key!r}: unknown kind {task.kind!r}")
    metrics["main_metric"] = metrics[task.main_metric] if task.main_metric else None  # null, as the reference
    if outcomes is not None and outcome is not None:
        outcomes[task.key] = outcome
    return metrics


# ---------------------------------------------------------------- the results file


def results_row(task, metrics: dict) -> dict:
    """A task's line, as evaluate.py writes it ("key", "dataset", "metrics"; json writes None as null and NaN as
    NaN), plus the task's "group", which the reference's readers ignore and ours use for a task of the tiny suite."""
    return {"key": task.key, "dataset": getattr(task, "name", task.key), "group": task.group, "metrics": metrics}


def evaluate_checkpoint(model_name: str, checkpoint: str | Path | None, suite_root: str | Path,
                        out_jsonl: str | Path, device: str = "cpu", batch_size: int = REFERENCE_BATCH_SIZE,
                        progress: Callable[[str], None] | None = None,
                        tasks: list[str] | None = None, registry: Mapping[str, object] | None = None,
                        num_workers: int = 0, task_done: Callable[[int, str], None] | None = None,
                        samples_file: str | Path | None = None, loaded: tuple | None = None) -> list[dict]:
    """Evaluate a model on every task of a registry (default: the tiny suite's TASKS; REFERENCE_TASKS for
    DataComp's 38), one JSON line per task in out_jsonl; resumable. Each task scored goes to
    `task_done(tasks in out_jsonl, note)` if given, else to `progress`.

    With `samples_file`, each task's per-sample outcomes (noise.py) are kept there too, written before its line.
    Tasks already in out_jsonl are skipped. Before the model is loaded, every task left to do must be on disk
    under suite_root: if any is not, MissingEvalData names them all. Returns the lines of all requested
    tasks, in the order asked (registry order by default). `loaded`: the (model, preprocess, tokenizer) of the
    checkpoint, already loaded (an engine task's, kept between its task groups).
    """
    from datacomp_assets.core.models import load_model

    log = progress or (lambda message: None)
    registry = TASKS if registry is None else registry
    keys = tasks or list(registry)
    out_jsonl = Path(out_jsonl)
    out_jsonl.parent.mkdir(parents=True, exist_ok=True)
    done = read_results(out_jsonl)
    # A crash can leave a cut-short last line: start appending on a fresh line (read_results skips it).
    text = out_jsonl.read_text() if out_jsonl.exists() else ""
    if text and not text.endswith("\n"):
        with out_jsonl.open("a") as out:
            out.write("\n")
    todo = [registry[k] for k in keys if k not in done]
    if not todo:
        log(f"all {len(keys)} tasks already in {out_jsonl}")
        return [done[k] for k in keys]
    missing = missing_tasks(suite_root, todo)
    if missing:
        raise MissingEvalData(suite_root, missing, "not found")
    log(f"{len(keys) - len(todo)} of {len(keys)} tasks already in {out_jsonl}; {len(todo)} to evaluate")
    model, preprocess, tokenizer = loaded or load_model(model_name, checkpoint, device=device)
    with out_jsonl.open("a") as out:
        for n, task in enumerate(todo, 1):
            if not task_done:
                log(f"[{n}/{len(todo)}] evaluating {task.key}")
            start = time.perf_counter()
            outcomes = {}
            metrics = evaluate_task(task, task_directory(suite_root, task), model, preprocess, tokenizer,
                                    batch_size, device, num_workers, outcomes=outcomes)
            if samples_file is not None and outcomes:
                noise.add_outcomes(samples_file, outcomes)
            row = results_row(task, metrics)
            out.write(json.dumps(row) + "\n")
            out.flush()
            done[task.key] = row
            seconds = time.perf_counter() - start
            score = f"{task.main_metric} = {metrics['main_metric']:.4f}" if task.main_metric else "no main metric"
            note = f"{task.key}: {score} ({seconds:.0f} s)"
            if task_done:
                task_done(len(keys) - len(todo) + n, note)
            else:
                log(note)
    return [done[k] for k in keys]


def task_group(row: dict) -> str:
    """A results line's group; lines written without one (by DataComp's own harness) are looked up."""
    if row.get("group"):
        return row["group"]
    task = TASKS.get(row["key"]) or TASKLIST[row["key"]]
    return task.group


def summarize(results: list[dict]) -> dict[str, float]:
    """`aggregate` with the groups of lines written without one (by DataComp's own harness) looked up."""
    return aggregate(results, task_group)
