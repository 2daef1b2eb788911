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

import io
import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from datacomp_assets.core.models import encode_image_batches, encode_images
from datacomp_assets.core.reference_tasks import REFERENCE_TASKS
from datacomp_assets.core.results import aggregate, read_results
from datacomp_assets.core.shards import iter_shard_samples
from datacomp_assets.evaluation import hub_rows
from datacomp_assets.evaluation.reference import MissingEvalData, missing_tasks, task_directory
from datacomp_assets.evaluation.reference_metrics import metadata_metrics, winogavil_metrics
from datacomp_assets.world.eval_suite import TASKS

IMAGE_EXTENSIONS = ("webp", "png", "jpg", "jpeg")  # the image keys clip_benchmark reads, in its order
RECALL_AT = (1, 5, 10)  # the recall@k DataComp reports for retrieval

# ---------------------------------------------------------------- reading the test sets


def read_lines(path: Path) -> list[str]:
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


def sample_image(sample: dict[str, bytes]) -> bytes:
    """The encoded image of a webdataset sample (the first of clip_benchmark's image keys it has)."""
    return next(sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample)


def decode_image(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


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


def retrieval_examples(task_dir: str | Path) -> Iterator[tuple[bytes, list[str]]]:
    """(encoded image, its captions) of a retrieval task: the nlphuji rows if the folder holds them, else
    webdataset samples <key>.jpg + <key>.txt (captions, one per line)."""
    if hub_rows.has_rows(Path(task_dir)):
        yield from hub_rows.retrieval_examples(Path(task_dir))
        return
    for s in iter_shard_samples(task_dir):
        yield sample_image(s), [c for c in s["txt"].decode().split("\n") if c.strip()]


# ---------------------------------------------------------------- metrics (pure functions of scores)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """acc1, acc5 (only with at least 5 classes) and mean per-class recall (balanced accuracy)."""
    labels = torch.as_tensor(labels)
    n_classes = logits.shape[1]
    metrics = {}
    top = logits.topk(min(5, n_classes), dim=1).indices
    metrics["acc1"] = (top[:, 0] == labels).float().mean().item()
    if n_classes >= 5:
        metrics["acc5"] = (top == labels[:, None]).any(dim=1).float().mean().item()
    correct = (top[:, 0] == labels).float()
    # Average over the classes that occur in the test set, as sklearn's balanced_accuracy_score does.
    recalls = [correct[labels == c].mean().item() for c in labels.unique()]
    metrics["mean_per_class_recall"] = float(np.mean(recalls))
    return metrics


def retrieval_metrics(scores: torch.Tensor, text_to_image: torch.Tensor,
                      recall_at: Iterable[int] = RECALL_AT) -> dict[str, float]:
    """Recall@k both ways from scores[text, image]; text_to_image[t] is the image caption t belongs to.

    Image retrieval: for each caption, is its image among the k best-scored images? Text retrieval: for each
    image, is one of its captions among the k best-scored captions? (clip_benchmark's definitions.) A k larger
    than the number of candidates is left out. `mean_recall@1` is DataComp's main metric.
    """
    text_to_image = torch.as_tensor(text_to_image)
    n_texts, n_images = scores.shape
    metrics = {}
    for k in recall_at:
        if k <= n_images:
            hits = scores.topk(k, dim=1).indices == text_to_image[:, None]  # (texts, k)
            metrics[f"image_retrieval_recall@{k}"] = hits.any(dim=1).float().mean().item()
        if k <= n_texts:
            top_texts = scores.topk(k, dim=0).indices  # (k, images)
            hits = text_to_image[top_texts] == torch.arange(n_images)[None, :]
            metrics[f"text_retrieval_recall@{k}"] = hits.any(dim=0).float().mean().item()
    metrics["mean_recall@1"] = (metrics["image_retrieval_recall@1"] + metrics["text_retrieval_recall@1"]) / 2
    return metrics


# ---------------------------------------------------------------- model side


@torch.no_grad()
def encode_texts(model, tokenizer, texts: list[str], batch_size: int, device: str) -> torch.Tensor:
    feats = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(texts[start:start + batch_size]).to(device)
        feats.append(F.normalize(model.encode_text(tokens).float(), dim=-1).cpu())
    return torch.cat(feats)


def class_embeddings(template_features: torch.Tensor) -> torch.Tensor:
    """(classes, templates, dim) normalised prompt features -> (classes, dim) classifier, as CLIP builds it."""
    return F.normalize(F.normalize(template_features, dim=-1).mean(dim=1), dim=-1)


def zero_shot_classifier(model, tokenizer, classnames: list[str], templates: list[str],
                         batch_size: int, device: str) -> torch.Tensor:
    prompts = [t.format(c=c) for c in classnames for t in templates]
    feats = encode_texts(model, tokenizer, prompts, batch_size, device)
    return class_embeddings(feats.view(len(classnames), len(templates), -1))


def classify(image_features: torch.Tensor, classifier: torch.Tensor, labels) -> dict[str, float]:
    """Metrics of zero-shot classification from normalised image features and class embeddings."""
    return classification_metrics(100.0 * image_features @ classifier.T, torch.as_tensor(labels))


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


def encode_classification_set(model, preprocess, task_dir: Path, batch_size: int, device: str,
                              num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """(normalised image features, labels, metadata rows) of every test sample."""
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

    features = encode_image_batches(model, images(), device)
    return features, torch.cat(labels), np.concatenate(metadata)


def evaluate_classification(task, task_dir: Path, model, preprocess, tokenizer, batch_size: int, device: str,
                            num_workers: int = 0) -> dict[str, float]:
    classifier = zero_shot_classifier(model, tokenizer, read_lines(task_dir / "classnames.txt"),
                                      read_lines(task_dir / "zeroshot_classification_templates.txt"),
                                      batch_size, device)
    features, labels, metadata = encode_classification_set(model, preprocess, task_dir, batch_size, device,
                                                           num_workers)
    logits = 100.0 * features @ classifier.T
    metrics = classification_metrics(logits, labels)
    metrics.update(metadata_metrics(task.key, logits.numpy(), labels.numpy(), metadata))
    return metrics


def evaluate_retrieval(task_dir: Path, model, preprocess, tokenizer, batch_size: int, device: str) -> dict[str, float]:
    def decode():
        batch: list[tuple[torch.Tensor, list[str]]] = []
        for data, caps in retrieval_examples(task_dir):
            batch.append((preprocess(decode_image(data)), caps))
            if len(batch) == batch_size:
                yield torch.stack([image for image, _ in batch]), [caps for _, caps in batch]
                batch = []
        if batch:
            yield torch.stack([image for image, _ in batch]), [caps for _, caps in batch]

    captions: list[list[str]] = []

    def images():
        for image_batch, caption_batch in PREPROCESSED.batches((str(task_dir), repr(preprocess), batch_size), decode):
            captions.extend(caption_batch)
            yield image_batch

    image_feats = encode_image_batches(model, images(), device)
    texts = [c for caps in captions for c in caps]
    text_to_image = torch.tensor([i for i, caps in enumerate(captions) for _ in caps])
    text_feats = encode_texts(model, tokenizer, texts, batch_size, device)
    return retrieval_metrics(text_feats @ image_feats.T, text_to_image)


def winogavil_prompt(cue: str) -> str:
    """DataComp's prompt for a WinoGAViL cue (wino_eval.get_clip_prompt): "A <cue>" or "An <cue>", lower case."""
    cue = cue.lower()
    return f"An {cue}" if cue[:1] in ("a", "e", "i", "o", "u") else f"A {cue}"


def evaluate_winogavil(task_dir: Path, model, preprocess, tokenizer, batch_size: int, device: str) -> dict[str, float]:
    """Per instance: score the candidate images against the cue, pick as many as there are associations."""
    scores, truths = [], []
    for cue, candidates, associations, images in hub_rows.winogavil_examples(task_dir):
        image_feats = encode_images(model, preprocess, (decode_image(b) for b in images), batch_size, device)
        text_feats = encode_texts(model, tokenizer, [winogavil_prompt(cue)], batch_size, device)
        scores.append((text_feats @ image_feats.T)[0].numpy())
        truths.append(np.isin(candidates, associations))
    return winogavil_metrics(scores, truths)


def evaluate_task(task, task_dir: Path, model, preprocess, tokenizer,
                  batch_size: int = 256, device: str = "cpu", num_workers: int = 0) -> dict[str, float]:
    """All metrics of one task plus `main_metric`."""
    task_dir = Path(task_dir)
    if task.kind == "classification":
        metrics = evaluate_classification(task, task_dir, model, preprocess, tokenizer, batch_size, device,
                                          num_workers)
    elif task.kind == "retrieval":
        metrics = evaluate_retrieval(task_dir, model, preprocess, tokenizer, batch_size, device)
    elif task.kind == "winogavil":
        metrics = evaluate_winogavil(task_dir, model, preprocess, tokenizer, batch_size, device)
    else:
        raise ValueError(f"task {task.key!r}: unknown kind {task.kind!r}")
    metrics["main_metric"] = metrics[task.main_metric]
    return metrics


# ---------------------------------------------------------------- the results file


def evaluate_checkpoint(model_name: str, checkpoint: str | Path | None, suite_root: str | Path,
                        out_jsonl: str | Path, device: str = "cpu", batch_size: int = 256,
                        progress: Callable[[str], None] | None = None,
                        tasks: list[str] | None = None, registry: Mapping[str, object] | None = None,
                        num_workers: int = 0, task_done: Callable[[int, str], None] | None = None) -> list[dict]:
    """Evaluate a model on every task of a registry (default: the tiny suite's TASKS; REFERENCE_TASKS for
    DataComp's 38), one JSON line per task in out_jsonl; resumable. Each task scored goes to
    `task_done(tasks in out_jsonl, note)` if given, else to `progress`.

    Tasks already in out_jsonl are skipped. Before the model is loaded, every task left to do must be on disk
    under suite_root: if any is not, MissingEvalData names them all. Returns the lines of all requested
    tasks, in the order asked (registry order by default).
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
    model, preprocess, tokenizer = load_model(model_name, checkpoint, device=device)
    with out_jsonl.open("a") as out:
        for n, task in enumerate(todo, 1):
            if not task_done:
                log(f"[{n}/{len(todo)}] evaluating {task.key}")
            start = time.perf_counter()
            metrics = evaluate_task(task, task_directory(suite_root, task), model, preprocess, tokenizer,
                                    batch_size, device, num_workers)
            row = {"key": task.key, "dataset": getattr(task, "name", task.key), "group": task.group,
                   "metrics": metrics}
            out.write(json.dumps(row) + "\n")
            out.flush()
            done[task.key] = row
            seconds = time.perf_counter() - start
            note = f"{task.key}: {task.main_metric} = {metrics['main_metric']:.4f} ({seconds:.0f} s)"
            if task_done:
                task_done(len(keys) - len(todo) + n, note)
            else:
                log(note)
    return [done[k] for k in keys]


def task_group(row: dict) -> str:
    """A results line's group; lines written without one (by DataComp's own harness) are looked up."""
    if row.get("group"):
        return row["group"]
    task = TASKS.get(row["key"]) or REFERENCE_TASKS[row["key"]]
    return task.group


def summarize(results: list[dict]) -> dict[str, float]:
    """`aggregate` with the groups of lines written without one (by DataComp's own harness) looked up."""
    return aggregate(results, task_group)
