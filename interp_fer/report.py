"""The self-contained HTML report of a mapping run (``report.html``).

Derived from the run's tables (CSV first, HTML from it, as in dissect):

1. a summary of what was run;
2. the mapping table (sortable; each mapped channel links to its section);
3. an AU x channel heatmap of D per layer;
4. the projection grid: the top channels of each AU projected on their top faces;
5. one section per mapped channel (the strongest ``max_channels`` by D), anchored
   ``#<layer>-<channel>``, with its dossier (:func:`interp_fer.figures.plot_channel_dossier`);
6. the randomised-weights control, when given.

Figures are embedded as PNG data URIs, so the file can be mailed or archived alone.
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

_LEGEND = (
    "D: signed distance between the channel's peak response inside the AU region and its peak "
    "over the rest of the face (Wasserstein-1 / pooled SD by default); the rest of the face is "
    "much larger than the region, so D is often negative even where the channel prefers the "
    "region. p-value: against the same region placed at random on the same face (same area "
    "handicap); excess (scores.csv): D minus the mean D of those placements; q: "
    "Benjamini-Hochberg over all pairs; stability: share of bootstrap resamples choosing the "
    "same AU; hit rate: share of images whose extremum point falls within the region (chance "
    "rate beside it); label AUC: peak response, AU present vs absent; control percentile (with "
    "the randomised control): share of the random network's channels whose excess at that "
    "AU is lower. A mapping says where a "
    "channel responds, not that training put it there: compare with the randomised control. "
    "Click a column to sort; click a mapped channel to open its section.")


def figure_data_uri(figure: Figure, dpi: int = 150) -> str:
    """PNG of a matplotlib figure as a ``data:`` URI."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _image(figure: Figure, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="{figure_data_uri(figure)}">'


def channel_anchor(layer: str, channel: int) -> str:
    """The ``id`` of a channel's section: ``<layer>-<channel>``, with any character outside
    ``[A-Za-z0-9_-]`` of the layer name (e.g. the dots of ``features.3``) replaced by ``-``."""
    return f"{re.sub(r'[^A-Za-z0-9_-]', '-', str(layer))}-{int(channel)}"


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
        f'<th class="{"text" if frame[c].dtype == object else ""}">{html.escape(str(c))}</th>'
        for c in frame.columns)
    body = []
    for position, (_, row) in enumerate(frame.iterrows()):
        cells = []
        for column in frame.columns:
            value = row[column]
            missing = value is None or (not isinstance(value, str) and pd.isna(value))
            shown = "" if missing else (f"{value:.3g}" if isinstance(value, float) else str(value))
            raw = "" if missing else str(value)
            kind = "text" if frame[column].dtype == object else ""
            content = html.escape(shown)
            href = links[column][position] if column in links else None
            if href:
                content = f'<a href="{html.escape(href)}">{content}</a>'
            cells.append(f'<td class="{kind}" data-value="{html.escape(raw)}">{content}</td>')
        css = "" if row_class is None else f' class="{row_class.iloc[position]}"'
        body.append(f"<tr{css}>{''.join(cells)}</tr>")
    return (f'<table class="sortable" id="{table_id}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table>")


def _summary(result: MappingResult) -> str:
    run = result.run
    data = run["data"]
    statuses = ", ".join(f"{k}: {v}" for k, v in run["landmark_status"].items())
    mapped = int(result.mapping["au"].notna().sum())
    return (
        "<ul>"
        f"<li>model <b>{html.escape(run['model']['name'])}</b> "
        f"({html.escape(str(run['model']['source']))})</li>"
        f"<li>data {html.escape(str(data['source']))}: {data['n_images']} images, "
        f"{data['n_mapped']} with landmarks, {data['n_skipped']} skipped</li>"
        f"<li>landmark status: {html.escape(statuses)}</li>"
        f"<li>layers {html.escape(', '.join(run['layers']))}; extremum point: "
        f"{html.escape(run['locate'])}; seed {run['seed']}; FDR {run['alpha']}</li>"
        f"<li><b>{mapped}</b> of {len(result.mapping)} channels mapped to an AU</li>"
        "</ul>"
    )


def dossier_channels(mapping: pd.DataFrame, limit: int) -> tuple[pd.DataFrame, int]:
    """The mapped channels that get a section (largest D first), and how many are left out.

    Parameters
    ----------
    mapping
        :attr:`interp_fer.mapping.MappingResult.mapping`.
    limit
        Sections at most.
    """
    mapped = mapping[mapping["au"].notna()].sort_values("distance", ascending=False,
                                                        kind="stable")
    return mapped.head(limit), max(0, len(mapped) - limit)


def _mapping_section(result: MappingResult, shown: pd.DataFrame) -> str:
    table = result.mapping.copy()
    row_class = table["au"].isna().map({True: "unmapped", False: "mapped"})
    table["au"] = table["au"].astype("string").fillna("")
    with_section = {(r.layer, int(r.channel)) for r in shown.itertuples(index=False)}
    hrefs = [f"#{channel_anchor(layer, channel)}" if (layer, int(channel)) in with_section
             else None for layer, channel in zip(table["layer"], table["channel"], strict=True)]
    return ("<h2>Mapping</h2>"
            f'<div class="scroll">{html_table(table, "mapping", row_class, {"channel": hrefs})}'
            "</div>")


def _heatmaps(result: MappingResult, label: str) -> list[str]:
    from .figures import plot_distance_heatmap

    return [_image(plot_distance_heatmap(result.scores, layer, alpha=result.run["alpha"]),
                   f"{label} heatmap of D for {layer}") for layer in result.run["layers"]]


def _grid_section(result: MappingResult, model: FERModel, dataset: ImageDataset,
                  shown: pd.DataFrame, channels_per_au: int) -> list[str]:
    """The projection grid, and per AU the links to its channels' sections."""
    from .figures import plot_au_projection_grid

    parts = ["<h2>Top channels per AU</h2>"]
    mapped_aus = [int(a) for a in result.run["aus"] if (result.mapping["au"] == a).any()]
    if not mapped_aus:
        parts.append('<p class="note">No channel is significantly mapped to an AU. The grid '
                     "shows, for each AU, the channels whose best (not significant) AU it is, "
                     "marked n.s.</p>")
    parts.append(_image(plot_au_projection_grid(model, result, dataset, mapped_aus or None,
                                                channels_per_au),
                        "deconvnet projections of the top channels of each AU"))
    items = []
    for au in mapped_aus:
        rows = shown[shown["au"] == au]
        links = ", ".join(
            f'<a href="#{channel_anchor(r.layer, r.channel)}">{html.escape(str(r.layer))} '
            f"#{int(r.channel)}</a> (D = {r.distance:.2f})" for r in rows.itertuples(index=False))
        items.append(f'<li id="au{au}">AU{au}: {links or "sections omitted (see below)"}</li>')
    if items:
        parts.append(f"<ul>{''.join(items)}</ul>")
    return parts


def _channel_sections(result: MappingResult, model: FERModel, dataset: ImageDataset,
                      shown: pd.DataFrame, omitted: int, faces: int, max_images: int
                      ) -> list[str]:
    """One section per shown channel, each with its dossier figure."""
    from .figures import expression_responses, plot_channel_dossier

    parts = ["<h2>Mapped channels</h2>"]
    if shown.empty:
        parts.append('<p class="note">No channel is significantly mapped: no channel sections.'
                     "</p>")
        return parts
    if omitted:
        parts.append(f'<p class="note">Sections for the {len(shown)} mapped channels of largest '
                     f"D; {omitted} other mapped channel(s) omitted (see the mapping table; "
                     "write_report(max_channels=...) shows more).</p>")
    responses: dict[str, ExpressionResponses | None] = {}
    for row in shown.itertuples(index=False):
        if row.layer not in responses:  # one forward pass per layer serves all its channels
            responses[row.layer] = expression_responses(
                model, result, dataset, row.layer, max_images=max_images) \
                if dataset.labelled else None
        caption = (f"{row.layer} channel {int(row.channel)}: AU{int(row.au)}, "
                   f"D = {row.distance:.2f} [{row.ci_low:.2f}, {row.ci_high:.2f}], "
                   f"q = {row.q_value:.2g}, hit rate {row.hit_rate:.2f} "
                   f"(chance {row.chance_rate:.2f})")
        figure = plot_channel_dossier(model, result, dataset, row.layer, int(row.channel),
                                      faces=faces, responses=responses[row.layer])
        parts.append(f'<section class="channel" id="{channel_anchor(row.layer, row.channel)}">'
                     f"<h3>{html.escape(str(row.layer))} channel {int(row.channel)} &rarr; "
                     f'<a href="#au{int(row.au)}">AU{int(row.au)}</a></h3>'
                     f"<p>{html.escape(caption)}</p>{_image(figure, caption)}</section>")
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
    """Write the run's ``report.html``.

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
        Top faces in each channel's dossier.
    control
        The same analysis on a weight-randomised copy, shown beside the trained model.
    max_channels
        Mapped channels that get their own section (the largest D first); the others are
        counted in a note.
    max_images
        Labelled faces in the forward pass behind each dossier's response per expression.
    """
    parts = [f"<h1>AU &harr; channel mapping: {html.escape(model.name)}</h1>", _summary(result),
             f'<p class="note">{html.escape(_LEGEND)}</p>']
    shown, omitted = dossier_channels(result.mapping, max_channels)
    parts.append(_mapping_section(result, shown))
    parts.append("<h2>AU &times; channel heatmaps</h2>")
    parts.extend(_heatmaps(result, "trained"))
    if result.top_images and result.faces is not None:
        parts.extend(_grid_section(result, model, dataset, shown, channels_per_au))
        parts.extend(_channel_sections(result, model, dataset, shown, omitted,
                                       faces_per_channel, max_images))
    else:
        parts.append('<p class="note">This result keeps no top faces: projections and channel '
                     "sections are left out.</p>")
    if control is not None:
        from .mapping import layer_summary

        parts.append("<h2>Control: randomised weights</h2>")
        mapped = int(control.mapping["au"].notna().sum())
        parts.append(f"<p>{mapped} of {len(control.mapping)} channels of the randomised "
                     "network are mapped (Adebayo et al. 2018). Per layer, trained beside "
                     "randomised: what the mapping finds in a network that learned nothing "
                     "comes from the images and the architecture.</p>")
        both = layer_summary(result).merge(layer_summary(control), on=["layer", "channels"],
                                           suffixes=("", " (randomised)"))
        parts.append(html_table(both, "control-summary"))
        parts.extend(_heatmaps(control, "control"))
    document = (
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>interp_fer mapping: {html.escape(model.name)}</title>"
        f"<style>{_STYLE}</style></head><body>{''.join(parts)}"
        f"<script>{_SORT_SCRIPT}</script></body></html>"
    )
    path = Path(path)
    path.write_text(document, encoding="utf-8")
    return path
