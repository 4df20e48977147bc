"""The self-contained HTML report of a mapping run (``report.html``).

Derived from the run's tables (CSV first, HTML from it, as in dissect): a summary of what was
run, the mapping table (sortable), an AU x channel heatmap of D per layer, and for each AU its
strongest channels with their deconvnet projections on the faces that excite them most.
Figures are embedded as PNG data URIs, so the file can be mailed or archived alone.
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from .data import ImageDataset
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


def figure_data_uri(figure: Figure, dpi: int = 150) -> str:
    """PNG of a matplotlib figure as a ``data:`` URI."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def html_table(frame: pd.DataFrame, table_id: str, row_class: pd.Series | None = None) -> str:
    """A sortable HTML table; numbers shown rounded, sorted by their full value."""
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
            cells.append(f'<td class="{kind}" data-value="{html.escape(raw)}">'
                         f"{html.escape(shown)}</td>")
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


def _top_channels(result: MappingResult, au: int, count: int) -> pd.DataFrame:
    picked = result.mapping[result.mapping["au"] == au]
    return picked.sort_values("distance", ascending=False).head(count)


def _faces_of(result: MappingResult, model: FERModel, dataset: ImageDataset, layer: str,
              channel: int, count: int):
    from .preprocessing import Crop

    top = result.top_images[layer]["indices"][channel]
    crops = result.faces.set_index("index")
    images = []
    for index in [int(i) for i in top if i >= 0][:count]:
        row = crops.loc[index]
        sample = dataset.load(dataset.records[index])
        if sample.image is None:
            continue
        crop = Crop(int(row.crop_top), int(row.crop_left), int(row.crop_height),
                    int(row.crop_width))
        images.append(crop.apply(sample.image))
    return model.preprocess(images).to(model.device) if images else None


def write_report(
    result: MappingResult,
    model: FERModel,
    dataset: ImageDataset,
    path: str | os.PathLike,
    *,
    channels_per_au: int = 3,
    faces_per_channel: int = 4,
    control: MappingResult | None = None,
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
    channels_per_au, faces_per_channel
        How many channels per AU, and faces per channel, to show.
    control
        The same analysis on a weight-randomised copy, shown beside the trained model.
    """
    from .figures import plot_channel_faces, plot_distance_heatmap

    alpha = result.run["alpha"]
    parts = [f"<h1>AU &harr; channel mapping: {html.escape(model.name)}</h1>", _summary(result)]
    parts.append(
        '<p class="note">D: signed distance between the channel\'s peak response inside the AU '
        "region and elsewhere on the face (Wasserstein-1 / pooled SD by default); p-value from "
        "random placements of the region on the same face; q: Benjamini-Hochberg over all "
        "pairs; stability: share of bootstrap resamples choosing the same AU; hit rate: share "
        "of images whose extremum point falls within the region (chance rate beside it). "
        "Click a column to sort.</p>")
    parts.append("<h2>Mapping</h2>")
    table = result.mapping.copy()
    row_class = table["au"].isna().map({True: "unmapped", False: "mapped"})
    table["au"] = table["au"].astype("string").fillna("")
    parts.append(f'<div class="scroll">{html_table(table, "mapping", row_class)}</div>')
    parts.append("<h2>AU &times; channel heatmaps</h2>")
    for layer in result.run["layers"]:
        figure = plot_distance_heatmap(result.scores, layer, alpha=alpha)
        parts.append(f'<img alt="heatmap of D for {html.escape(layer)}" '
                     f'src="{figure_data_uri(figure)}">')
    parts.append("<h2>Top channels per AU</h2>")
    for au in result.run["aus"]:
        top = _top_channels(result, au, channels_per_au)
        parts.append(f'<h3 id="au{au}">AU{au}</h3>')
        if top.empty:
            parts.append('<p class="note">no channel significantly mapped to this AU</p>')
            continue
        for _, row in top.iterrows():
            inputs = _faces_of(result, model, dataset, row["layer"], int(row["channel"]),
                               faces_per_channel)
            caption = (f"{row['layer']} channel {int(row['channel'])}: D = {row['distance']:.2f} "
                       f"[{row['ci_low']:.2f}, {row['ci_high']:.2f}], q = {row['q_value']:.2g}, "
                       f"hit rate {row['hit_rate']:.2f} (chance {row['chance_rate']:.2f})")
            parts.append(f"<p>{html.escape(caption)}</p>")
            if inputs is not None:
                figure = plot_channel_faces(model, inputs, row["layer"], int(row["channel"]))
                parts.append(f'<img alt="{html.escape(caption)}" src="{figure_data_uri(figure)}">')
    if control is not None:
        parts.append("<h2>Control: randomised weights</h2>")
        mapped = int(control.mapping["au"].notna().sum())
        parts.append(f"<p>{mapped} of {len(control.mapping)} channels of the randomised "
                     "network are mapped (Adebayo et al. 2018).</p>")
        for layer in control.run["layers"]:
            figure = plot_distance_heatmap(control.scores, layer, alpha=alpha)
            parts.append(f'<img alt="control heatmap {html.escape(layer)}" '
                         f'src="{figure_data_uri(figure)}">')
    document = (
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>interp_fer mapping: {html.escape(model.name)}</title>"
        f"<style>{_STYLE}</style></head><body>{''.join(parts)}"
        f"<script>{_SORT_SCRIPT}</script></body></html>"
    )
    path = Path(path)
    path.write_text(document, encoding="utf-8")
    return path
