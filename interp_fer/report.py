"""The self-contained HTML report of a mapping run (``report.html``).

Derived from the run's tables (CSV first, HTML from it, as in dissect):

1. the two questions in plain words, the headline (detectors of the network beside those of
   its random-weights control, :func:`interp_fer.mapping.headline`), where the AU activity
   came from, the sham rate against its chance share, clipped regions, and a warning when
   the sample is too small for any test to pass;
2. the mapping table (sortable; detectors highlighted, each linking to its section);
3. per layer, question 1: an AU x channel heatmap of the detector test's ``effect`` with each
   AU's ``control_bar`` beside it (detected pairs circled, candidates dotted); question 2: the
   heatmap of D per region (``looks_at`` circled, sham regions included);
4. the projection grid: the detectors of each AU projected on their top faces (candidates,
   marked "not a detector", when there is none);
5. one section per detector (the strongest ``max_channels`` by report-half AUC), anchored
   ``#<layer>-<channel>``, with its dossier (:func:`interp_fer.figures.plot_channel_dossier`);
6. the built-in control per layer (detectors against the random-weights control, sham rate
   against its chance share) and, when given, a full run on a weight-randomised copy.

Questions are numbered as in ``docs/method.md`` (1: does channel k detect AU a? 2: where does
it look?), which the report names for the method. Figures are embedded as PNG data URIs, so the file can be mailed or archived alone.
"""

from __future__ import annotations

import base64
import html
import io
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from .outputs import write_text

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from .data import ImageDataset
    from .figures import ExpressionResponses
    from .mapping import MappingResult
    from .models import FERModel

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em; color: #222; }
h1, h2, h3 { font-weight: 600; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right; }
th { cursor: pointer; background: #f4f4f4; position: sticky; top: 0; }
th.sorted-asc::after { content: " \\25B2"; } th.sorted-desc::after { content: " \\25BC"; }
td.text, th.text { text-align: left; }
tr.unmapped { color: #888; }
tr.detected { background: #e6f2fa; font-weight: 600; }
.headline { font-size: 1.1em; border-left: 4px solid #0072b2; padding: 0.4em 0.8em;
  background: #f4f8fb; }
.warning { border: 2px solid #d55e00; background: #fff3e8; padding: 0.5em 0.8em;
  font-weight: 600; }
.scroll { max-height: 30em; overflow: auto; border: 1px solid #ddd; }
img { max-width: 100%; }
.note { color: #555; font-size: 0.9em; }
section.channel { border-top: 1px solid #ddd; margin-top: 1.5em; }
section.channel:target { background: #fffbe6; }
"""

_SORT_SCRIPT = """
document.querySelectorAll('table.sortable').forEach(function (table) {
  table.querySelectorAll('th').forEach(function (th, column) {
    th.addEventListener('click', function () {
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      var ascending = !th.classList.contains('sorted-asc');
      table.querySelectorAll('th').forEach(function (h) {
        h.classList.remove('sorted-asc', 'sorted-desc');
      });
      th.classList.add(ascending ? 'sorted-asc' : 'sorted-desc');
      rows.sort(function (a, b) {
        var x = a.cells[column].dataset.value, y = b.cells[column].dataset.value;
        var nx = parseFloat(x), ny = parseFloat(y);
        var result = (isNaN(nx) || isNaN(ny)) ? String(x).localeCompare(String(y)) : nx - ny;
        return ascending ? result : -result;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
"""

_QUESTIONS = (
    "<h2>Two questions, kept apart</h2>"
    "<ol><li><b>Does channel k detect AU a?</b> (column <code>au</code>) The channel's "
    "response at the AU's place on the face must rise when the AU is active on that face "
    "(its activity: measured from the landmarks, or from your AU labels), more than with any "
    "other AU, more than the same layer of networks with random weights shows "
    "(<code>control_bar</code>), and more than its response elsewhere on the face. The "
    "statistic is <code>effect</code>, the rank correlation of the response with the AU's "
    "activity. The AU is chosen on one half of the images (the one the channel follows most "
    "beyond the random-weights bar) and tested on the other half (permutation p-value, "
    "Benjamini-Hochberg). Only this question may be read as \u201cchannel k detects AU "
    "a\u201d.</li>"
    "<li><b>Where does channel k look?</b> (column <code>looks_at</code>) The facial region "
    "(an AU's region, or a <i>sham</i> region at a place no AU occupies) where the channel "
    "responds most compared with the rest of the face: the paper's distance D. It is a "
    "description, not a finding about training: a network with random weights also looks "
    "at eyes, brows and mouth, and a sham region should win no more often than its share of "
    "the regions.</li></ol>"
    '<p class="note">The method, step by step: see docs/method.md in the interp_fer '
    "repository.</p>"
)

_LEGEND = (
    "Question 1 (mapping.csv; the detector test, see docs/method.md in the interp_fer "
    "repository). effect: on the report half, Spearman's rho between the channel's peak "
    "response inside the AU's region and the AU's activity (2 AUC - 1 for 0/1 activity); auc "
    "(auc_low, auc_high): (1 + effect) / 2, the AUC for 0/1 activity and AUC-like otherwise, "
    "with a bootstrap interval; control_bar: the largest effect of any channel of that layer "
    "at that AU in the random-weights copies (beats_control: effect above it); out_effect: "
    "the effect of the channel's peak elsewhere on the face (specific: effect above it); "
    "candidate_au: the AU with the largest effect - control_bar on the selection half, "
    "reported either way; p_value: permutation p-value of effect (activity rows permuted "
    "together, one-sided); q_value: Benjamini-Hochberg over every tested pair of the run; "
    "au: the candidate when q_value <= alpha, beats_control and specific all hold, else "
    "empty; partial: the association of the in-minus-out contrast with the AU's activity "
    "given every other AU's activity, reported, not decided on (compare effect and partial "
    "before claiming that a channel follows one AU rather than its usual companions); "
    "small_sample: report half under 30 images; n_report: images of the report half. "
    "Question 2: looks_at: the region of largest D (AU or sham); looks_at_distance: that D "
    "(Wasserstein-1 / pooled SD between the peak inside the region and on the rest of the "
    "face); looks_at_resolvable: false where the region shares its cells with another at "
    "this layer (looks_at_shares_cells_with), so the two cannot be told apart there; "
    "hit_rate (chance_rate): share of images whose extremum point falls within that region; "
    "iou: dissection IoU; n_images: images measured. Click a column to sort; click a "
    "detector's channel to open its section.")


def figure_data_uri(figure: Figure, dpi: int = 150) -> str:
    """PNG of a matplotlib figure as a ``data:`` URI."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _fixed(value: float) -> str:
    """Two decimals, or "n/a" for a missing number (e.g. ``partial`` of a constant response)."""
    return "n/a" if value is None or pd.isna(value) else f"{value:.2f}"


def _image(figure: Figure, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="{figure_data_uri(figure)}">'


def channel_anchor(layer: str, channel: int) -> str:
    """The ``id`` of a channel's section: ``<layer>-<channel>``, with any character outside
    ``[A-Za-z0-9_-]`` of the layer name (e.g. the dots of ``features.3``) replaced by ``-``."""
    return f"{re.sub(r'[^A-Za-z0-9_-]', '-', str(layer))}-{int(channel)}"


def _numeric(column: pd.Series) -> bool:
    """Numbers (not text, not flags): right-aligned."""
    return pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column)


def html_table(frame: pd.DataFrame, table_id: str, row_class: pd.Series | None = None,
               links: Mapping[str, Sequence[str | None]] | None = None) -> str:
    """A sortable HTML table; numbers shown rounded, sorted by their full value.

    Parameters
    ----------
    frame
        The rows to show.
    table_id
        ``id`` of the table element.
    row_class
        CSS class of each row (by position), or None.
    links
        Column name -> one ``href`` (or None: no link) per row, by position.
    """
    links = links or {}
    head = "".join(
        f'<th class="{"" if _numeric(frame[c]) else "text"}">{html.escape(str(c))}</th>'
        for c in frame.columns)
    body = []
    for position, (_, row) in enumerate(frame.iterrows()):
        cells = []
        for column in frame.columns:
            value = row[column]
            missing = value is None or (not isinstance(value, str) and pd.isna(value))
            shown = "" if missing else (f"{value:.3g}" if isinstance(value, float) else str(value))
            raw = "" if missing else str(value)
            kind = "" if _numeric(frame[column]) else "text"
            content = html.escape(shown)
            href = links[column][position] if column in links else None
            if href:
                content = f'<a href="{html.escape(href)}">{content}</a>'
            cells.append(f'<td class="{kind}" data-value="{html.escape(raw)}">{content}</td>')
        css = "" if row_class is None else f' class="{row_class.iloc[position]}"'
        body.append(f"<tr{css}>{''.join(cells)}</tr>")
    return (f'<table class="sortable" id="{table_id}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table>")


def _sources(result: MappingResult) -> str:
    """``landmarks: AU1, AU2; labels: AU12`` from ``run["activity"]["sources"]``."""
    sources = result.run.get("activity", {}).get("sources", {})
    grouped: dict[str, list[str]] = {}
    for au, source in sources.items():
        grouped.setdefault(str(source), []).append(str(au))
    return "; ".join(f"{source}: {', '.join(aus)}" for source, aus in grouped.items()) \
        or "none (no AU had an activity source: nothing was tested)"


def small_sample_warning(result: MappingResult) -> str | None:
    """The warning shown when the report half is too small for any test to pass, or None."""
    detector = result.run.get("detector", {})
    n_report = detector.get("n_report")
    if not detector.get("small_sample") and (n_report is None or n_report >= 30):
        return None
    return (f"Small sample: the report half has {n_report} images, too few to map anything; "
            "the numbers are not evidence.")


def _headline(result: MappingResult) -> str:
    from .mapping import headline

    run = result.run
    looks = run.get("looks_at", {})
    rate, share = looks.get("sham_rate"), looks.get("sham_share")
    sham = ("not measured" if rate is None or pd.isna(rate) else
            f"{100 * rate:.0f} % of channels look at a sham region (chance share of the "
            f"regions: {100 * share:.0f} %)")
    clipped = run.get("clipped_regions") or {}
    clipped_text = ", ".join(f"{name}: {count}" for name, count in clipped.items()) or "none"
    parts = [f'<p class="headline"><b>{html.escape(headline(result))}</b></p>']
    warning = small_sample_warning(result)
    if warning:
        parts.append(f'<p class="warning">{html.escape(warning)}</p>')
    parts.append(
        "<ul>"
        f"<li>AU activity from {html.escape(_sources(result))} (requested: "
        f"{html.escape(str(run.get('activity', {}).get('requested', '?')))})</li>"
        f"<li>where channels look: {html.escape(sham)}</li>"
        "<li>regions clipped by the image frame (faces per region): "
        f"{html.escape(clipped_text)}</li></ul>")
    return "".join(parts)


def _summary(result: MappingResult) -> str:
    run = result.run
    data = run["data"]
    statuses = ", ".join(f"{k}: {v}" for k, v in run["landmark_status"].items())
    detector = run.get("detector", {})
    halves = (f"; {detector['n_select']} selection / {detector['n_report']} report images, "
              f"{detector['n_perm']} permutations") if "n_report" in detector else ""
    return (
        "<h2>What was run</h2><ul>"
        f"<li>model <b>{html.escape(run['model']['name'])}</b> "
        f"({html.escape(str(run['model']['source']))})</li>"
        f"<li>data {html.escape(str(data['source']))}: {data['n_images']} images, "
        f"{data['n_mapped']} with landmarks, {data['n_skipped']} skipped</li>"
        f"<li>landmark status: {html.escape(statuses)}</li>"
        f"<li>layers {html.escape(', '.join(run['layers']))}; extremum point: "
        f"{html.escape(run['locate'])}; seed {run['seed']}; FDR {run['alpha']}"
        f"{html.escape(halves)}</li>"
        "</ul>"
    )


def dossier_channels(mapping: pd.DataFrame, limit: int) -> tuple[pd.DataFrame, int]:
    """The detectors that get a section (largest report-half ``auc`` first), and how many
    are left out.

    Parameters
    ----------
    mapping
        :attr:`interp_fer.mapping.MappingResult.mapping`.
    limit
        Sections at most.
    """
    detected = mapping[mapping["au"].notna()].sort_values("auc", ascending=False,
                                                          kind="stable", na_position="last")
    return detected.head(limit), max(0, len(detected) - limit)


def _mapping_section(result: MappingResult, shown: pd.DataFrame) -> str:
    table = result.mapping.copy()
    row_class = table["au"].isna().map({True: "unmapped", False: "detected"})
    table["au"] = table["au"].astype("string").fillna("")
    with_section = {(r.layer, int(r.channel)) for r in shown.itertuples(index=False)}
    hrefs = [f"#{channel_anchor(layer, channel)}" if (layer, int(channel)) in with_section
             else None for layer, channel in zip(table["layer"], table["channel"], strict=True)]
    return ("<h2>Mapping</h2>"
            '<p class="note">One row per channel; detectors (a value in <code>au</code>) are '
            "highlighted.</p>"
            f'<div class="scroll">{html_table(table, "mapping", row_class, {"channel": hrefs})}'
            "</div>")


def _heatmaps(result: MappingResult, label: str) -> list[str]:
    """Per layer: question 1's heatmap of ``effect`` (with each AU's ``control_bar``), then
    question 2's heatmap of D."""
    from .figures import plot_detector_heatmap, plot_distance_heatmap

    parts = []
    for layer in result.run["layers"]:
        parts.append(f"<h3>{html.escape(label)}: {html.escape(str(layer))}</h3>")
        if "effect" in result.scores:
            parts.append(_image(plot_detector_heatmap(result.scores, layer, result.mapping),
                                f"{label}: detector test effect per AU and channel, with the "
                                f"random-weights control_bar per AU, {layer}"))
        parts.append(_image(plot_distance_heatmap(result.scores, layer, mapping=result.mapping,
                                                  looks=result.looks,
                                                  alpha=result.run["alpha"]),
                            f"{label}: where channels look, D per region, {layer}"))
    return parts


def _grid_section(result: MappingResult, model: FERModel, dataset: ImageDataset,
                  shown: pd.DataFrame, channels_per_au: int) -> list[str]:
    """The projection grid, and per AU the links to its detectors' sections."""
    from .figures import plot_au_projection_grid

    parts = ["<h2>Detectors per AU</h2>"]
    detected_aus = [int(a) for a in result.run["aus"] if (result.mapping["au"] == a).any()]
    if not detected_aus:
        if not result.mapping["candidate_au"].notna().any():
            parts.append('<p class="note">No channel has a candidate AU: no grid.</p>')
            return parts
        parts.append('<p class="note">No channel detects an AU. The grid shows, for each AU, '
                     "the channels whose candidate AU it is (chosen on the selection half), "
                     "marked \u201cnot a detector\u201d.</p>")
    parts.append(_image(plot_au_projection_grid(model, result, dataset, detected_aus or None,
                                                channels_per_au),
                        "deconvnet projections of the detectors of each AU"))
    items = []
    for au in detected_aus:
        rows = shown[shown["au"] == au]
        links = ", ".join(
            f'<a href="#{channel_anchor(r.layer, r.channel)}">{html.escape(str(r.layer))} '
            f"#{int(r.channel)}</a> (effect {_fixed(r.effect)}, AUC {_fixed(r.auc)})"
            for r in rows.itertuples(index=False))
        items.append(f'<li id="au{au}">AU{au}: {links or "sections omitted (see below)"}</li>')
    if items:
        parts.append(f"<ul>{''.join(items)}</ul>")
    return parts


def _channel_sections(result: MappingResult, model: FERModel, dataset: ImageDataset,
                      shown: pd.DataFrame, omitted: int, faces: int, max_images: int
                      ) -> list[str]:
    """One section per shown detector, each with its dossier figure."""
    from .figures import expression_responses, plot_channel_dossier

    parts = ["<h2>Detectors</h2>"]
    if shown.empty:
        parts.append('<p class="note">No channel detects an AU: no channel sections.</p>')
        return parts
    if omitted:
        parts.append(f'<p class="note">Sections for the {len(shown)} detectors of largest AUC; '
                     f"{omitted} other detector(s) omitted (see the mapping table; "
                     "write_report(max_channels=...) shows more).</p>")
    responses: dict[str, ExpressionResponses | None] = {}
    for row in shown.itertuples(index=False):
        if row.layer not in responses:  # one forward pass per layer serves all its channels
            responses[row.layer] = expression_responses(
                model, result, dataset, row.layer, max_images=max_images) \
                if dataset.labelled else None
        caption = (f"{row.layer} channel {int(row.channel)} detects AU{int(row.au)}: "
                   f"effect {_fixed(row.effect)} (control_bar {_fixed(row.control_bar)}, "
                   f"out_effect {_fixed(row.out_effect)}), AUC {_fixed(row.auc)} "
                   f"[{_fixed(row.auc_low)}, {_fixed(row.auc_high)}] on "
                   f"{int(row.n_report)} report images, q = {row.q_value:.2g}; partial "
                   f"{_fixed(row.partial)} (reported, not decided on); looks at {row.looks_at}")
        figure = plot_channel_dossier(model, result, dataset, row.layer, int(row.channel),
                                      faces=faces, responses=responses[row.layer])
        parts.append(f'<section class="channel" id="{channel_anchor(row.layer, row.channel)}">'
                     f"<h3>{html.escape(str(row.layer))} channel {int(row.channel)} &rarr; "
                     f'<a href="#au{int(row.au)}">AU{int(row.au)}</a></h3>'
                     f"<p>{html.escape(caption)}</p>{_image(figure, caption)}</section>")
    return parts


def _control_section(result: MappingResult) -> list[str]:
    """The run's built-in random-weights control, per layer."""
    from .mapping import layer_summary

    control = result.run.get("detector", {}).get("control", "none")
    parts = ['<h2 id="control">Control: the same network with random weights</h2>',
             "<p>Copies of the network with every parameter re-drawn run on the same faces. "
             "All but the last set each layer's <code>control_bar</code> per AU (the largest "
             "effect of any of their channels); the last is tested against that bar like the "
             "trained network (<code>control_detectors</code>): the detectors it finds are "
             "what chance, the images and the architecture give. The trained network's "
             "detectors mean something only where they outnumber the control's. This run: "
             f"{html.escape(str(control))}. For question 2, the sham rate (share of channels "
             "that look at a sham region) is set beside the sham share (share of the regions "
             "that are shams: what a sham wins by chance).</p>"]
    if result.control_detectors is None:
        parts.append('<p class="note">No random-weights copy of this run was tested against '
                     "the bar, so there is no control count (map with two or more copies, "
                     "--controls 2 or more, to get one).</p>")
    parts.append(html_table(layer_summary(result), "control-summary"))
    return parts


def write_report(
    result: MappingResult,
    model: FERModel,
    dataset: ImageDataset,
    path: str | os.PathLike,
    *,
    channels_per_au: int = 3,
    faces_per_channel: int = 4,
    control: MappingResult | None = None,
    max_channels: int = 24,
    max_images: int = 256,
) -> Path:
    """Write the run's ``report.html`` (atomically: a reader never sees half a file).

    Parameters
    ----------
    result
        The mapping run (:func:`interp_fer.mapping.map_dataset`).
    model, dataset
        What it was run on (the report projects channels on real faces of the dataset).
    path
        Output file.
    channels_per_au
        Channels per AU in the projection grid.
    faces_per_channel
        Top faces in each detector's dossier.
    control
        A full run on a weight-randomised copy (beyond the run's built-in control), shown
        beside the trained model.
    max_channels
        Detectors that get their own section (the largest report-half AUC first); the others
        are counted in a note.
    max_images
        Labelled faces in the forward pass behind each dossier's response per expression.
    """
    parts = [f"<h1>AU &harr; channel mapping: {html.escape(model.name)}</h1>",
             _headline(result), _QUESTIONS, _summary(result),
             f'<p class="note">{html.escape(_LEGEND)}</p>']
    shown, omitted = dossier_channels(result.mapping, max_channels)
    parts.append(_mapping_section(result, shown))
    parts.append("<h2>Per layer: which channel detects which AU (question 1), where channels "
                 "look (question 2)</h2>")
    parts.extend(_heatmaps(result, "trained"))
    if result.top_images and result.faces is not None:
        parts.extend(_grid_section(result, model, dataset, shown, channels_per_au))
        parts.extend(_channel_sections(result, model, dataset, shown, omitted,
                                       faces_per_channel, max_images))
    else:
        parts.append('<p class="note">This result keeps no top faces: projections and channel '
                     "sections are left out.</p>")
    parts.extend(_control_section(result))
    if control is not None:
        from .mapping import layer_summary

        parts.append("<h2>Full run on a randomised copy</h2>")
        detected = int(control.mapping["au"].notna().sum())
        parts.append(f"<p>{detected} of {len(control.mapping)} channels of the randomised "
                     "network are detectors (Adebayo et al. 2018). Per layer, trained beside "
                     "randomised: what the analysis finds in a network that learned nothing "
                     "comes from the images and the architecture.</p>")
        both = layer_summary(result).merge(layer_summary(control), on=["layer", "channels"],
                                           suffixes=("", " (randomised)"))
        parts.append(html_table(both, "control-run-summary"))
        parts.extend(_heatmaps(control, "randomised"))
    document = (
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>interp_fer mapping: {html.escape(model.name)}</title>"
        f"<style>{_STYLE}</style></head><body>{''.join(parts)}"
        f"<script>{_SORT_SCRIPT}</script></body></html>"
    )
    return write_text(document, path)
