"""Zero-shot evaluation of an open_clip model on the suite built by `suite.py`.

Follows clip_benchmark, which DataComp's harness uses: a class embedding is the normalised mean of the
normalised embeddings of its prompts; retrieval recall@1 is computed both ways. Results are one JSON line
per task in the reference format, written as each task finishes, so an interrupted run resumes where it
stopped. This module imports no Dagster.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from datacomp_assets.evaluation.suite import TASKS, EvalTask
from datacomp_assets.pool.shards import iter_webdataset

# ---------------------------------------------------------------- reading the webdataset layout


def iter_shard_samples(task_dir: str | Path) -> Iterator[dict[str, bytes]]:
    """Samples of `<task_dir>/test/{i}.tar` as {"__key__": key, ext: bytes}, in shard order."""
    test_dir = Path(task_dir) / "test"
    nshards = int((test_dir / "nshards.txt").read_text().strip())
    for i in range(nshards):
        for key, files in iter_webdataset(test_dir / f"{i}.tar"):
            yield {"__key__": key, **files}


def read_lines(path: Path) -> list[str]:
    return [line for line in Path(path).read_text().splitlines() if line.strip()]


def load_classification(task_dir: str | Path) -> tuple[list[Image.Image], list[int], list[str], list[str]]:
    """(images, labels, classnames, templates) of a classification task."""
    images, labels = [], []
    for s in iter_shard_samples(task_dir):
        image_ext = "jpg" if "jpg" in s else "webp"
        images.append(Image.open(io.BytesIO(s[image_ext])).convert("RGB"))
        labels.append(int(s["cls"].decode().strip()))
    task_dir = Path(task_dir)
    return (images, labels, read_lines(task_dir / "classnames.txt"),
            read_lines(task_dir / "zeroshot_classification_templates.txt"))


def load_retrieval(task_dir: str | Path) -> tuple[list[Image.Image], list[list[str]]]:
    """(images, captions per image) of a retrieval task."""
    images, captions = [], []
    for s in iter_shard_samples(task_dir):
        images.append(Image.open(io.BytesIO(s["jpg"])).convert("RGB"))
        captions.append([c for c in s["txt"].decode().split("\n") if c.strip()])
    return images, captions


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


def retrieval_metrics(scores: torch.Tensor, text_to_image: torch.Tensor) -> dict[str, float]:
    """Recall@1 both ways from scores[text, image]; text_to_image[t] is the image caption t belongs to.

    Image retrieval: for each caption, is its image ranked first? Text retrieval: for each image, is one
    of its captions ranked first? (clip_benchmark's definitions.)
    """
    text_to_image = torch.as_tensor(text_to_image)
    image_r1 = (scores.argmax(dim=1) == text_to_image).float().mean().item()
    best_text = scores.argmax(dim=0)  # per image
    text_r1 = (text_to_image[best_text] == torch.arange(scores.shape[1])).float().mean().item()
    return {"image_retrieval_recall@1": image_r1, "text_retrieval_recall@1": text_r1,
            "mean_recall@1": (image_r1 + text_r1) / 2}


# ---------------------------------------------------------------- model side


@torch.no_grad()
def encode_images(model, preprocess, images: list[Image.Image], batch_size: int, device: str) -> torch.Tensor:
    feats = []
    for start in range(0, len(images), batch_size):
        batch = torch.stack([preprocess(im) for im in images[start:start + batch_size]]).to(device)
        feats.append(F.normalize(model.encode_image(batch).float(), dim=-1).cpu())
    return torch.cat(feats)


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


def evaluate_task(task: EvalTask, task_dir: Path, model, preprocess, tokenizer,
                  batch_size: int = 256, device: str = "cpu") -> dict[str, float]:
    """All metrics of one task plus `main_metric`."""
    if task.kind == "classification":
        images, labels, classnames, templates = load_classification(task_dir)
        classifier = zero_shot_classifier(model, tokenizer, classnames, templates, batch_size, device)
        metrics = classify(encode_images(model, preprocess, images, batch_size, device), classifier, labels)
    else:
        images, captions = load_retrieval(task_dir)
        texts = [c for caps in captions for c in caps]
        text_to_image = torch.tensor([i for i, caps in enumerate(captions) for _ in caps])
        image_feats = encode_images(model, preprocess, images, batch_size, device)
        text_feats = encode_texts(model, tokenizer, texts, batch_size, device)
        metrics = retrieval_metrics(text_feats @ image_feats.T, text_to_image)
    metrics["main_metric"] = metrics[task.main_metric]
    return metrics


# ---------------------------------------------------------------- the results file


def read_results(out_jsonl: str | Path) -> dict[str, dict]:
    """Finished task lines by key; a line cut short by a crash is ignored."""
    results = {}
    path = Path(out_jsonl)
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            results[row["key"]] = row
    return results


def evaluate_checkpoint(model_name: str, checkpoint: str | Path | None, suite_root: str | Path,
                        out_jsonl: str | Path, device: str = "cpu", batch_size: int = 256,
                        progress: Callable[[str], None] | None = None,
                        tasks: list[str] | None = None) -> list[dict]:
    """Evaluate a model on every suite task, one JSON line per task in out_jsonl; resumable.

    Tasks already in out_jsonl are skipped, and the model is loaded only if some task is left.
    Returns the lines of all requested tasks, in registry order.
    """
    from datacomp_assets.training.models import load_model

    log = progress or (lambda message: None)
    keys = tasks or list(TASKS)
    out_jsonl = Path(out_jsonl)
    out_jsonl.parent.mkdir(parents=True, exist_ok=True)
    done = read_results(out_jsonl)
    # A crash can leave a cut-short last line: start appending on a fresh line (read_results skips it).
    text = out_jsonl.read_text() if out_jsonl.exists() else ""
    if text and not text.endswith("\n"):
        with out_jsonl.open("a") as out:
            out.write("\n")
    todo = [k for k in keys if k not in done]
    if todo:
        model, preprocess, tokenizer = load_model(model_name, checkpoint, device=device)
        with out_jsonl.open("a") as out:
            for key in todo:
                task = TASKS[key]
                task_dir = Path(suite_root) / key
                if not (task_dir / "test" / "nshards.txt").exists():
                    raise FileNotFoundError(f"evaluation task {key!r} is missing from {suite_root}")
                log(f"evaluating {key}")
                metrics = evaluate_task(task, task_dir, model, preprocess, tokenizer, batch_size, device)
                row = {"key": key, "dataset": key, "group": task.group, "metrics": metrics}
                out.write(json.dumps(row) + "\n")
                out.flush()
                done[key] = row
                log(f"{key}: {task.main_metric} = {metrics['main_metric']:.4f}")
    else:
        log(f"all {len(keys)} tasks already in {out_jsonl}")
    return [done[k] for k in keys]


def aggregate(results: list[dict]) -> dict[str, float]:
    """Mean main metric per group and the overall `average` (plain mean over tasks, as DataComp does)."""
    by_group: dict[str, list[float]] = {}
    for row in results:
        group = row.get("group") or TASKS[row["key"]].group
        by_group.setdefault(group, []).append(row["metrics"]["main_metric"])
    summary = {group: float(np.mean(values)) for group, values in by_group.items()}
    summary["average"] = float(np.mean([row["metrics"]["main_metric"] for row in results])) if results else float("nan")
    return summary
