"""report.html without a browser: structure, links to channel sections, the cap on sections, a
run with no mapped channel, and an unlabelled dataset (tests/test_report_browser.py renders
it in Chromium)."""

from __future__ import annotations

import dataclasses
from html.parser import HTMLParser

import pandas as pd
import pytest

from interp_fer.layer_mapping import MappingOptions
from interp_fer.mapping import map_dataset
from interp_fer.report import channel_anchor, dossier_channels, write_report

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
                       options=MappingOptions(n_boot=8, n_null=4), progress=False)


def remapped(result, count: int):
    """``result`` with its ``count`` channels of largest D mapped to their best AU (0: none).

    Which channels seven faces make significant is not the subject here: the report's
    handling of mapped and unmapped channels is.
    """
    mapping = result.mapping.assign(au=pd.array([pd.NA] * len(result.mapping), dtype="Int64"),
                                    significant=False)
    chosen = mapping.sort_values("distance", ascending=False).index[:count]
    mapping.loc[chosen, "au"] = mapping.loc[chosen, "best_au"]
    mapping.loc[chosen, "significant"] = True
    return dataclasses.replace(result, mapping=mapping)


def test_channel_anchor_is_a_safe_id():
    assert channel_anchor("block2", 5) == "block2-5"
    assert channel_anchor("features.3", 12) == "features-3-12"


def test_dossier_channels_are_capped_strongest_first(result):
    mapping = remapped(result, 5).mapping
    shown, omitted = dossier_channels(mapping, 3)
    assert (len(shown), omitted) == (3, 2)
    assert shown["distance"].tolist() == sorted(mapping["distance"].nlargest(3), reverse=True)


def test_mapped_channels_get_linked_sections(mini_xception, sample_faces, result, tmp_path):
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
    assert "1 other mapped channel(s) omitted" in text
    assert text.count("data:image/png;base64,") == 2 + 1 + 2  # heatmaps, grid, dossiers
    assert 'src="http' not in text and "<link" not in text  # self-contained


def test_no_mapped_channel_is_not_an_error(mini_xception, sample_faces, result, tmp_path):
    path = write_report(remapped(result, 0), mini_xception, sample_faces,
                        tmp_path / "report.html", control=remapped(result, 0))
    structure = parse(path)
    text = path.read_text(encoding="utf-8")
    assert structure.sections == [] and structure.links == []
    assert "No channel is significantly mapped" in text
    assert "<b>0</b> of 40 channels mapped" in text
    assert "Control: randomised weights" in text


def test_unlabelled_dataset(mini_xception, sample_faces, result, tmp_path):
    records = [dataclasses.replace(r, label=None, label_name=None) for r in sample_faces.records]
    unlabelled = dataclasses.replace(sample_faces, records=records, skipped=[])
    path = write_report(remapped(result, 1), mini_xception, unlabelled, tmp_path / "r.html")
    assert len(parse(path).sections) == 1
