"""The AU <-> channel mapping: from per-pair scores to one row per channel.

:func:`mapping_table` applies Benjamini-Hochberg over *every* (layer, channel, AU) pair of the
run and assigns each channel the AU with the largest distance D among its significant pairs
(DESIGN.md: "the mapping of a channel is the AU with the largest D, when that D is
significant"). A channel with no significant pair keeps an empty ``au``; its best pair's
numbers are still reported (``best_au``), so a reader sees how close it came.
"""

from __future__ import annotations

import pandas as pd

from .statistics import benjamini_hochberg

MAPPING_COLUMNS = [
    "layer", "channel", "au", "distance", "ci_low", "ci_high", "p_value", "q_value",
    "stability", "hit_rate", "chance_rate", "iou", "n_images",
]
MEASURES = [
    "distance", "ci_low", "ci_high", "p_value", "p_empirical", "q_value", "stability",
    "hit_rate", "chance_rate", "mean_distance_iod", "iou", "ks", "cohen_d", "n_images",
]


def add_q_values(scores: pd.DataFrame) -> pd.DataFrame:
    """Return ``scores`` with a ``q_value`` column (BH over all rows with a p-value)."""
    scores = scores.copy()
    scores["q_value"] = benjamini_hochberg(scores["p_value"].to_numpy(dtype=float))
    return scores


def mapping_table(scores: pd.DataFrame, alpha: float = 0.05) -> pd.DataFrame:
    """One row per (layer, channel): its AU when significant, with that pair's measures.

    Parameters
    ----------
    scores
        One row per (layer, channel, AU) with at least the columns of
        :data:`MAPPING_COLUMNS` but ``q_value`` (added here when absent).
    alpha
        False discovery rate.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`MAPPING_COLUMNS` plus ``best_au`` (the AU of largest D, significant or
        not) and ``significant``.
    """
    if "q_value" not in scores:
        scores = add_q_values(scores)
    rows = []
    for (layer, channel), pairs in scores.groupby(["layer", "channel"], sort=False):
        significant = pairs[(pairs["q_value"] <= alpha) & (pairs["distance"] > 0)]
        chosen = significant if len(significant) else pairs
        best = chosen.loc[chosen["distance"].idxmax()] if chosen["distance"].notna().any() \
            else chosen.iloc[0]
        row = {column: best[column] for column in MAPPING_COLUMNS if column in best}
        row.update(layer=layer, channel=int(channel), best_au=best["au"],
                   au=best["au"] if len(significant) else None,
                   significant=bool(len(significant)))
        rows.append(row)
    table = pd.DataFrame(rows)
    table["au"] = table["au"].astype("Int64")
    return table[[*MAPPING_COLUMNS, "best_au", "significant"]]


def long_scores(scores: pd.DataFrame) -> pd.DataFrame:
    """The long table ``layer, channel, au, measure, value`` (``scores.csv``)."""
    present = [m for m in MEASURES if m in scores]
    long = scores.melt(id_vars=["layer", "channel", "au"], value_vars=present,
                       var_name="measure", value_name="value")
    return long.sort_values(["layer", "channel", "au", "measure"], kind="stable",
                            ignore_index=True)


def channels_for_au(mapping: pd.DataFrame, au: int) -> pd.DataFrame:
    """The channels mapped to ``au``, strongest first."""
    picked = mapping[mapping["au"] == au]
    return picked.sort_values("distance", ascending=False, ignore_index=True)


def summary_counts(mapping: pd.DataFrame) -> pd.Series:
    """Number of channels mapped to each AU (``none`` for unmapped channels)."""
    labels = mapping["au"].astype("string").fillna("none")
    return labels.value_counts().rename("channels")

