"""Paper figures (interp_fer.figures) on real inputs: the mini-Xception zoo model and the
sample faces.

Structure is checked everywhere (axes, titles, labels, colour limits, marks), PDF and PNG
export for every figure, and pixels against stored baselines where the output does not depend
on the mapping statistics (which change whenever the statistics do): the confusion matrix,
the AU regions on a face, one face's projections and the attribution comparison. The mapping
run of the fixtures uses a detector seed whose report half holds 4 of the 7 sample faces, so
both halves have values (3 images at least).

Baselines are PNGs in ``tests/baselines/``, rendered at :data:`BASELINE_DPI` with the
toolkit's fixed font (DejaVu Sans, shipped with matplotlib) and compared by RMS pixel
difference (0-255 scale) against :data:`TOLERANCE`. A missing baseline fails the test. To
write (or rewrite) them, review the result and commit it::

    INTERP_FER_UPDATE_BASELINES=1 pytest tests/test_figures.py
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.testing.compare import compare_images

from interp_fer import figures as F
from interp_fer.detectors import DetectorOptions, rank_effect
from interp_fer.evaluation import evaluate
from interp_fer.layer_mapping import MappingOptions
from interp_fer.layers import layer_outputs
from interp_fer.mapping import map_dataset
from interp_fer.samples import sample_face

BASELINES = Path(__file__).resolve().parent / "baselines"
BASELINE_DPI = 72
TOLERANCE = 1.5  # RMS pixel difference, 0-255: glyph rasterisation noise, not a moved mark
UPDATE = os.environ.get("INTERP_FER_UPDATE_BASELINES") == "1"
LAYERS = ["conv2", "block2"]


def render_like_baseline(figure: Figure, path: Path) -> Path:
    """PNG of ``figure`` at the baselines' resolution and font settings."""
    with matplotlib.rc_context({**F.STYLE, "text.hinting": "default"}):
        figure.savefig(path, dpi=BASELINE_DPI, metadata={"Software": None})
    return path


def baseline(name: str) -> Path:
    expected = BASELINES / f"{name}.png"
    if not expected.is_file():
        pytest.fail(f"baseline {expected} is missing; write it with "
                    "INTERP_FER_UPDATE_BASELINES=1 pytest tests/test_figures.py")
    return expected


def assert_matches_baseline(figure: Figure, name: str, tmp_path: Path) -> None:
    """Compare ``figure`` with its baseline; write the baseline instead when asked to."""
    actual = render_like_baseline(figure, tmp_path / f"{name}.png")
    if UPDATE:
        BASELINES.mkdir(exist_ok=True)
        shutil.copyfile(actual, BASELINES / f"{name}.png")
        pytest.skip(f"wrote baseline {BASELINES / name}.png: review it before committing")
    difference = compare_images(str(baseline(name)), str(actual), tol=TOLERANCE)
    assert difference is None, difference


@pytest.fixture(scope="module")
def result(mini_xception, sample_faces):
    # Detector seed 8 puts 4 of the 7 faces in the report half (seed 0: 2, too few for any
    # value); 200 permutations keep the test fast.
    return map_dataset(mini_xception, sample_faces, LAYERS, locate="rf-center",
                       options=MappingOptions(n_boot=8, n_null=4),
                       detector=DetectorOptions(seed=8, n_perm=200, n_boot=20), progress=False)


def with_mapped(result, count: int = 3):
    """``result`` with its ``count`` channels of largest AUC detecting their candidate AU.

    Which channels pass the detector test on seven faces is not the subject here (none can);
    forcing a few exercises the figures' "detector" branch deterministically.
    """
    mapping = result.mapping.copy()
    chosen = mapping.sort_values("auc", ascending=False, kind="stable").index[:count]
    mapping.loc[chosen, "au"] = mapping.loc[chosen, "candidate_au"]
    return dataclasses.replace(result, mapping=mapping)


def without_mapped(result):
    mapping = result.mapping.assign(au=pd.array([pd.NA] * len(result.mapping), dtype="Int64"))
    return dataclasses.replace(result, mapping=mapping)


@pytest.fixture(scope="module")
def mapped(result):
    return with_mapped(result)


@pytest.fixture(scope="module")
def happy_input(mini_xception):
    return mini_xception.preprocess([sample_face("happy")])


@pytest.fixture(scope="module")
def evaluation(mini_xception, sample_faces):
    return evaluate(mini_xception, sample_faces, progress=False)


def titles(figure: Figure) -> list[str]:
    return [ax.get_title() for ax in figure.axes if ax.get_title()]


# -- conventions shared by every figure ---------------------------------------------------------


def test_save_figure_writes_vector_and_raster_reproducibly(evaluation, tmp_path):
    figure = F.plot_confusion_matrix(evaluation.confusion, evaluation.class_names)
    pdf, png = F.save_figure(figure, tmp_path / "confusion.pdf", dpi=100)
    assert (pdf.name, png.name) == ("confusion.pdf", "confusion.png")
    data = pdf.read_bytes()
    assert data.startswith(b"%PDF") and b"/FontFile2" in data  # TrueType embedded: text stays
    assert b"CreationDate" not in data
    from PIL import Image

    with Image.open(png) as image:
        assert image.size == (round(F.ONE_COLUMN * 100), round(F.ONE_COLUMN * 0.9 * 100))
    # No date in the file: the same figure built again gives the same bytes.
    twin = F.plot_confusion_matrix(evaluation.confusion, evaluation.class_names)
    (again,) = F.save_figure(twin, tmp_path / "again", formats=("pdf",), dpi=100)
    assert again.read_bytes() == data


def test_figures_leave_matplotlib_state_alone(evaluation, result):
    before = dict(matplotlib.rcParams)
    figures = [F.plot_confusion_matrix(evaluation.confusion, evaluation.class_names),
               F.plot_distance_heatmap(result.scores, "block2")]
    assert dict(matplotlib.rcParams) == before
    for figure in figures:
        assert isinstance(figure, Figure) and figure.canvas.manager is None  # not pyplot's
        assert figure.get_figwidth() == pytest.approx(
            F.ONE_COLUMN if figure is figures[0] else F.TWO_COLUMNS)
        text = figure.axes[0].get_yticklabels()[0]
        assert text.get_fontfamily() == ["sans-serif"] and \
            text.get_fontproperties().get_name() == "DejaVu Sans"


# -- confusion matrix and AU regions ------------------------------------------------------------


def test_confusion_matrix(evaluation, tmp_path):
    figure = F.plot_confusion_matrix(evaluation.confusion, evaluation.class_names,
                                     title="mini-xception")
    ax, colorbar = figure.axes
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("predicted", "true",
                                                                  "mini-xception")
    assert ax.images[0].get_clim() == (0, 1)
    assert ax.images[0].get_cmap().name.startswith(F.SEQUENTIAL)
    labelled = int((np.asarray(evaluation.confusion).sum(axis=1) > 0).sum())
    assert len(ax.texts) == labelled * len(evaluation.class_names)  # absent classes blank
    assert colorbar.get_ylabel() == "recall"
    assert_matches_baseline(figure, "confusion_matrix", tmp_path)


def test_baseline_comparison_sees_a_real_change(evaluation, tmp_path):
    counts = F.plot_confusion_matrix(evaluation.confusion, evaluation.class_names,
                                     normalise=False, title="mini-xception")
    actual = render_like_baseline(counts, tmp_path / "counts.png")
    difference = compare_images(str(baseline("confusion_matrix")), str(actual), tol=TOLERANCE)
    assert difference is not None and "RMS" in difference


def test_au_regions_on_a_face(tmp_path):
    from interp_fer.au_regions import load_au_regions

    figure = F.au_regions_figure(sample_face("happy"))
    (ax,) = figure.axes
    assert {t.get_text() for t in ax.texts} == {str(r.number) for r in load_au_regions()}
    assert figure.get_figwidth() == F.ONE_COLUMN
    assert_matches_baseline(figure, "au_regions_happy", tmp_path)


def test_projections_of_one_face(mini_xception, happy_input, tmp_path):
    figure = F.project_figure(mini_xception, happy_input, "block2", channels=[0, 1, 2, 3, 4])
    panels = [ax for ax in figure.axes if ax.images]
    assert len(panels) == 6
    assert all(ax.images[-1].get_clim() == (-1, 1) for ax in panels[1:]
               if len(ax.images) == 2)
    assert_matches_baseline(figure, "projections_block2", tmp_path)


# -- heatmap of D (question 1) -----------------------------------------------------------------


def test_heatmap_values_labels_and_limits(result):
    scores = result.scores
    figure = F.plot_distance_heatmap(scores, "block2")
    ax = figure.axes[0]
    part = scores[scores["layer"] == "block2"]
    image = ax.images[0]
    assert image.get_array().shape == (part["au"].nunique(), part["channel"].nunique())
    bound = float(part["distance"].abs().max())
    assert image.get_clim() == pytest.approx((-bound, bound))
    assert [t.get_text() for t in ax.get_yticklabels()] == \
        [f"AU{a}" for a in sorted(part["au"].unique())]
    assert ax.get_xlabel() == "channel of block2"
    assert "where channels look" in ax.get_title()
    assert image.colorbar.extend == "neither"
    limited = F.plot_distance_heatmap(scores, "block2", limit=bound / 2).axes[0].images[0]
    assert limited.get_clim() == pytest.approx((-bound / 2, bound / 2))
    assert limited.colorbar.extend == "both"  # saturated values are flagged on the bar
    with pytest.raises(ValueError, match="no scores for layer 'nope'"):
        F.plot_distance_heatmap(scores, "nope")


def test_heatmap_marks_significant_pairs_and_looks_at(result):
    scores = result.scores[result.scores["layer"] == "conv2"].copy()
    scores["q_value"] = 1.0
    # Significance and looks_at set by hand: what is tested is how the marks follow them.
    pairs = {(0, 12): 0.9, (0, 25): 0.4, (3, 6): 0.7, (5, 1): -0.8}  # (channel, AU): D
    for (channel, au), distance in pairs.items():
        where = (scores["channel"] == channel) & (scores["au"] == au)
        scores.loc[where, ["distance", "q_value"]] = distance, 0.001
    mapping = result.mapping[result.mapping["layer"] == "conv2"].copy()
    mapping["looks_at"] = None
    mapping.loc[mapping["channel"] == 0, "looks_at"] = "AU12"
    mapping.loc[mapping["channel"] == 3, "looks_at"] = "AU6"
    mapping.loc[mapping["channel"] == 5, "looks_at"] = "sham_cheek"
    ax = F.plot_distance_heatmap(scores, "conv2", mapping=mapping).axes[0]
    dots = next(line for line in ax.lines if line.get_marker() == ".")
    circles = next(line for line in ax.lines if line.get_marker() == "o")
    rows = {au: row for row, au in enumerate(sorted(scores["au"].unique()))}
    assert sorted(zip(dots.get_xdata(), dots.get_ydata(), strict=True)) == \
        [(0, rows[12]), (0, rows[25]), (3, rows[6]), (5, rows[1])]
    # One circle per channel's looks_at; the sham has no row without the looks table.
    assert sorted(zip(circles.get_xdata(), circles.get_ydata(), strict=True)) == \
        [(0, rows[12]), (3, rows[6])]
    # Without a mapping there is nothing to circle.
    bare = F.plot_distance_heatmap(scores, "conv2").axes[0]
    assert [line.get_marker() for line in bare.lines] == ["."]


def test_heatmap_with_shams_draws_the_looks_table(result):
    figure = F.plot_distance_heatmap(result.scores, "block2", mapping=result.mapping,
                                     looks=result.looks)
    ax = figure.axes[0]
    looks = result.looks[result.looks["layer"] == "block2"]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    shams = sorted(looks.loc[looks["sham"], "region"].unique())
    assert labels[-len(shams):] == [name.replace("_", " ") for name in shams]
    assert labels[:-len(shams)] == [f"AU{a}" for a in sorted(result.run["aus"])]
    grid = looks.pivot(index="region", columns="channel", values="distance")
    regions = [f"AU{a}" for a in sorted(result.run["aus"])] + shams
    np.testing.assert_allclose(ax.images[0].get_array().filled(np.nan),
                               grid.loc[regions].to_numpy(), equal_nan=True)
    # Every channel's looks_at (the region of largest D in this very table) is circled.
    circles = next(line for line in ax.lines if line.get_marker() == "o")
    expected = result.mapping[result.mapping["layer"] == "block2"]
    assert len(circles.get_xdata()) == expected["looks_at"].notna().sum()
    for x, y in zip(circles.get_xdata(), circles.get_ydata(), strict=True):
        assert regions[int(y)] == expected.loc[expected["channel"] == x, "looks_at"].iloc[0]
        assert grid.loc[regions[int(y)], x] == grid[x].max()


def test_heatmap_without_values_is_grey_not_an_error(result):
    scores = result.scores[result.scores["layer"] == "conv2"].assign(distance=np.nan)
    image = F.plot_distance_heatmap(scores, "conv2").axes[0].images[0]
    assert image.get_clim() == (-1, 1) and np.ma.getmaskarray(image.get_array()).all()


# -- heatmap of the detector test (does channel k detect AU a?) -----------------------------------


def test_detector_heatmap_values_and_marks(result):
    scores = result.scores
    mapping = result.mapping.copy()
    conv2 = mapping["layer"] == "conv2"
    # Two detectors set by hand; every other channel keeps its candidate (a dot).
    mapping.loc[conv2 & (mapping["channel"] == 1), ["au", "candidate_au"]] = 12, 12
    mapping.loc[conv2 & (mapping["channel"] == 4), ["au", "candidate_au"]] = 25, 25
    figure = F.plot_detector_heatmap(scores, "conv2", mapping)
    ax = figure.axes[0]
    tested = result.run["detector"]["tested_aus"]
    part = scores[scores["layer"] == "conv2"]
    # Tested AUs are those with an effect; AUs with a region but no activity get no row.
    assert tested == sorted(part.loc[part["effect"].notna(), "au"].unique().tolist())
    assert set(part["au"]) - set(tested)
    assert [t.get_text() for t in ax.get_yticklabels()] == [f"AU{a}" for a in tested]
    grid = part.pivot(index="au", columns="channel", values="effect").loc[tested]
    np.testing.assert_allclose(ax.images[0].get_array().filled(np.nan), grid.to_numpy(),
                               equal_nan=True)
    bound = float(np.nanmax(np.abs(grid.to_numpy())))
    assert ax.images[0].get_clim() == pytest.approx((-bound, bound))
    rows = {au: row for row, au in enumerate(tested)}
    circles = next(line for line in ax.lines if line.get_marker() == "o")
    assert sorted(zip(circles.get_xdata(), circles.get_ydata(), strict=True)) == \
        [(1, rows[12]), (4, rows[25])]
    dots = next(line for line in ax.lines if line.get_marker() == ".")
    others = mapping[conv2 & ~mapping["channel"].isin([1, 4])]
    assert sorted(zip(dots.get_xdata(), dots.get_ydata(), strict=True)) == \
        sorted((c, rows[int(a)]) for c, a in zip(others["channel"], others["candidate_au"],
                                                 strict=True))
    assert "detect the AU? effect, report half" in ax.get_title()
    # The bar each AU's effect must beat, one per row on the right-hand axis.
    right = next(a for a in figure.axes if a is not ax and a.get_ylabel().startswith(
        "control_bar"))
    bars = part.groupby("au")["control_bar"].first().loc[tested]
    assert [t.get_text() for t in right.get_yticklabels()] == [f"{b:.2f}" for b in bars]
    assert right.get_ylim() == ax.get_ylim()
    selection = F.plot_detector_heatmap(scores, "conv2", column="effect_select").axes[0]
    assert not [line for line in selection.lines if len(line.get_xdata())]  # no mapping
    assert "effect, selection half" in selection.get_title()
    np.testing.assert_allclose(
        selection.images[0].get_array().filled(np.nan),
        part.pivot(index="au", columns="channel", values="effect_select").loc[tested],
        equal_nan=True)
    partial = F.plot_detector_heatmap(scores, "conv2", column="partial")
    assert "partial (reported, not decided on), report half" in partial.axes[0].get_title()
    assert len(partial.axes) == 2  # heatmap and colour bar: no control_bar axis
    with pytest.raises(ValueError, match="no scores for layer 'nope'"):
        F.plot_detector_heatmap(scores, "nope")
    with pytest.raises(ValueError, match="'bogus' is not a detector-test measure"):
        F.plot_detector_heatmap(scores, "conv2", column="bogus")
    with pytest.raises(ValueError, match="no column 'effect_select'"):
        F.plot_detector_heatmap(scores.drop(columns="effect_select"), "conv2",
                                column="effect_select")


def test_detector_heatmap_without_report_values_says_so(result):
    scores = result.scores.assign(effect=np.nan)
    ax = F.plot_detector_heatmap(scores, "conv2", result.mapping).axes[0]
    assert np.ma.getmaskarray(ax.images[0].get_array()).all()
    assert "no effect values" in ax.texts[0].get_text()


# -- faces of a mapping run ----------------------------------------------------------------------


def test_top_faces_are_what_the_network_saw(mini_xception, result, sample_faces):
    faces = F.top_faces(result, mini_xception, sample_faces, "block2", 3, count=4)
    ranked = result.top_images["block2"]["indices"][3]
    assert faces.indices.tolist() == [int(i) for i in ranked[:4]]
    peaks = layer_outputs(mini_xception.module, ["block2"], faces.inputs)["block2"]
    # The peak of the channel on these inputs is the one the run recorded for those images.
    np.testing.assert_allclose(peaks[:, 3].flatten(1).amax(dim=1).numpy(),
                               result.top_images["block2"]["values"][3][:4], rtol=1e-5)
    assert faces.landmarks.shape == (4, 68, 2)
    inside = (faces.landmarks > -0.5) & (faces.landmarks < 63.5)
    assert inside.mean() > 0.9  # on the 64 x 64 input grid, not the original image


def test_expression_responses_come_from_a_forward_pass(mini_xception, result, sample_faces):
    responses = F.expression_responses(mini_xception, result, sample_faces, "conv2")
    labelled = [i for i, r in enumerate(sample_faces.records) if r.label_name]
    assert responses.indices.tolist() == labelled
    assert responses.labels.tolist() == [sample_faces.records[i].label_name for i in labelled]
    faces = F.mapped_faces(result, mini_xception, sample_faces, labelled)
    acts = layer_outputs(mini_xception.module, ["conv2"], faces.inputs)["conv2"]
    np.testing.assert_allclose(responses.peaks, acts.flatten(2).amax(dim=2).numpy(), rtol=1e-6)
    stats = responses.by_class(5)
    assert list(stats.index) == [c for c in sample_faces.class_names
                                 if c in set(responses.labels)]
    assert stats["n"].tolist() == [1] * len(stats)
    bounded = F.expression_responses(mini_xception, result, sample_faces, "conv2", max_images=2)
    assert len(bounded.labels) == 2
    with pytest.raises(ValueError, match="expression label"):
        F.expression_responses(mini_xception, result, unlabelled(sample_faces), "conv2")


def unlabelled(dataset):
    records = [dataclasses.replace(r, label=None, label_name=None) for r in dataset.records]
    return dataclasses.replace(dataset, records=records, skipped=[])


# -- projection grid ---------------------------------------------------------------------------


def test_grid_channels_puts_detectors_first(mapped):
    au = int(mapped.mapping["au"].dropna().iloc[0])
    chosen = F.grid_channels(mapped.mapping, au, count=50)
    flags = chosen["fallback"].tolist()
    assert flags == sorted(flags) and flags[0] is False  # every detector before any candidate
    for flag in (False, True):
        aucs = chosen.loc[chosen["fallback"] == flag, "auc"].tolist()
        assert aucs == sorted(aucs, reverse=True)
    assert (chosen.loc[~chosen["fallback"], "au"] == au).all()
    fallback = chosen[chosen["fallback"]]
    assert fallback["au"].isna().all() and (fallback["candidate_au"] == au).all()
    expected = mapped.mapping[(mapped.mapping["candidate_au"] == au)]
    assert len(chosen) == len(expected)
    assert set(F.grid_channels(mapped.mapping, au, 50, layers=["conv2"])["layer"]) <= {"conv2"}
    assert F.grid_channels(mapped.mapping, 999, 3).empty


def test_projection_grid(mini_xception, mapped, sample_faces, tmp_path):
    aus = sorted({int(a) for a in mapped.mapping["au"].dropna()})
    figure = F.plot_au_projection_grid(mini_xception, mapped, sample_faces, aus,
                                       channels_per_au=2, faces_per_channel=2)
    assert len(figure.axes) == len(aus) * 2 * 2
    blocks = figure.subfigs
    assert [b.get_suptitle().split()[0] for b in blocks[:len(aus)]] == \
        [f"AU{a}" for a in aus]
    heads = titles(figure)
    first = F.grid_channels(mapped.mapping, aus[0], 2).iloc[0]
    assert heads[0] == f"{first['layer']} #{int(first['channel'])}\nAUC {first['auc']:.2f}"
    for ax in figure.axes:
        if ax.images:  # a drawn cell: face, projection, extremum point, dashed AU region
            assert len(ax.images) == 2 and ax.images[1].get_clim() == (-1, 1)
            assert ax.patches and all(p.get_linestyle() == "--" for p in ax.patches)
    F.save_figure(figure, tmp_path / "grid", dpi=50)
    assert (tmp_path / "grid.pdf").stat().st_size > 0 and (tmp_path / "grid.png").is_file()


def test_projection_grid_falls_back_to_candidates_and_says_so(mini_xception, result,
                                                              sample_faces):
    bare = without_mapped(result)
    figure = F.plot_au_projection_grid(mini_xception, bare, sample_faces, channels_per_au=1)
    expected = [a for a in result.run["aus"] if (result.mapping["candidate_au"] == a).any()]
    assert len(figure.axes) == len(expected)
    assert all(t.endswith("not a detector") for t in titles(figure))
    blocks = [b.get_suptitle() for b in figure.subfigs if b.get_suptitle()]
    assert len(blocks) == len(expected) and all(t.endswith("(no detector)") for t in blocks)
    assert "not a detector: the channel's candidate AU" in figure.get_supxlabel()


# -- channel dossier ---------------------------------------------------------------------------


def test_activity_responses_are_the_report_half(result):
    row = result.mapping.query("layer == 'block2' and channel == 3").iloc[0]
    au = int(row["candidate_au"])
    points = F.activity_responses(result, "block2", 3, au)
    report = (result.faces["half"] == "report").to_numpy()
    j = result.run["detector"]["tested_aus"].index(au)
    np.testing.assert_array_equal(points.activity,
                                  result.activity[f"AU{au}"].to_numpy()[report])
    np.testing.assert_array_equal(points.response, result.responses["block2"][report, 3, j])
    assert len(points.activity) == result.run["detector"]["n_report"] == 4
    assert points.keys.tolist() == result.faces.loc[report, "key"].tolist()
    assert points.source == result.run["activity"]["sources"][f"AU{au}"] == "landmarks"
    # The number in the plot's title is the one the detector test reported for the pair.
    assert points.effect == pytest.approx(row["effect"])
    assert points.auc == pytest.approx(row["auc"])
    assert points.effect == pytest.approx(
        rank_effect(points.response[:, None], points.activity[:, None])[0])
    selection = F.activity_responses(result, "block2", 3, au, half="select")
    assert len(selection.activity) == result.run["detector"]["n_select"]
    with pytest.raises(ValueError, match="AU10 was not tested"):
        F.activity_responses(result, "block2", 3, 10)


def test_activity_response_figure(mapped, tmp_path):
    row = mapped.mapping[mapped.mapping["au"].notna()].iloc[0]
    layer, channel, au = row["layer"], int(row["channel"]), int(row["au"])
    figure = F.plot_activity_response(mapped, layer, channel)
    assert figure.get_suptitle() == f"{layer} channel {channel} detects AU{au}"
    (ax,) = figure.axes
    points = F.activity_responses(mapped, layer, channel, au)
    np.testing.assert_array_equal(ax.lines[0].get_ydata(), points.response)
    other = next(a for a in mapped.run["detector"]["tested_aus"] if a != au)
    figure = F.plot_activity_response(mapped, layer, channel, other)
    assert figure.get_suptitle() == f"{layer} channel {channel} is not a detector of AU{other}"
    assert figure.axes[0].get_xlabel() == f"AU{other} activity (landmarks)"
    F.save_figure(figure, tmp_path / "activity", dpi=50)
    assert (tmp_path / "activity.pdf").is_file()


def test_channel_dossier(mini_xception, mapped, sample_faces, tmp_path):
    row = mapped.mapping[mapped.mapping["au"].notna()].iloc[0]
    layer, channel, au = row["layer"], int(row["channel"]), int(row["au"])
    figure = F.plot_channel_dossier(mini_xception, mapped, sample_faces, layer, channel,
                                    faces=3)
    assert f"{layer} channel {channel}: detects AU{au}" in figure.get_suptitle()
    assert f"AUC {row['auc']:.2f}" in figure.get_suptitle()
    upper, lower = figure.subfigs
    assert len(upper.axes) == 2 * 3 + 1  # faces, projections, colour bar
    assert upper.axes[0].get_ylabel() == "AU region, points"
    # Faces are named by their file, not only by their dataset index.
    top = mapped.top_images[layer]["indices"][channel][:3]
    keys = mapped.faces.set_index("index")["key"]
    for ax, index in zip(upper.axes[:3], top, strict=True):
        stem = Path(keys[int(index)]).stem  # the sample faces' names are short
        assert ax.get_title().startswith(f"{stem} ({int(index)})\npeak")
    activity_ax, effect_ax, expression_ax = lower.axes
    points = F.activity_responses(mapped, layer, channel, au)
    (scatter,) = activity_ax.lines
    np.testing.assert_array_equal(scatter.get_ydata(), points.response)
    np.testing.assert_array_equal(scatter.get_xdata(), points.activity)
    assert f"n = {len(points.activity)}" in activity_ax.get_title()
    assert f"Spearman \u03c1 {points.effect:.2f}" in activity_ax.get_title()
    assert activity_ax.get_xlabel() == f"AU{au} activity (landmarks)"
    assert "fewer than 30 faces: not evidence" in [t.get_text() for t in activity_ax.texts]
    tested = mapped.run["detector"]["tested_aus"]
    scores = mapped.scores[(mapped.scores["layer"] == layer)
                           & (mapped.scores["channel"] == channel)].set_index("au")
    # Bars: effect per tested AU (the decision statistic); ticks: the bar per AU it must
    # beat; diamonds: partial, reported beside it and labelled as not decided on.
    heights = [bar.get_height() for bar in effect_ax.patches]
    np.testing.assert_allclose(heights, np.nan_to_num(scores.loc[tested, "effect"]))
    chosen = effect_ax.patches[tested.index(au)]
    assert chosen.get_linewidth() == 1.0 and chosen.get_edgecolor() == (0, 0, 0, 1)
    assert sum(p.get_edgecolor() == (0, 0, 0, 1) for p in effect_ax.patches) == 1
    (bars,) = [c for c in effect_ax.collections if isinstance(c, LineCollection)]
    levels = np.array([s[0][1] for s in bars.get_segments()])
    np.testing.assert_allclose(levels, scores.loc[tested, "control_bar"].to_numpy())
    (partial,) = [line for line in effect_ax.lines if line.get_marker() == "d"]
    np.testing.assert_allclose(partial.get_ydata(), scores.loc[tested, "partial"])
    assert partial.get_label() == "partial (reported, not decided on)"
    assert "partial: reported, not decided on" in effect_ax.get_title()
    assert effect_ax.get_ylabel().startswith("effect")
    assert f"effect {row['effect']:.2f}, bar {row['control_bar']:.2f}" in figure.get_suptitle()
    assert "forward pass, 4 labelled faces" in expression_ax.get_title()
    assert [t.get_text() for t in expression_ax.get_xticklabels()] == \
        ["angry (1)", "disgust (1)", "happy (1)", "surprise (1)"]
    F.save_figure(figure, tmp_path / "dossier", dpi=50)
    assert (tmp_path / "dossier.pdf").is_file() and (tmp_path / "dossier.png").is_file()


def test_dossier_of_a_channel_that_is_not_a_detector(mini_xception, result, sample_faces):
    bare = without_mapped(result)
    figure = F.plot_channel_dossier(mini_xception, bare, unlabelled(sample_faces), "conv2", 0,
                                    faces=2)
    candidate = int(result.mapping.query("layer == 'conv2' and channel == 0")["candidate_au"]
                    .iloc[0])
    assert f"not a detector (candidate AU{candidate}" in figure.get_suptitle()
    expression_ax = figure.subfigs[1].axes[2]
    assert "no expression labels" in expression_ax.texts[0].get_text()
    with pytest.raises(KeyError, match="not in the mapping"):
        F.plot_channel_dossier(mini_xception, bare, sample_faces, "conv2", 99)


# -- attribution comparison --------------------------------------------------------------------


def test_attribution_comparison(mini_xception, happy_input, tmp_path):
    from interp_fer.attributions import attribute

    methods = ["saliency", "guided_backprop", "gradcam"]
    figure = F.plot_attribution_comparison(mini_xception, happy_input, "happy", methods)
    panels = [ax for ax in figure.axes if ax.images]
    assert len(panels) == 4
    happy = mini_xception.class_names.index("happy")
    assert panels[0].get_title().startswith("input\nhappy, p = ")
    saliency, guided, gradcam = (ax.images[1] for ax in panels[1:])
    assert saliency.get_clim() == (0, 1) and saliency.get_cmap().name.startswith(F.SEQUENTIAL)
    assert guided.get_clim() == (-1, 1) and guided.get_cmap().name.startswith(F.DIVERGING)
    raw = attribute(mini_xception.module, happy_input, happy, "guided_backprop")[0].sum(0)
    scale = float(np.percentile(raw.abs().numpy(), 99.5))
    assert panels[2].get_title() == f"guided backprop\n1 = {scale:.2g}"
    assert gradcam.get_array().shape == tuple(mini_xception.input_size)
    assert sum(1 for ax in figure.axes if not ax.images) == 2  # signed and magnitude bars
    assert_matches_baseline(figure, "attributions_happy", tmp_path)


def test_attribution_comparison_rejects_bad_requests(mini_xception, happy_input):
    with pytest.raises(ValueError, match="unknown methods"):
        F.plot_attribution_comparison(mini_xception, happy_input, 3, ["lime"])
    with pytest.raises(ValueError, match="unknown class 'bored'"):
        F.plot_attribution_comparison(mini_xception, happy_input, "bored", ["saliency"])


def test_attribution_comparison_of_a_channel_target(mini_xception, happy_input):
    from interp_fer.attributions import ChannelMax

    figure = F.plot_attribution_comparison(mini_xception, happy_input[0],
                                           ChannelMax("block2", 3), ["deconvolution"])
    assert "ChannelMax('block2', 3)" in figure.axes[0].get_title()
    assert len([ax for ax in figure.axes if ax.images]) == 2
