"""DataComp's 38 scored evaluation tasks, as data (the benchmark's facts; the evaluation stage reads the test sets).

Copied from the reference harness (github.com/mlfoundations/datacomp): keys, names and main metrics from
`tasklist.yml`, groups from `aggregate_scores.py` (ImageNet, ImageNet distribution shifts, VTAB, Retrieval; the
rest count only in the average) and the tasks' tags (`wilds`, `fairness`), Hugging Face repos and local folder
names from `eval_utils/wds_eval.py` and `download_evalsets.py`. FairFace and UTKFace are in `tasklist.yml` too,
and the reference evaluates them (eval_utils/fairness_eval.py), but they have no main metric and so are not
among the 38 that are averaged: they are in UNAVERAGED_TASKS, and TASKLIST holds all 40.
"""

from __future__ import annotations

from dataclasses import dataclass

IMAGENET = "ImageNet"
SHIFTS = "ImageNet distribution shifts"
VTAB = "VTAB"
RETRIEVAL = "Retrieval"
WILDS = "WILDS"
FAIRNESS = "fairness"
OTHER = "other"
# The groups the reference reports beside the average (aggregate_scores.py), in its order.
REPORTED_GROUPS = (IMAGENET, SHIFTS, VTAB, RETRIEVAL)

MPCR = "mean_per_class_recall"


@dataclass(frozen=True)
class ReferenceTask:
    """One task. `kind` is "classification", "retrieval", "winogavil" or "fairface" (FairFace's and UTKFace's
    race, gender, age and toxicity objectives, fairness_eval.evaluate_fairface_dataset)."""

    key: str          # tasklist.yml key; also the "key" of a results line
    name: str         # tasklist.yml name; the "dataset" of a results line
    group: str
    main_metric: str | None = "acc1"  # None: the line's main_metric is null (FairFace, UTKFace)
    kind: str = "classification"
    size: int = 0     # test-set size in tasklist.yml (images; WinoGAViL: instances)

    @property
    def webdataset(self) -> bool:
        """True when the test set is a djghosh/wds_*_test webdataset (else one of the nlphuji `datasets` repos)."""
        return self.kind in ("classification", "fairface")

    @property
    def hf_repo(self) -> str:
        """The Hugging Face dataset repo DataComp reads the test set from."""
        if self.webdataset:
            # wds_eval.create_webdataset and download_evalsets.py; fairness tasks drop their prefix.
            return f"djghosh/wds_{self.key.removeprefix('fairness/').replace('/', '-')}_test"
        return f"nlphuji/{self.key.split('/', 1)[1]}"

    @property
    def dir_name(self) -> str:
        """The task's folder under the data directory: the repo's name, as DataComp's downloader names it."""
        return self.hf_repo.split("/", 1)[1]


def _task(key, name, group, main_metric="acc1", kind="classification", size=0) -> ReferenceTask:
    return ReferenceTask(key, name, group, main_metric, kind, size)


# In tasklist.yml's order, which is the order DataComp evaluates and writes them in.
REFERENCE_TASKS: dict[str, ReferenceTask] = {t.key: t for t in [
    _task("vtab/caltech101", "Caltech-101", VTAB, MPCR, size=6085),
    _task("cifar10", "CIFAR-10", OTHER, size=10000),
    _task("vtab/cifar100", "CIFAR-100", VTAB, size=10000),
    _task("vtab/clevr_count_all", "CLEVR Counts", VTAB, size=15000),
    _task("vtab/clevr_closest_object_distance", "CLEVR Distance", VTAB, size=15000),
    _task("country211", "Country211", OTHER, size=21100),
    _task("vtab/dtd", "Describable Textures", VTAB, size=1880),
    _task("vtab/eurosat", "EuroSAT", VTAB, size=5400),
    _task("fgvc_aircraft", "FGVC Aircraft", OTHER, MPCR, size=3333),
    _task("food101", "Food-101", OTHER, size=25250),
    _task("gtsrb", "GTSRB", OTHER, size=12630),
    _task("imagenet1k", "ImageNet 1k", IMAGENET, size=50000),
    _task("imagenet_sketch", "ImageNet Sketch", SHIFTS, size=50889),
    _task("imagenetv2", "ImageNet v2", SHIFTS, size=10000),
    _task("imagenet-a", "ImageNet-A", SHIFTS, size=7500),
    _task("imagenet-o", "ImageNet-O", SHIFTS, size=2000),
    _task("imagenet-r", "ImageNet-R", SHIFTS, size=30000),
    _task("vtab/kitti_closest_vehicle_distance", "KITTI Vehicle Distance", VTAB, size=711),
    _task("mnist", "MNIST", OTHER, size=10000),
    _task("objectnet", "ObjectNet", SHIFTS, size=18574),
    _task("vtab/flowers", "Oxford Flowers-102", VTAB, MPCR, size=6149),
    _task("vtab/pets", "Oxford-IIIT Pet", VTAB, MPCR, size=3669),
    _task("voc2007", "Pascal VOC 2007", OTHER, size=14976),
    _task("vtab/pcam", "PatchCamelyon", VTAB, size=32768),
    _task("renderedsst2", "Rendered SST2", OTHER, size=1821),
    _task("vtab/resisc45", "RESISC45", VTAB, size=6300),
    _task("cars", "Stanford Cars", OTHER, size=8041),
    _task("stl10", "STL-10", OTHER, size=8000),
    _task("sun397", "SUN397", VTAB, size=108754),
    _task("vtab/svhn", "SVHN", VTAB, size=26032),
    _task("retrieval/flickr_1k_test_image_text_retrieval", "Flickr", RETRIEVAL, "mean_recall@1", "retrieval",
          size=1000),
    _task("retrieval/mscoco_2014_5k_test_image_text_retrieval", "MSCOCO", RETRIEVAL, "mean_recall@1", "retrieval",
          size=5000),
    _task("misc/winogavil", "WinoGAViL", RETRIEVAL, "jaccard_score_10-12", "winogavil", size=3563),
    _task("wilds/iwildcam", "iWildCam", WILDS, "F1-macro_all", size=42791),
    _task("wilds/camelyon17", "Camelyon17", WILDS, size=85054),
    _task("wilds/fmow", "FMoW", WILDS, "acc_worst_region", size=22108),
    _task("fairness/dollar_street", "Dollar Street", FAIRNESS, "acc_top5_wg", size=3503),
    _task("fairness/geode", "GeoDE", FAIRNESS, "acc_wg", size=12488),
]}

# In tasklist.yml after the 38, evaluated by the reference but with no main metric: outside every average.
UNAVERAGED_TASKS: dict[str, ReferenceTask] = {t.key: t for t in [
    _task("fairness/fairface", "FairFace", FAIRNESS, None, "fairface", size=10954),
    _task("fairness/utkface", "UTKFace", FAIRNESS, None, "fairface", size=23703),
]}

# Every task of tasklist.yml, in its order: what the reference's evaluate.py evaluates and writes a line for.
TASKLIST: dict[str, ReferenceTask] = {**REFERENCE_TASKS, **UNAVERAGED_TASKS}
