"""Dataset layouts, image modes and unreadable files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from interp_fer.data import (
    DatasetError,
    fer2013_pixels,
    open_dataset,
    read_image,
    stratified_counts,
)


def _save(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


def test_image_modes(tmp_path):
    gray = np.arange(48 * 48, dtype=np.uint32).reshape(48, 48) % 256
    rgb = np.dstack([gray, 255 - gray, np.zeros_like(gray)]).astype(np.uint8)
    rgba = np.dstack([rgb, np.full((48, 48), 7, np.uint8)])
    wide = (gray.astype(np.uint16) * 257)
    assert read_image(_save(tmp_path / "g.png", gray.astype(np.uint8))).shape == (48, 48)
    assert read_image(_save(tmp_path / "c.png", rgb)).shape == (48, 48, 3)
    np.testing.assert_array_equal(read_image(_save(tmp_path / "a.png", rgba)), rgb)
    sixteen = read_image(_save(tmp_path / "w.png", wide))
    assert sixteen.dtype == np.uint8
    np.testing.assert_array_equal(sixteen, gray.astype(np.uint8))  # 257*v/65535*255 == v


def test_class_folders_follow_model_class_order(tmp_path):
    for name in ("happy", "angry"):
        _save(tmp_path / name / "1.png", np.zeros((8, 8), np.uint8))
    classes = ("angry", "disgust", "fear", "happy")
    dataset = open_dataset(tmp_path, class_names=classes)
    labels = {r.path.parent.name: r.label for r in dataset.records}
    assert labels == {"angry": 0, "happy": 3}
    # a folder of a class the model lacks is kept by name, without an index
    partial = open_dataset(tmp_path, class_names=("angry", "sad"))
    named = {r.path.parent.name: (r.label, r.label_name) for r in partial.records}
    assert named == {"angry": (0, "angry"), "happy": (None, "happy")}
    with pytest.raises(DatasetError, match=r"are not among the classes"):
        open_dataset(tmp_path, class_names=("sad", "fear"))


def test_flat_folder_has_no_labels(tmp_path):
    _save(tmp_path / "a.png", np.zeros((8, 8), np.uint8))
    _save(tmp_path / "b.jpg", np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "notes.txt").write_text("ignored")
    dataset = open_dataset(tmp_path)
    assert len(dataset) == 2 and not dataset.labelled


def test_fer2013_csv(tmp_path):
    pixels = " ".join(str(v % 256) for v in range(48 * 48))
    csv = tmp_path / "fer2013.csv"
    csv.write_text(f"emotion,pixels,Usage\n3,{pixels},PublicTest\n5,1 2 3,PrivateTest\n")
    dataset = open_dataset(csv)
    samples = list(dataset)
    assert samples[0].image.shape == (48, 48) and samples[0].record.label_name == "happy"
    assert samples[0].record.usage == "PublicTest"
    assert samples[1].image is None and "square" in samples[1].error
    assert dataset.skipped == [(f"{csv}:3", samples[1].error)]


def test_labels_csv_with_au_columns(tmp_path):
    _save(tmp_path / "img" / "a.png", np.zeros((8, 8), np.uint8))
    _save(tmp_path / "img" / "b.png", np.zeros((8, 8), np.uint8))
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label_index,label_name,usage,AU01,AU_12,au25\n"
                   "img/a.png,3,happy,train,0,1,1\nimg/b.png,0,angry,test,1,0,\n")
    dataset = open_dataset(csv)
    assert dataset.au_numbers == [1, 12, 25]
    assert dataset.records[0].aus == {1: 0.0, 12: 1.0, 25: 1.0}
    assert dataset.records[1].aus == {1: 1.0, 12: 0.0}
    assert dataset.class_names == ("angry", "1", "2", "happy")
    assert dataset.subset(usage="test").records[0].label_name == "angry"


def test_unreadable_files_are_named_counted_and_skipped(tmp_path):
    _save(tmp_path / "good.png", np.zeros((8, 8), np.uint8))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    dataset = open_dataset(tmp_path)
    batches = list(dataset.batches(batch_size=8))
    assert [s.key for s in batches[0]] == [str(tmp_path / "good.png")]
    assert len(dataset.skipped) == 1
    key, reason = dataset.skipped[0]
    assert key.endswith("broken.png") and reason


def test_layout_errors(tmp_path):
    with pytest.raises(DatasetError, match="no such file"):
        open_dataset(tmp_path / "missing")
    with pytest.raises(DatasetError, match="no images"):
        open_dataset(tmp_path)
    bad = tmp_path / "x.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(DatasetError, match="unknown CSV layout"):
        open_dataset(bad)


def test_fer2013_pixels_range():
    with pytest.raises(ValueError, match="outside 0-255"):
        fer2013_pixels("300 " * 4)


@pytest.mark.fer2013
def test_real_fer2013_labels_csv(fer2013):
    dataset = open_dataset(fer2013 / "test_labels.csv")
    assert len(dataset) == 7178
    first = next(iter(dataset))
    assert first.image.shape == (48, 48) and first.image.dtype == np.uint8


def test_crop_geometry_round_trip():
    from interp_fer.preprocessing import Crop, Preprocessor

    image = np.zeros((100, 80), np.uint8)
    image[30, 50] = 255  # a bright pixel at (x=50, y=30)
    crop = Crop.around((40, 20, 60, 40), margin=0.5)  # 20 px box -> 40 px square
    assert (crop.top, crop.left, crop.height, crop.width) == (10, 30, 40, 40)
    patch = crop.apply(image)
    assert patch.shape == (40, 40) and patch[20, 20] == 255
    # Resized 40 -> 20: the pixel's centre lands at (20 + 0.5) * 0.5 - 0.5 = 9.75.
    np.testing.assert_allclose(crop.to_input(np.array([50.0, 30.0]), (20, 20)), [9.75, 9.75])
    batch = Preprocessor((20, 20)).resize(
        Preprocessor((20, 20)).image_tensor(np.kron(np.eye(2), np.ones((20, 20))) * 255))
    assert batch.shape == (1, 20, 20)
    edge = Crop(-5, -5, 10, 10).apply(np.arange(100).reshape(10, 10))
    assert edge[0, 0] == 0 and edge[9, 9] == 44


def test_stratified_counts_share_the_total_by_class_size():
    labels = [0] * 50 + [1] * 30 + [2] * 20
    assert stratified_counts(labels, 10) == {0: 5, 1: 3, 2: 2}
    # 7 x (0.5, 0.3, 0.2) = 3.5, 2.1, 1.4: remainders .5 > .4 > .1 give the seventh to class 0
    assert stratified_counts(labels, 7) == {0: 4, 1: 2, 2: 1}
    assert stratified_counts(labels, 500) == {0: 50, 1: 30, 2: 20}
    assert sum(stratified_counts([3, 3, 1], 2).values()) == 2


def test_stratified_subset_of_a_file_sorted_by_class(tmp_path):
    # Sorted by expression, like FER2013's test split: the first N rows are all one class.
    rows = [(label, usage) for label in (0, 3, 6) for usage in ("A",) * 6 + ("B",) * 4]
    csv = tmp_path / "fer2013.csv"
    csv.write_text("emotion,pixels,Usage\n" + "".join(
        f"{label},{' '.join(['7'] * 48 * 48)},{usage}\n" for label, usage in rows))
    dataset = open_dataset(csv)
    assert {r.label for r in dataset.subset(limit=6).records} == {0}
    kept = dataset.subset(limit=6, stratify=True).records
    assert [r.label for r in kept] == [0, 0, 3, 3, 6, 6]  # file order kept
    # Each (usage, class) keeps its share: 6 of 30 rows = 1.2 A and 0.8 B per class, rounded
    # to one of each; the first rows of each group (A on rows 2.., B on rows 8..).
    assert [r.usage for r in kept] == ["A", "B"] * 3
    assert [r.key for r in kept][:2] == [f"{csv}:2", f"{csv}:8"]
    assert [r.label for r in dataset.subset("B", 3, stratify=True).records] == [0, 3, 6]
    with pytest.raises(ValueError, match="needs a limit"):
        dataset.subset(stratify=True)


def test_stratified_subset_needs_labels(tmp_path):
    _save(tmp_path / "a.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="no expression label"):
        open_dataset(tmp_path).subset(limit=1, stratify=True)


def test_stratified_subset_of_the_real_fer2013_keeps_usage_and_expression(fer2013):
    # test_labels.csv lists, per class, every PrivateTest row before the PublicTest ones:
    # a subset stratified by expression alone took PrivateTest rows only.
    dataset = open_dataset(fer2013 / "test_labels.csv")
    kept = dataset.subset(limit=700, stratify=True).records
    assert len(kept) == 700

    def shares(records):
        counts = {}
        for r in records:
            counts[(r.usage, r.label)] = counts.get((r.usage, r.label), 0) + 1
        return counts

    full, part = shares(dataset.records), shares(kept)
    assert set(part) == set(full)  # every (usage, expression) group is there
    for group, size in full.items():
        assert abs(part[group] - 700 * size / len(dataset)) < 1, group
    usages = [r.usage for r in kept]
    # half each, up to the rounding of the 7 groups of a split (< 1 each)
    assert abs(usages.count("PublicTest") - 350) < 7


def test_batches_report_progress_per_image(tmp_path):
    # evaluate's bar moves per image read, not per batch (issue 15: it sat at 0/150).
    for i in range(5):
        _save(tmp_path / f"{i}.png", np.full((8, 8), i, np.uint8))
    (tmp_path / "5.png").write_bytes(b"")  # unreadable: counted too
    dataset = open_dataset(tmp_path)
    seen = []
    sizes = [(len(seen), len(batch)) for batch in dataset.batches(4, progress=seen.append)]
    assert seen == [1] * 6
    assert sizes == [(4, 4), (6, 1)]  # 4 images read before the first batch of 4
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        next(dataset.batches(0))


def test_class_folders_named_by_alias(tmp_path):
    # datasets as they come (issue 12): anger/happiness/surprised are the model's classes,
    # contempt (absent from a 7-class model) is kept by name, without an index
    from interp_fer.zoo import FER2013_CLASSES

    for name in ("anger", "happiness", "surprised", "Sadness", "contempt"):
        _save(tmp_path / name / "1.png", np.zeros((8, 8), np.uint8))
    dataset = open_dataset(tmp_path, class_names=FER2013_CLASSES)
    got = {r.path.parent.name: (r.label, r.label_name) for r in dataset.records}
    index = {name: i for i, name in enumerate(FER2013_CLASSES)}
    assert got == {"anger": (index["angry"], "angry"), "happiness": (index["happy"], "happy"),
                   "surprised": (index["surprise"], "surprise"),
                   "Sadness": (index["sad"], "sad"), "contempt": (None, "contempt")}


def test_stratified_subset_keeps_a_class_the_model_lacks(tmp_path):
    # contempt has a name but no index for a 7-class model: its own share, not "unlabelled"
    from interp_fer.zoo import FER2013_CLASSES

    for name, n in (("happiness", 4), ("contempt", 4)):
        for i in range(n):
            _save(tmp_path / name / f"{i}.png", np.full((8, 8), i, np.uint8))
    kept = open_dataset(tmp_path, class_names=FER2013_CLASSES).subset(limit=4, stratify=True)
    assert sorted(r.label_name for r in kept.records) == ["contempt"] * 2 + ["happy"] * 2
