"""report.html without a browser: the two questions and the headline (detectors beside the
random-weights control, activity sources, sham rate, small-sample warning), structure, links
to detector sections, the cap on sections, a run with no detector, and an unlabelled dataset
(tests/test_report_browser.py renders it in Chromium)."""

from __future__ import annotations

import dataclasses
import html
from html.parser import HTMLParser

import pandas as pd
import pytest

from interp_fer.detectors import DetectorOptions
from interp_fer.layer_mapping import MappingOptions
from interp_fer.mapping import headline, map_dataset
from interp_fer.report import (
    channel_anchor,
    dossier_channels,
    small_sample_warning,
    write_report,
)

VOID = {"meta", "img", "br", "hr", "link", "input"}


class Structure(HTMLParser):
    """Ids, internal links, sections and tag balance of an HTML document."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.links: list[str] = []
        self.sections: list[str] = []
        self.open: list[str] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.append(attrs["id"])
        if tag == "a" and attrs.get("href", "").startswith("#"):
            self.links.append(attrs["href"][1:])
        if tag == "section":
            self.sections.append(attrs["id"])
        if tag not in VOID:
            self.open.append(tag)

    def handle_endtag(self, tag):
        if not self.open or self.open.pop() != tag:
            self.errors.append(f"unbalanced </{tag}>")


def parse(path) -> Structure:
    structure = Structure()
    structure.feed(path.read_text(encoding="utf-8"))
    assert not structure.errors and not structure.open, (structure.errors, structure.open)
    assert len(structure.ids) == len(set(structure.ids)), "duplicate ids"
    assert set(structure.links) <= set(structure.ids), "links to missing anchors"
    return structure


@pytest.fixture(scope="module")
def result(mini_xception, sample_faces):
    return map_dataset(mini_xception, sample_faces, ["conv2", "block2"], locate="rf-center",
                       options=MappingOptions(n_boot=8, n_null=4),
                       detector=DetectorOptions(seed=8, n_perm=200, n_boot=20), progress=False)


def remapped(result, count: int):
    """``result`` with its ``count`` channels of largest AUC detecting their candidate AU
    (0: none).

    Which channels pass the detector test on seven faces is not the subject here (none can):
    the report's handling of detectors and other channels is.
    """
    mapping = result.mapping.assign(au=pd.array([pd.NA] * len(result.mapping), dtype="Int64"))
    chosen = mapping.sort_values("auc", ascending=False, kind="stable").index[:count]
    mapping.loc[chosen, "au"] = mapping.loc[chosen, "candidate_au"]
    return dataclasses.replace(result, mapping=mapping)


def test_channel_anchor_is_a_safe_id():
    assert channel_anchor("block2", 5) == "block2-5"
    assert channel_anchor("features.3", 12) == "features-3-12"


def test_dossier_channels_are_capped_strongest_first(result):
    mapping = remapped(result, 5).mapping
    shown, omitted = dossier_channels(mapping, 3)
    assert (len(shown), omitted) == (3, 2)
    assert shown["auc"].tolist() == sorted(mapping["auc"].nlargest(3), reverse=True)
    assert shown["au"].notna().all()


def test_small_sample_warning_follows_the_report_half(result):
    assert result.run["detector"]["n_report"] == 4
    assert "report half has 4 images" in small_sample_warning(result)
    run = {**result.run, "detector": {**result.run["detector"], "n_report": 120,
                                      "small_sample": False}}
    assert small_sample_warning(dataclasses.replace(result, run=run)) is None


def test_headline_says_the_two_questions_and_the_control(mini_xception, sample_faces, result,
                                                          tmp_path):
    path = write_report(remapped(result, 0), mini_xception, sample_faces,
                        tmp_path / "report.html")
    text = path.read_text(encoding="utf-8")
    assert "Two questions, kept apart" in text
    assert "Does channel k detect AU a?" in text and "Where does channel k look?" in text
    # Detectors of the network beside the random-weights control's, as mapping.headline says.
    assert "0 of 40 channels of conv2, block2 are AU detectors; the random-weights control: " \
        "0 of 40" in text
    assert html.escape(headline(result)) in text
    assert "too few to map anything; the numbers are not evidence." in text
    assert 'class="warning"' in text
    sources = result.run["activity"]["sources"]
    assert "AU activity from landmarks: " + ", ".join(sources) in text
    looks = result.run["looks_at"]
    assert (f"{100 * looks['sham_rate']:.0f} % of channels look at a sham region (chance share "
            f"of the regions: {100 * looks['sham_share']:.0f} %)") in text
    clipped = ", ".join(f"{name}: {count}"
                        for name, count in result.run["clipped_regions"].items()) or "none"
    assert f"regions clipped by the image frame (faces per region): {clipped}" in text
    # The control section: detectors beside the control's per layer, sham rate beside share.
    assert "Control: the same network with random weights" in text
    for column in ("detectors", "control_detectors", "sham_rate", "sham_share"):
        assert f">{column}</th>" in text
    assert text.index("Two questions") < text.index('id="mapping"') < text.index('id="control"')


def test_legend_describes_the_final_detector_rule(mini_xception, sample_faces, result,
                                                  tmp_path):
    path = write_report(remapped(result, 0), mini_xception, sample_faces,
                        tmp_path / "report.html")
    text = html.unescape(path.read_text(encoding="utf-8"))
    assert "see docs/method.md in the interp_fer repository" in text
    for rule in ("control_bar: the largest effect of any channel of that layer at that AU in "
                 "the random-weights copies (beats_control: effect above it)",
                 "specific: effect above it",
                 "candidate_au: the AU with the largest effect - control_bar on the "
                 "selection half",
                 "p_value: permutation p-value of effect",
                 "au: the candidate when q_value <= alpha, beats_control and specific all "
                 "hold",
                 "partial: the association of the in-minus-out contrast with the AU's "
                 "activity given every other AU's activity, reported, not decided on"):
        assert rule in text, rule
    assert "largest partial" not in text and "p-value of partial" not in text
    # The detector heatmap per layer draws effect with the control bar, for both layers.
    for layer in ("conv2", "block2"):
        assert (f'alt="trained: detector test effect per AU and channel, with the '
                f'random-weights control_bar per AU, {layer}"') in text
    # The control section says how many copies set the bar and that the last is tested.
    assert result.run["detector"]["control"] == (
        "3 randomized copies (every parameter re-drawn) set the bar; one more is tested "
        "against it")
    assert f"This run: {result.run['detector']['control']}." in text
    assert "No random-weights copy of this run was tested" not in text


def test_a_single_control_copy_sets_the_bar_without_a_count(mini_xception, sample_faces,
                                                            result, tmp_path):
    # map_dataset(controls=1): one copy sets the bar, none is left to be tested against it.
    control = "1 randomized copies (every parameter re-drawn) set the bar"
    run = {**result.run, "detector": {**result.run["detector"], "control": control,
                                      "control_detectors": None}}
    single = dataclasses.replace(remapped(result, 0), run=run, control_detectors=None)
    text = write_report(single, mini_xception, sample_faces,
                        tmp_path / "report.html").read_text(encoding="utf-8")
    assert f"This run: {control}." in text
    assert "No random-weights copy of this run was tested against the bar" in text


def test_detectors_get_linked_sections(mini_xception, sample_faces, result, tmp_path):
    mapped = remapped(result, 3)
    path = write_report(mapped, mini_xception, sample_faces, tmp_path / "report.html",
                        max_channels=2)
    structure = parse(path)
    shown, _ = dossier_channels(mapped.mapping, 2)
    anchors = [channel_anchor(r.layer, r.channel) for r in shown.itertuples()]
    assert structure.sections == anchors
    assert all(anchors.count(a) == 1 for a in anchors)
    assert set(anchors) <= set(structure.links)  # from the table and the per-AU lists
    text = path.read_text(encoding="utf-8")
    assert "1 other detector(s) omitted" in text
    assert text.count('<tr class="detected">') == 3
    # Each section's caption quotes the decision's numbers: effect beside the bar it beat,
    # out_effect, AUC and q; partial only as reported.
    for r in shown.itertuples():
        assert (f"{r.layer} channel {int(r.channel)} detects AU{int(r.au)}: effect "
                f"{r.effect:.2f} (control_bar {r.control_bar:.2f}, out_effect "
                f"{r.out_effect:.2f}), AUC {r.auc:.2f} [{r.auc_low:.2f}, {r.auc_high:.2f}] on "
                f"4 report images, q = {r.q_value:.2g}; partial ") in html.unescape(text)
    assert "(reported, not decided on); looks at" in text
    assert f"(effect {shown.iloc[0]['effect']:.2f}, AUC {shown.iloc[0]['auc']:.2f})" in text
    # Per layer two heatmaps (effect, then D), the grid, one dossier per section.
    assert text.count("data:image/png;base64,") == 2 * 2 + 1 + 2
    assert 'src="http' not in text and "<link" not in text  # self-contained
    assert not list(tmp_path.glob("*.tmp*")) and [p.name for p in tmp_path.iterdir()] == \
        ["report.html"]  # written atomically, nothing left beside it


def test_no_detector_is_not_an_error(mini_xception, sample_faces, result, tmp_path):
    path = write_report(remapped(result, 0), mini_xception, sample_faces,
                        tmp_path / "report.html", control=remapped(result, 0))
    structure = parse(path)
    text = path.read_text(encoding="utf-8")
    assert structure.sections == [] and structure.links == []
    assert "No channel detects an AU. The grid shows" in text
    assert "No channel detects an AU: no channel sections." in text
    assert "Full run on a randomised copy" in text
    assert "0 of 40 channels of the randomised network are detectors" in text


def test_unlabelled_dataset(mini_xception, sample_faces, result, tmp_path):
    records = [dataclasses.replace(r, label=None, label_name=None) for r in sample_faces.records]
    unlabelled = dataclasses.replace(sample_faces, records=records, skipped=[])
    path = write_report(remapped(result, 1), mini_xception, unlabelled, tmp_path / "r.html")
    assert len(parse(path).sections) == 1
