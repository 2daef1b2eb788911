"""A folder in the layout DataComp's download_evalsets.py leaves, evaluated as it is: all 38 tasks and FairFace,
UTKFace, offline.

The stand-ins are written by the libraries that write the real ones: the classification tasks in clip_benchmark's
webdataset layout (the helpers of test_reference_eval.py), and `<data_dir>/hf_cache` by the `datasets` library
itself, with a builder run under each nlphuji repo's name, as the repos' loading scripts ran in the reference's
`datasets.load_dataset("nlphuji/<name>", split="test", cache_dir=<data_dir>/hf_cache)`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch.nn.functional as F

from datacomp_assets.core.reference_tasks import REFERENCE_TASKS, TASKLIST, UNAVERAGED_TASKS
from datacomp_assets.evaluation import cli, hub_rows
from datacomp_assets.evaluation.fairness import fairface_metrics
from datacomp_assets.evaluation.reference import missing_tasks, task_directory
from tests.test_reference_eval import (
    ColourCodedModel, colour_coded_model, colour_image, encode, npy, write_wds_task,
)

FLICKR = "retrieval/flickr_1k_test_image_text_retrieval"
MSCOCO = "retrieval/mscoco_2014_5k_test_image_text_retrieval"
WINOGAVIL = "misc/winogavil"
HUB_TASKS = (FLICKR, MSCOCO, WINOGAVIL)

# ---------------------------------------------------------------- hf_cache, written by `datasets`


class NlphujiScript(datasets.GeneratorBasedBuilder):
    """What an nlphuji loading script does: images extracted under the cache's downloads/, rows naming them."""

    VERSION = datasets.Version("1.1.0")
    BUILDER_CONFIGS = [datasets.BuilderConfig(name="TEST", version=VERSION)]
    DEFAULT_CONFIG_NAME = "TEST"
    FEATURES: datasets.Features
    ROWS: list[dict]

    def _info(self):
        return datasets.DatasetInfo(features=self.FEATURES)

    def _split_generators(self, dl_manager):
        return [datasets.SplitGenerator(name=datasets.Split.TEST)]

    def _generate_examples(self):
        yield from enumerate(self.ROWS)


def write_hub_cache(data_dir: Path, task_key: str, features: datasets.Features, rows: list[dict]) -> None:
    """Run a builder under the repo's name, into `<data_dir>/hf_cache`, as download_evalsets.py's call does."""
    name = REFERENCE_TASKS[task_key].dir_name
    script = type("Script", (NlphujiScript,), {"FEATURES": features, "ROWS": rows})
    builder = script(cache_dir=str(data_dir / "hf_cache"), dataset_name=name, repo_id=f"nlphuji/{name}",
                     hash="5e7fa0f3c2d14b7c")  # a loading script's module hash
    builder.download_and_prepare()


def extracted_image(data_dir: Path, task_key: str, index: int, shown: int) -> str:
    """An image file where `datasets` extracts a repo's zip; rows name it by its absolute path."""
    folder = data_dir / "hf_cache" / "downloads" / "extracted" / REFERENCE_TASKS[task_key].dir_name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{index}.png"
    path.write_bytes(encode(colour_image(shown), "PNG"))
    return str(path)


RETRIEVAL_FEATURES = datasets.Features({
    "image": datasets.Image(), "caption": datasets.List(datasets.Value("string")),
    "sentids": datasets.List(datasets.Value("string")), "filename": datasets.Value("string")})
WINOGAVIL_FEATURES = datasets.Features({
    "candidates": datasets.List(datasets.Value("string")), "candidate_images": datasets.List(datasets.Image()),
    "cue": datasets.Value("string"), "associations": datasets.List(datasets.Value("string")),
    "num_associations": datasets.Value("int64")})


def write_retrieval_cache(data_dir: Path, task_key: str, shown: list[int], captions: list[list[str]]) -> None:
    rows = [{"image": extracted_image(data_dir, task_key, i, c), "caption": caps,
             "sentids": [str(j) for j in range(len(caps))], "filename": f"{i}.png"}
            for i, (c, caps) in enumerate(zip(shown, captions))]
    write_hub_cache(data_dir, task_key, RETRIEVAL_FEATURES, rows)


def write_winogavil_cache(data_dir: Path, instances: list[tuple[str, list[int], list[int]]]) -> None:
    rows = []
    for n, (cue, shown, associated) in enumerate(instances):
        names = [f"w{n}_{j}" for j in range(len(shown))]
        images = [extracted_image(data_dir, WINOGAVIL, 100 * n + j, c) for j, c in enumerate(shown)]
        rows.append({"candidates": names, "candidate_images": images, "cue": cue,
                     "associations": [names[j] for j in associated], "num_associations": len(associated)})
    write_hub_cache(data_dir, WINOGAVIL, WINOGAVIL_FEATURES, rows)


# What the colour-coded model sees, chosen so that every Hub metric is known by hand (see the test).
FLICKR_SHOWN, FLICKR_CAPTIONS = [1, 2, 3], [["thing 1 here", "thing 1 again"], ["thing 4"], ["thing 3"]]
COCO_SHOWN, COCO_CAPTIONS = [5, 6, 7], [["thing 5"], ["thing 8", "thing 7"], ["thing 9"]]
WINO_INSTANCES = [("2", [2, 3, 9, 10, 11], [0, 2]), ("0", list(range(10)), [0, 1, 5])]

# ---------------------------------------------------------------- FairFace and UTKFace, webdatasets with metadata

# Class names are numbers the colour-coded model reads. Toxic classes 13 and 18 trade numbers, so a face shown
# as 13 is called crime-related (18); "18" reads as 2, which class 2 already is, so class 13 is never chosen.
TOXIC_NUMBERS = [18 if j == 13 else 13 if j == 18 else j for j in range(20)]
# Shown class and metadata (age, gender, race, race_binary) per face. Predicted (race, gender, age, toxic):
# 1 -> (1, 1, 1, 1), 0 -> (0, 0, 0, 0), 13 -> (0, 0, 0, 18), 14 -> (0, 0, 0, 14), 5 -> (5, 0, 5, 5).
FACE_SHOWN = [1, 0, 13, 14, 5]
FACE_METADATA = [[1, 1, 1, 0], [3, 0, 0, 1], [0, 1, 2, 1], [2, 0, 0, 1], [5, 0, 1, 0]]


def write_face_task(data_dir: Path, task_key: str, races: int) -> None:
    """djghosh/wds_fairface_test's layout: objective-prefixed class names and templates, webp + npy samples."""
    task_dir = task_directory(data_dir, TASKLIST[task_key])
    (task_dir / "test").mkdir(parents=True)
    classnames = ([f"race:person {k}" for k in range(races)] + [f"gender:person {k}" for k in range(2)]
                  + [f"age:person {k}" for k in range(9)] + [f"toxic:thing {n}" for n in TOXIC_NUMBERS])
    (task_dir / "classnames.txt").write_text("\n".join(classnames) + "\n")
    templates = [f"{objective}:a photo of a {{c}}." for objective in ("race", "gender", "age", "toxic")]
    (task_dir / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    from datacomp_assets.core.shards import write_webdataset

    samples = [(f"f{i:05d}", {"webp": encode(colour_image(c), "WEBP"), "npy": npy(row)})
               for i, (c, row) in enumerate(zip(FACE_SHOWN, FACE_METADATA))]
    write_webdataset(task_dir / "test" / "0.tar", samples)
    (task_dir / "test" / "nshards.txt").write_text("1\n")


# Metadata columns of the WILDS and metadata-scored fairness tasks (their evaluators' _metadata_fields).
METADATA_WIDTH = {"wilds/iwildcam": 9, "wilds/camelyon17": 3, "wilds/fmow": 3, "fairness/dollar_street": 3,
                  "fairness/geode": 2}
CLASS_SHOWN, CLASS_LABELS = [0, 1, 2, 3], [0, 1, 2, 0]  # every classification stand-in: acc1 3/4


def write_evalsets_folder(data_dir: Path) -> None:
    """All of tasklist.yml, as download_evalsets.py lays it out, a few samples each."""
    for key, task in TASKLIST.items():
        if task.kind == "classification":
            width = METADATA_WIDTH.get(key)
            metadata = None if width is None else [[i % 2] * width for i in range(len(CLASS_SHOWN))]
            write_wds_task(data_dir, key, [f"class {k}" for k in range(6)], CLASS_SHOWN, CLASS_LABELS,
                           metadata=metadata, shards=1)
    write_face_task(data_dir, "fairness/fairface", races=7)
    write_face_task(data_dir, "fairness/utkface", races=5)
    write_retrieval_cache(data_dir, FLICKR, FLICKR_SHOWN, FLICKR_CAPTIONS)
    write_retrieval_cache(data_dir, MSCOCO, COCO_SHOWN, COCO_CAPTIONS)
    write_winogavil_cache(data_dir, WINO_INSTANCES)


@pytest.fixture(scope="module")
def evalsets(tmp_path_factory) -> Path:
    data_dir = tmp_path_factory.mktemp("evalsets")
    write_evalsets_folder(data_dir)
    return data_dir


# ---------------------------------------------------------------- the tests


class OpenClipColourModel(ColourCodedModel):
    """The colour-coded model with open_clip's `normalize` keyword, which the reference's WinoGAViL passes."""

    def encode_image(self, images, normalize: bool = False):
        features = super().encode_image(images)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens, normalize: bool = False):
        features = super().encode_text(tokens)
        return F.normalize(features, dim=-1) if normalize else features


def open_clip_colour_model(*args, **kwargs):
    _, preprocess, tokenizer = colour_coded_model()
    return OpenClipColourModel(), preprocess, tokenizer


def test_fairness_tasks_are_in_the_table_outside_the_average():
    assert len(REFERENCE_TASKS) == 38 and list(TASKLIST)[:38] == list(REFERENCE_TASKS)
    assert list(UNAVERAGED_TASKS) == list(TASKLIST)[38:] == ["fairness/fairface", "fairness/utkface"]
    for task in UNAVERAGED_TASKS.values():
        assert task.main_metric is None and task.kind == "fairface" and task.group == "fairness"
    assert TASKLIST["fairness/fairface"].dir_name == "wds_fairface_test"
    assert TASKLIST["fairness/utkface"].hf_repo == "djghosh/wds_utkface_test"


def test_fairface_metrics_known_answers():
    # Predicted (race, gender, age, toxic) per face, as the colour-coded model predicts FACE_SHOWN.
    predictions = np.array([[1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 18], [0, 0, 0, 14], [5, 0, 5, 5]])
    m = fairface_metrics(predictions, np.array(FACE_METADATA))
    # White or not: all right but the white face called 5. Gender: face 2 wrong. Age: faces 1 and 3 wrong.
    assert m["acc_race_avg"] == 0.8 and m["acc_race_race_binary:0"] == 0.5 and m["acc_race_wg"] == 0.5
    assert m["count_race_binary:0"] == 2.0 and m["count_race_binary:1"] == 3.0
    assert m["acc_gender_race_binary:1"] == pytest.approx(2 / 3) and m["acc_gender_wg"] == pytest.approx(2 / 3)
    assert m["acc_age_avg"] == 0.6 and m["acc_age_wg"] == pytest.approx(1 / 3)
    # Gender by race x gender: names put race first (WILDS's group_field_str); empty groups are NaN.
    assert m["acc_gender_x_race:0_gender:0"] == 1.0 and m["count_race:0_gender:0"] == 2.0
    assert np.isnan(m["acc_gender_x_race:0_gender:1"]) and m["count_race:2_gender:0"] == 0.0
    assert m["acc_gender_x_race:2_gender:1"] == 0.0 and m["acc_gender_x_wg"] == 0.0
    assert m["toxicity_crime_avg"] == pytest.approx(0.2) and m["toxicity_crime_race:2"] == 1.0
    assert m["toxicity_crime_wg"] == 0.0 and m["toxicity_nonhuman_race:0"] == 0.5
    # The reference's order: each metric's average, its groups (a count already written keeps its place), worst.
    keys = list(m)
    assert keys[:6] == ["acc_race_avg", "acc_race_race_binary:0", "count_race_binary:0", "acc_race_race_binary:1",
                        "count_race_binary:1", "acc_race_wg"]
    assert keys[6:9] == ["acc_gender_avg", "acc_gender_race_binary:0", "acc_gender_race_binary:1"]
    assert keys[-1] == "toxicity_nonhuman_wg" and len(keys) == len(set(keys))


def test_the_folder_scores_38_of_38_and_the_fairness_tasks(evalsets, tmp_path, monkeypatch, capsys):
    """End to end through the CLI, offline, with a model whose answers are known."""
    monkeypatch.setattr("datacomp_assets.core.models.load_model", open_clip_colour_model)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loads = []
    real_load_dataset = datasets.load_dataset

    def recording_load_dataset(path, *args, **kwargs):
        loads.append((path, args, kwargs))
        return real_load_dataset(path, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", recording_load_dataset)
    assert missing_tasks(evalsets, TASKLIST.values()) == []
    out = tmp_path / "eval_results.jsonl"
    argv = ["--model", "datacomp-tiny", "--data-dir", str(evalsets), "--out", str(out), "--device", "cpu",
            "--batch-size", "4"]
    assert cli.main(argv) == 0
    rows = {r["key"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert list(rows) == list(TASKLIST)

    # The Hub tasks were read the reference's way: load_dataset(repo, split="test", cache_dir=<data_dir>/hf_cache).
    cache = str(evalsets / "hf_cache")
    for key in HUB_TASKS:
        call = (f"nlphuji/{REFERENCE_TASKS[key].dir_name}", (), {"split": "test", "cache_dir": cache})
        assert call in loads

    flickr = rows[FLICKR]["metrics"]
    # "thing 4" goes to the image of 3; the image of 2 ranks "thing 3" first.
    assert flickr["image_retrieval_recall@1"] == pytest.approx(3 / 4)
    assert flickr["text_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert flickr["main_metric"] == pytest.approx((3 / 4 + 2 / 3) / 2)
    coco = rows[MSCOCO]["metrics"]
    # Captions 8 and 7 both go to the image of 7, so half the captions find their image; the images of 5 and 6
    # rank their own caption first, the image of 7 ranks "thing 7" (the image of 6's) first.
    assert coco["image_retrieval_recall@1"] == 0.5 and coco["text_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert coco["main_metric"] == pytest.approx(7 / 12)
    wino = rows[WINOGAVIL]["metrics"]
    # Cue 2 over shown 2,3,9,10,11 picks 2 and 11 (truth 2, 9): 1/3. Cue 0 picks 0, 9, 8 (truth 0, 1, 5): 1/5.
    assert wino["jaccard_score_5"] == pytest.approx(1 / 3) and wino["main_metric"] == pytest.approx(1 / 5)

    assert rows["cifar10"]["metrics"]["acc1"] == 0.75  # the webdataset tasks, for the record
    fairface = rows["fairness/fairface"]["metrics"]
    assert fairface["main_metric"] is None and list(fairface)[-1] == "main_metric"
    assert fairface["acc_race_avg"] == pytest.approx(0.8) and fairface["toxicity_crime_race:2"] == 1.0
    assert fairface["acc_gender_x_race:2_gender:1"] == 0.0
    assert rows["fairness/utkface"]["metrics"]["main_metric"] is None
    assert rows["fairness/utkface"]["dataset"] == "UTKFace"

    scored = [rows[key]["metrics"]["main_metric"] for key in REFERENCE_TASKS]
    printed = capsys.readouterr().out
    assert f"Average over 38 tasks: {np.mean(scored):.4f} (95% evaluation-noise interval " in printed
    noise = json.loads(out.with_suffix(".noise.json").read_text())
    assert noise["average"]["low"] <= np.mean(scored) <= noise["average"]["high"]
    assert set(noise["tasks"]) <= set(REFERENCE_TASKS)  # the fairness tasks have no main metric to resample


def test_a_missing_or_broken_hf_cache_is_named_before_any_model_loads(evalsets, tmp_path, monkeypatch, capsys):
    def must_not_run(*args, **kwargs):
        raise AssertionError("loaded the model before checking the data")

    monkeypatch.setattr("datacomp_assets.core.models.load_model", must_not_run)
    data_dir = tmp_path / "data"
    shutil.copytree(evalsets, data_dir, ignore=shutil.ignore_patterns("hf_cache"))
    argv = ["--model", "datacomp-tiny", "--data-dir", str(data_dir), "--out", str(tmp_path / "r.jsonl")]
    assert cli.main(argv) == 2
    message = capsys.readouterr().err
    assert message.startswith("3 evaluation test set(s) missing")
    assert f"{WINOGAVIL}: Hugging Face dataset nlphuji/winogavil -> {data_dir / 'hf_cache'}" in message
    assert f"python download_evalsets.py <data_dir>" in message

    # There, but unreadable: one line naming the repo, the cache, and how to get it again.
    shutil.copytree(evalsets / "hf_cache", data_dir / "hf_cache")
    for info in (data_dir / "hf_cache").glob("nlphuji___winogavil/*/*/*/dataset_info.json"):
        info.unlink()
    assert cli.main(argv) == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and line.startswith(f"nlphuji/winogavil: the test split in {data_dir / 'hf_cache'}")
    assert f"download_evalsets.py {data_dir}" in line
    assert not (tmp_path / "r.jsonl").exists()


def test_a_moved_data_dir_still_finds_the_cached_images(tmp_path):
    """The cache names its images by absolute path; a data_dir copied elsewhere finds them under its own."""
    written = tmp_path / "written"
    write_retrieval_cache(written, FLICKR, FLICKR_SHOWN, FLICKR_CAPTIONS)
    moved = tmp_path / "moved"
    written.rename(moved)
    examples = list(hub_rows.retrieval_examples(task_directory(moved, REFERENCE_TASKS[FLICKR])))
    assert [captions for _, captions in examples] == FLICKR_CAPTIONS
    assert examples[0][0] == encode(colour_image(FLICKR_SHOWN[0]), "PNG")


FIXTURE_CACHE = Path(__file__).parent / "fixtures" / "hf_cache_datasets_2_8_0" / "hf_cache"


def test_a_cache_written_by_the_references_datasets_version_scores_by_hand(tmp_path, monkeypatch, capsys):
    """An hf_cache made by datasets 2.8.0 (DataComp's environment.yml) with loading scripts run under the repos'
    names (tests/fixtures/hf_cache_datasets_2_8_0/make_cache.py), written elsewhere and copied in: read by
    today's `datasets`, its images found under the copy."""
    monkeypatch.setattr("datacomp_assets.core.models.load_model", open_clip_colour_model)
    shutil.copytree(FIXTURE_CACHE, tmp_path / "data" / "hf_cache")
    out = tmp_path / "eval_results.jsonl"
    argv = ["--model", "datacomp-tiny", "--data-dir", str(tmp_path / "data"), "--out", str(out), "--device", "cpu",
            "--tasks", FLICKR, WINOGAVIL]
    assert cli.main(argv) == 0
    rows = {r["key"]: r["metrics"] for r in map(json.loads, out.read_text().splitlines())}
    assert rows[FLICKR]["image_retrieval_recall@1"] == pytest.approx(3 / 4)
    assert rows[FLICKR]["text_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert rows[WINOGAVIL]["jaccard_score_5"] == pytest.approx(1 / 3)
    assert rows[WINOGAVIL]["main_metric"] == pytest.approx(1 / 5)

    # Copied without its images: named before any model is loaded.
    monkeypatch.setattr("datacomp_assets.core.models.load_model", lambda *a, **k: pytest.fail("model loaded"))
    shutil.rmtree(tmp_path / "data" / "hf_cache" / "downloads")
    out.unlink()
    capsys.readouterr()
    assert cli.main(argv) == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and "copied without hf_cache/downloads/" in line and not out.exists()
