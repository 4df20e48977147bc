"""Labels: AU presence (AU columns, EMFACS prototypes), streamed AUCs, labels CSV joining."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from interp_fer.accumulators import LabelResponses, channel_edges
from interp_fer.data import DatasetError, Record, open_dataset
from interp_fer.labels import EMFACS_PROTOTYPES, au_presence, prototype_name
from interp_fer.statistics import histogram_auc


def _auc(positive, negative):
    u = stats.mannwhitneyu(positive, negative).statistic
    return u / (len(positive) * len(negative))


def test_presence_from_expressions_and_au_columns():
    aus = [1, 6, 12, 25]
    records = [
        Record("a", label=3, label_name="happy"),
        Record("b", label_name="Sadness"),  # alias, any case
        Record("c", label_name="neutral"),
        Record("d", label_name="bored"),  # no prototype: unknown
        Record("e", aus={12: 2.0, 25: 0.0}),  # intensities; AU1/AU6 have no column
    ]
    presence = au_presence(records, aus)
    np.testing.assert_array_equal(presence[0], [0, 1, 1, 0])
    np.testing.assert_array_equal(presence[1], [1, 0, 0, 0])
    np.testing.assert_array_equal(presence[2], [0, 0, 0, 0])
    assert np.isnan(presence[3]).all()
    np.testing.assert_array_equal(presence[4, 2:], [1, 0])
    assert np.isnan(presence[4, :2]).all()
    assert prototype_name("angry") == "anger"
    assert set(EMFACS_PROTOTYPES["fear"]) == {1, 2, 4, 5, 7, 20, 26}


def test_histogram_auc_is_mann_whitney():
    rng = np.random.default_rng(0)
    positive = rng.integers(0, 50, 300)
    negative = rng.integers(0, 50, 500) - 5  # ties on purpose
    edges = np.arange(-6, 52) - 0.5  # one value per bin: exact
    pos = np.histogram(positive, edges)[0]
    neg = np.histogram(negative, edges)[0]
    assert histogram_auc(pos, neg) == pytest.approx(_auc(positive, negative), abs=1e-12)
    assert np.isnan(histogram_auc(pos, np.zeros_like(neg)))


def test_label_responses_streamed_match_exact_aucs():
    rng = np.random.default_rng(1)
    n, k = 900, 3
    present = rng.random((n, 2)) < [0.3, 0.6]
    classes = rng.integers(-1, 4, n)  # -1: unlabelled
    # channel 0 follows AU 0, channel 1 follows class 2, channel 2 is noise
    peaks = rng.normal(size=(n, k))
    peaks[:, 0] += 1.5 * present[:, 0]
    peaks[:, 1] += 1.0 * (classes == 2)
    presence = present.astype(float)
    presence[::10, 1] = np.nan  # unknown for some images
    edges = channel_edges(peaks[:100], 512)
    responses = LabelResponses(edges, n_aus=2, n_classes=4)
    for start in range(0, n, 128):
        part = slice(start, start + 128)
        responses.update(peaks[part], presence[part], classes[part])
    auc = responses.au_auc()
    for c in range(k):
        for a in range(2):
            known = np.isfinite(presence[:, a])
            want = _auc(peaks[known & (presence[:, a] == 1), c],
                        peaks[known & (presence[:, a] == 0), c])
            assert auc[c, a] == pytest.approx(want, abs=0.005)
    assert auc[0, 0] > 0.8 and abs(auc[2, 0] - 0.5) < 0.1
    expression = responses.expression_auc()
    labelled = classes >= 0
    want = _auc(peaks[classes == 2, 1], peaks[labelled & (classes != 2), 1])
    assert expression[1, 2] == pytest.approx(want, abs=0.005)
    assert expression[1, 2] > 0.7


def test_labels_csv_joins_by_path_then_name(tmp_path):
    from PIL import Image

    images = tmp_path / "faces"
    images.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(images / name)
    (tmp_path / "labels.csv").write_text(
        "path,label_name,AU12\nfaces/a.png,happy,1\nelsewhere/b.png,sad,0\n")
    dataset = open_dataset(images).with_labels(tmp_path / "labels.csv")
    by_name = {r.path.name: r for r in dataset.records}
    assert by_name["a.png"].label_name == "happy" and by_name["a.png"].aus == {12: 1.0}
    assert by_name["b.png"].label_name == "sad"  # by file name
    assert by_name["c.png"].label_name is None
    (tmp_path / "other.csv").write_text("path,label_name\nx.png,happy\n")
    with pytest.raises(DatasetError, match="none of its paths"):
        open_dataset(images).with_labels(tmp_path / "other.csv")


def test_map_scores_labels_on_fer2013(fer2013, mini_xception):
    from interp_fer.controls import no_preference_model
    from interp_fer.data import ImageDataset
    from interp_fer.layer_mapping import MappingOptions
    from interp_fer.mapping import map_dataset

    full = open_dataset(fer2013 / "test_labels.csv", class_names=mini_xception.class_names)
    # The CSV is sorted by expression: take every 36th face to have all seven.
    dataset = ImageDataset(full.records[::36], full.class_names, full.source)
    options = MappingOptions(n_boot=4, n_null=4)
    result = map_dataset(mini_xception, dataset, ["block2"], locate="rf-center",
                         options=options, progress=False)
    # AUs of no FER2013 prototype (AU10, AU14 (contempt only), AU17, AU25) are never
    # present: their AUC is undefined.
    shown = set().union(*(EMFACS_PROTOTYPES[prototype_name(c)] for c in full.class_names))
    in_prototypes = result.scores["au"].isin(shown)
    assert result.scores.loc[in_prototypes, "label_auc"].between(0, 1).all()
    assert result.scores.loc[~in_prototypes, "label_auc"].isna().all()
    assert "label_auc" in result.mapping
    expressions = result.expressions
    assert set(expressions["expression"]) == set(mini_xception.class_names)
    assert len(expressions) == 32 * 7 and expressions["auc"].between(0, 1).all()
    assert result.run["labels"]["from_expressions"] == result.run["data"]["n_mapped"]
    # The trained network's channels tell expressions apart; a channel of random hashes
    # does not.
    assert (expressions["auc"] - 0.5).abs().max() > 0.2
    noise = map_dataset(no_preference_model(mini_xception), dataset, ["detector"],
                        locate="rf-center", options=options, progress=False)
    assert (noise.expressions["auc"] - 0.5).abs().mean() < 0.06


def test_label_name_only_csv_gets_class_indices(tmp_path):
    # Without label_index the class index comes from the model's class names, aliases and
    # case ignored (issue 11: such a CSV used to give NaN expression AUCs: every face -1).
    from PIL import Image

    for name in ("a.png", "b.png", "c.png", "d.png"):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / name)
    (tmp_path / "labels.csv").write_text(
        "path,label_name\na.png,Happiness\nb.png,ANGER\nc.png,surprised\nd.png,contempt\n")
    classes = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
    dataset = open_dataset(tmp_path / "labels.csv", class_names=classes)
    assert [(r.label, r.label_name) for r in dataset.records] == [
        (3, "happy"), (0, "angry"), (5, "surprise"), (None, "contempt")]
    assert dataset.rejected == []
    # contempt is no class of the model, yet its EMFACS prototype still gives AU presence
    np.testing.assert_array_equal(au_presence(dataset.records[3:], [12, 14]), [[1, 1]])
    # Opened without the model's names, the names found are the classes, sorted.
    alone = open_dataset(tmp_path / "labels.csv")
    assert alone.class_names == ("ANGER", "contempt", "Happiness", "surprised")
    assert [r.label for r in alone.records] == [2, 0, 3, 1]


def test_label_name_only_fer2013_matches_the_indices(fer2013, tmp_path):
    import pandas as pd

    from interp_fer.zoo import FER2013_CLASSES

    table = pd.read_csv(fer2013 / "test_labels.csv")
    table["path"] = [str(fer2013 / p) for p in table["path"]]
    table.drop(columns="label_index").to_csv(tmp_path / "names.csv", index=False)
    by_name = open_dataset(tmp_path / "names.csv", class_names=FER2013_CLASSES)
    by_index = open_dataset(fer2013 / "test_labels.csv", class_names=FER2013_CLASSES)
    assert [r.label for r in by_name.records] == [r.label for r in by_index.records]
    assert None not in {r.label for r in by_name.records}
