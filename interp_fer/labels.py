"""What the faces really do: AU presence from AU labels or from expression labels.

With labels, the mapping adds per (channel, AU) the AUC of the channel's peak response for
"AU present vs absent" (DESIGN.md, "Labels, when the user has them"), so the landmark-based
mapping can be checked against the faces, and per (channel, expression) the one-vs-rest AUC.

AU presence comes, per image, from its AU columns when it has them (a value > 0 is present;
CK+ FACS codes, DISFA intensities), else from its expression through the EMFACS prototypes
below (Friesen & Ekman 1983, as summarised in DESIGN.md). Expression prototypes are a
coarse proxy: a "happy" face is taken to show AU6 and AU12 and no other AU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .data import Record

#: Prototype AUs of each expression (EMFACS). Neutral shows none. Contempt is one-sided
#: (AU12 + AU14 on one side); one-sidedness is not modelled.
EMFACS_PROTOTYPES: dict[str, tuple[int, ...]] = {
    "happy": (6, 12),
    "sad": (1, 4, 15),
    "surprise": (1, 2, 5, 26),
    "fear": (1, 2, 4, 5, 7, 20, 26),
    "anger": (4, 5, 7, 23),
    "disgust": (9, 15, 16),
    "contempt": (12, 14),
    "neutral": (),
}

_ALIASES = {
    "happiness": "happy", "joy": "happy", "sadness": "sad", "surprised": "surprise",
    "fearful": "fear", "afraid": "fear", "angry": "anger", "disgusted": "disgust",
    "contemptuous": "contempt", "calm": "neutral",
}


#: AU cell words (case-insensitive) and the value they stand for.
AU_WORDS = {"yes": 1.0, "true": 1.0, "present": 1.0, "no": 0.0, "false": 0.0, "absent": 0.0}


def canonical_expression(name: str) -> str:
    """An expression name lower-cased with its alias resolved (``"Angry"`` -> ``"anger"``)."""
    name = name.strip().lower()
    return _ALIASES.get(name, name)


def class_index(name: str | None, class_names: Sequence[str]) -> int | None:
    """Index of the expression ``name`` among ``class_names`` (case and aliases ignored).

    ``"happiness"`` finds ``"happy"``, ``"anger"`` finds ``"angry"``; None when absent.
    """
    if not name:
        return None
    wanted = canonical_expression(name)
    for index, candidate in enumerate(class_names):
        if canonical_expression(candidate) == wanted:
            return index
    return None


def parse_au_value(text: str) -> float | None:
    """An AU cell as a number: intensities and 0/1 as numbers, yes/no, true/false,
    present/absent as 1/0 (any case); None for an empty cell (unknown).

    Raises
    ------
    ValueError
        For anything else (the caller names the file, row and column).
    """
    text = text.strip()
    if not text:
        return None
    word = AU_WORDS.get(text.lower())
    if word is not None:
        return word
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number, 0/1, yes/no, true/false or "
                         "present/absent") from None


def prototype_name(label_name: str | None) -> str | None:
    """The EMFACS prototype an expression name refers to, or None when there is none."""
    if not label_name:
        return None
    name = canonical_expression(label_name)
    return name if name in EMFACS_PROTOTYPES else None


def au_presence(records: Sequence[Record], aus: Sequence[int]) -> np.ndarray:
    """Whether each AU is present on each face: (N, A) with 1.0, 0.0 or NaN (unknown).

    Parameters
    ----------
    records
        The images' records (:class:`interp_fer.data.Record`).
    aus
        AU numbers.

    Notes
    -----
    A record with AU columns is read from them: an AU with a value > 0 is present, an AU
    without a column is unknown. A record without AU columns is read from its expression's
    EMFACS prototype, and is unknown when the expression has no prototype.
    """
    out = np.full((len(records), len(aus)), np.nan)
    for i, record in enumerate(records):
        if record.aus:
            for j, au in enumerate(aus):
                if au in record.aus and np.isfinite(record.aus[au]):
                    out[i, j] = float(record.aus[au] > 0)
            continue
        name = prototype_name(record.label_name)
        if name is not None:
            out[i] = np.isin(np.asarray(aus), EMFACS_PROTOTYPES[name]).astype(np.float64)
    return out


def has_labels(records: Sequence[Record]) -> bool:
    """True when some record carries AU columns or an expression label."""
    return any(r.aus or r.label is not None or r.label_name for r in records)
