"""AU activity measured from landmarks: reviewed proxies in ``landmarks/au_activity.json``.

Where a dataset has no AU codes, how active an Action Unit is on a face is estimated from its
68 dlib landmarks (0-based iBUG indices) with simple geometric proxies (Tian, Kanade & Cohn
2001): inner-brow height for AU1, lip-corner height and mouth width for AU12, the inner-lip
gap for AU25, and so on. Each proxy is data: a formula written with a small vocabulary of
operations, a sign and its sources, validated when loaded (:func:`load_activity_proxies`).

The face frame: the landmarks are rotated so that the eye line (eye centres: means of points
36-41 and 42-47) is horizontal, and lengths are divided by the inter-ocular distance (IOD);
``y`` points towards the chin. Operations on point sets (each the mean of its landmarks):

* ``vdist(upper, lower)``: ``y(lower) - y(upper)`` in IOD;
* ``hdist(a, b)``: ``|x(b) - x(a)|`` in IOD;
* ``dist(a, b)``: Euclidean distance in IOD;
* ``ratio(num, den)``: one of the above over another (dimensionless).

A formula is a weighted sum of such terms; ``activity = sign * formula`` so that larger means
more active. A bilateral proxy is written for the image-left side and averaged with its
mirror image. Activities are therefore invariant to in-plane rotation, translation and scale
of the landmarks, and to mirroring the face.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import numpy as np

from .faces import MIRROR_INDEX, N_LANDMARKS, eye_centres
from .landmark_files import (
    check_au_key,
    check_fields,
    check_sources,
    field_error,
    load_data_file,
)

DATA_FILE = "au_activity.json"

#: AU numbers the default proxy file covers (a literal, so that importing reads no file; a test
#: keeps it equal to the file).
ACTIVITY_AUS: tuple[int, ...] = (1, 2, 4, 5, 6, 7, 9, 12, 15, 17, 20, 23, 25, 26, 27)

_DISTANCE_OPS = {"vdist": ("upper", "lower"), "hdist": ("a", "b"), "dist": ("a", "b")}
_ENTRY_FIELDS = ({"name", "bilateral", "formula", "sign", "unit", "description", "sources"},
                 {"notes"})
_META_FIELDS = {"version", "description", "conventions", "sources"}
_MAX_WEIGHT = 100.0
#: A ratio's denominator must be at least this long on the reference face (IOD): a shorter
#: one (e.g. the width between two points above one another) divides by noise.
_MIN_DENOMINATOR = 0.1


class ActivityProxyError(ValueError):
    """The AU activity data is invalid; the message names the AU and the field."""


def _err(au: str, field: str, problem: str) -> ActivityProxyError:
    return field_error(ActivityProxyError, au, field, problem)


_check_fields = partial(check_fields, error=ActivityProxyError)


# --------------------------------------------------------------------------------------------
# The face frame and the operations
# --------------------------------------------------------------------------------------------


def face_frame_points(landmarks: np.ndarray) -> np.ndarray:
    """Landmarks in the face frame: eye line horizontal, IOD units, origin between the eyes.

    Parameters
    ----------
    landmarks
        ``(N, 68, 2)`` ``(x, y)`` pixels (any image frame; y down).

    Returns
    -------
    numpy.ndarray
        ``(N, 68, 2)`` float64: ``x`` along the eye line from the image-left eye towards the
        image-right eye, ``y`` perpendicular to it towards the chin, in IOD. Faces with
        coincident eye centres give NaN.
    """
    lm = np.asarray(landmarks, dtype=float)
    left, right = eye_centres(lm)
    d = right - left
    iod = np.linalg.norm(d, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ex = d / iod[..., None]
    ey = np.stack([-ex[..., 1], ex[..., 0]], axis=-1)  # ex turned 90 degrees, towards the chin
    rel = lm - ((left + right) / 2)[..., None, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        x = np.einsum("...kd,...d->...k", rel, ex) / iod[..., None]
        y = np.einsum("...kd,...d->...k", rel, ey) / iod[..., None]
    return np.stack([x, y], axis=-1)


def _mean_point(pts: np.ndarray, idx: Sequence[int]) -> np.ndarray:
    return pts[:, list(idx), :].mean(axis=1)


def _term_value(term: Mapping[str, Any], pts: np.ndarray, mirror: bool) -> np.ndarray:
    """One term (without its weight) on face-frame points ``(N, 68, 2)``: ``(N,)``."""
    op = term["op"]
    if op == "ratio":
        num = _term_value(term["num"], pts, mirror)
        den = _term_value(term["den"], pts, mirror)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    first, second = (_side(term[k], mirror) for k in _DISTANCE_OPS[op])
    p, q = _mean_point(pts, first), _mean_point(pts, second)
    if op == "vdist":
        return q[:, 1] - p[:, 1]
    if op == "hdist":
        return np.abs(q[:, 0] - p[:, 0])
    return np.linalg.norm(q - p, axis=-1)


def _side(indices: Sequence[int], mirror: bool) -> list[int]:
    return [MIRROR_INDEX[i] for i in indices] if mirror else list(indices)


def _formula_value(formula: Sequence[Mapping[str, Any]], pts: np.ndarray,
                   mirror: bool) -> np.ndarray:
    return sum(float(t.get("weight", 1.0)) * _term_value(t, pts, mirror) for t in formula)


def _term_points(term: Mapping[str, Any]) -> set[int]:
    if term["op"] == "ratio":
        return _term_points(term["num"]) | _term_points(term["den"])
    return {i for k in _DISTANCE_OPS[term["op"]] for i in term[k]}


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _check_point_set(value: Any, au: str, field: str) -> None:
    if not isinstance(value, list) or not value:
        raise _err(au, field, f"must be a non-empty list of landmark indices, got {value!r}")
    for i in value:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < N_LANDMARKS:
            raise _err(au, field, f"unknown landmark index {i!r} (0-based iBUG indices are "
                       "0..67)")
    if len(set(value)) != len(value):
        raise _err(au, field, f"repeats a landmark: {value}")


def _check_term(term: Any, au: str, field: str, *, weighted: bool) -> str:
    """Validate one term; return its unit ('IOD' or 'ratio')."""
    op = term.get("op") if isinstance(term, Mapping) else None
    if op not in (*_DISTANCE_OPS, "ratio"):
        raise _err(au, f"{field}.op", f"must be one of vdist, hdist, dist, ratio, got {op!r}")
    optional = {"weight"} if weighted else set()
    if op == "ratio":
        _check_fields(term, {"op", "num", "den"}, optional, au, field)
        for part in ("num", "den"):
            sub = term[part]
            if isinstance(sub, Mapping) and sub.get("op") == "ratio":
                raise _err(au, f"{field}.{part}", "a ratio's parts must be distances "
                           "(vdist, hdist, dist), not ratios")
            _check_term(sub, au, f"{field}.{part}", weighted=False)
        unit = "ratio"
    else:
        a, b = _DISTANCE_OPS[op]
        _check_fields(term, {"op", a, b}, optional, au, field)
        _check_point_set(term[a], au, f"{field}.{a}")
        _check_point_set(term[b], au, f"{field}.{b}")
        if sorted(term[a]) == sorted(term[b]):
            raise _err(au, field, f"'{a}' and '{b}' are the same points: the distance is 0")
        unit = "IOD"
    if weighted and "weight" in term:
        w = term["weight"]
        if (isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w)
                or w == 0 or abs(w) > _MAX_WEIGHT):
            raise _err(au, f"{field}.weight", f"must be a non-zero number within "
                       f"+-{_MAX_WEIGHT:g}, got {w!r}")
    return unit


def _is_symmetric(formula: Sequence[Mapping[str, Any]], reference: np.ndarray) -> bool:
    """Whether the formula gives the same value on a face and on its mirror image."""
    rng = np.random.default_rng(0)
    face = reference[None] + rng.normal(0, 0.05, (4, N_LANDMARKS, 2))
    pts = face_frame_points(face)
    return bool(np.allclose(_formula_value(formula, pts, False),
                            _formula_value(formula, pts, True), atol=1e-9))


def validate(data: Any, reference_face: np.ndarray | None = None) -> None:
    """Check AU activity data; raise :class:`ActivityProxyError` naming the AU and field.

    Checks: the ``_meta`` block (version, conventions with unit ``IOD``, sources); per AU:
    the key (``AU`` + number, no duplicate number), required and unknown fields, FACS name,
    formula terms from the vocabulary with landmark indices in 0..67, weights, ``sign`` +1 or
    -1, ``unit`` matching the terms (``IOD`` for distances, ``ratio`` for ratios), sources
    that ``_meta.sources`` defines, a left/right symmetric formula when not ``bilateral``,
    and, on the reference face, a finite value and ratio denominators of at least 0.1 IOD.

    Parameters
    ----------
    data
        Parsed JSON content.
    reference_face
        ``(68, 2)`` points of a typical face for the value checks; default the reference face
        of the AU regions (``au_regions.json``).
    """
    if not isinstance(data, Mapping):
        raise ActivityProxyError("AU activity data must be a JSON object")
    meta = data.get("_meta")
    _check_fields(meta, _META_FIELDS, set(), "_meta", "_meta")
    conventions = meta["conventions"]
    if not isinstance(conventions, Mapping) or conventions.get("unit") != "IOD":
        raise _err("_meta", "conventions.unit", "must be 'IOD' (lengths in inter-ocular "
                   "distances)")
    if not isinstance(meta["sources"], Mapping) or not meta["sources"]:
        raise _err("_meta", "sources", "must map source keys to references")
    if reference_face is None:
        from .au_regions import load_au_regions

        reference_face = load_au_regions().reference_face
    ref_pts = face_frame_points(np.asarray(reference_face, dtype=float)[None])
    aus = [k for k in data if k != "_meta"]
    if not aus:
        raise ActivityProxyError("no AU activity proxies defined")
    seen: dict[int, str] = {}
    for au in aus:
        check_au_key(au, seen, error=ActivityProxyError)
        _check_entry(au, data[au], meta, ref_pts, reference_face)


def _check_entry(au: str, spec: Any, meta: Mapping[str, Any], ref_pts: np.ndarray,
                 reference_face: np.ndarray) -> None:
    _check_fields(spec, *_ENTRY_FIELDS, au, "(proxy)")
    for field in ("name", "description"):
        if not isinstance(spec[field], str) or not spec[field].strip():
            raise _err(au, field, "must be a non-empty string")
    if not isinstance(spec["bilateral"], bool):
        raise _err(au, "bilateral", f"must be true or false, got {spec['bilateral']!r}")
    if spec["sign"] not in (1, -1) or isinstance(spec["sign"], bool):
        raise _err(au, "sign", f"must be 1 or -1 (larger activity = more active), got "
                   f"{spec['sign']!r}")
    formula = spec["formula"]
    if not isinstance(formula, list) or not formula:
        raise _err(au, "formula", "must be a non-empty list of terms")
    units = {_check_term(t, au, f"formula[{k}]", weighted=True) for k, t in enumerate(formula)}
    if len(units) > 1:
        raise _err(au, "formula", "mixes distances (IOD) and ratios; use one kind of term")
    (unit,) = units
    if spec["unit"] != unit:
        raise _err(au, "unit", f"is {spec['unit']!r} but the terms give {unit!r}")
    check_sources(spec["sources"], meta["sources"], au, error=ActivityProxyError)
    if not spec["bilateral"] and not _is_symmetric(formula, reference_face):
        raise _err(au, "formula", "is not left/right symmetric; write it for one side and "
                   "set bilateral: true")
    for k, term in enumerate(formula):
        if term["op"] == "ratio":
            for m in (False, True):
                den = float(_term_value(term["den"], ref_pts, m)[0])
                if not den >= _MIN_DENOMINATOR:
                    raise _err(au, f"formula[{k}].den", f"is {den:.3f} IOD on the reference "
                               f"face (below {_MIN_DENOMINATOR}): the ratio divides by noise")
    value = _formula_value(formula, ref_pts, False)
    if not np.isfinite(value).all():
        raise _err(au, "formula", "is not finite on the reference face")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ActivityProxy:
    """One AU's activity proxy (from the data file)."""

    au: str
    number: int
    name: str
    bilateral: bool
    formula: tuple[Mapping[str, Any], ...]
    sign: int
    unit: str
    description: str
    sources: tuple[str, ...]
    notes: str = ""

    @property
    def landmarks(self) -> tuple[int, ...]:
        """Landmarks the proxy uses, both sides for bilateral proxies."""
        used = set().union(*(_term_points(t) for t in self.formula))
        if self.bilateral:
            used |= {MIRROR_INDEX[i] for i in used}
        return tuple(sorted(used))

    def value(self, points: np.ndarray) -> np.ndarray:
        """Activity on face-frame points (:func:`face_frame_points`), ``(N, 68, 2)`` -> ``(N,)``."""
        v = _formula_value(self.formula, points, False)
        if self.bilateral:
            v = (v + _formula_value(self.formula, points, True)) / 2
        return self.sign * v


class ActivityProxies:
    """Validated AU activity proxies.

    Parameters
    ----------
    data
        Parsed ``au_activity.json`` content (validated here).
    reference_face
        See :func:`validate`.
    """

    def __init__(self, data: Mapping[str, Any], reference_face: np.ndarray | None = None
                 ) -> None:
        validate(data, reference_face)
        self.data = copy.deepcopy(dict(data))
        self.meta = self.data["_meta"]
        proxies = [ActivityProxy(
            au=au, number=int(au[2:]), name=spec["name"], bilateral=spec["bilateral"],
            formula=tuple(spec["formula"]), sign=int(spec["sign"]), unit=spec["unit"],
            description=spec["description"], sources=tuple(spec["sources"]),
            notes=spec.get("notes", "")) for au, spec in self.data.items() if au != "_meta"]
        proxies.sort(key=lambda p: p.number)
        self.proxies = {p.number: p for p in proxies}

    @classmethod
    def from_file(cls, path: str | Path) -> ActivityProxies:
        """Load and validate a proxy file (errors name the file)."""
        return load_data_file(path, DATA_FILE, cls, "AU activity data", ActivityProxyError)

    @property
    def aus(self) -> tuple[int, ...]:
        """AU numbers covered, ascending."""
        return tuple(self.proxies)

    def __getitem__(self, au: int | str) -> ActivityProxy:
        number = _au_number(au)
        if number not in self.proxies:
            raise KeyError(f"no activity proxy for AU{number}; defined: "
                           f"{', '.join(f'AU{a}' for a in self.proxies)}")
        return self.proxies[number]

    def __iter__(self):
        return iter(self.proxies.values())

    def __len__(self) -> int:
        return len(self.proxies)


def _au_number(au: int | str) -> int:
    if isinstance(au, str) and au.upper().startswith("AU") and au[2:].isdigit():
        return int(au[2:])
    if isinstance(au, int | np.integer) and not isinstance(au, bool):
        return int(au)
    raise KeyError(f"not an AU: {au!r} (give a number, e.g. 12, or 'AU12')")


@lru_cache(maxsize=1)
def _default_proxies() -> ActivityProxies:
    return load_data_file(None, DATA_FILE, ActivityProxies, "AU activity data",
                          ActivityProxyError)


def load_activity_proxies(path: str | Path | None = None) -> ActivityProxies:
    """The AU activity proxies, validated.

    Parameters
    ----------
    path
        A proxy file; default the one installed with the package (read once, then cached).

    Returns
    -------
    ActivityProxies
    """
    return _default_proxies() if path is None else ActivityProxies.from_file(path)


# --------------------------------------------------------------------------------------------
# Activity
# --------------------------------------------------------------------------------------------


def au_activity(landmarks: np.ndarray, aus: Sequence[int] | None = None,
                proxies: ActivityProxies | None = None) -> np.ndarray:
    """AU activity of each face, measured from its landmarks.

    Parameters
    ----------
    landmarks
        ``(N, 68, 2)`` ``(x, y)`` pixels in any image frame (or one face, ``(68, 2)``).
    aus
        AU numbers (``12`` or ``"AU12"``); default every AU the proxies cover.
    proxies
        :class:`ActivityProxies`; default the package's (:func:`load_activity_proxies`).

    Returns
    -------
    numpy.ndarray
        ``(N, A)`` float64 in IOD (or dimensionless for ratio proxies), larger = more active.
        A face whose landmarks are not all finite, or whose eye centres coincide, gives a row
        of NaN; a ratio whose divisor is 0 on a face gives NaN there.
    """
    proxies = proxies or load_activity_proxies()
    lm = np.asarray(landmarks, dtype=float)
    if lm.ndim == 2:
        lm = lm[None]
    if lm.ndim != 3 or lm.shape[1:] != (N_LANDMARKS, 2):
        raise ValueError(f"expected (N, 68, 2) landmarks, got shape {lm.shape}")
    chosen = [proxies[a] for a in (proxies.aus if aus is None else aus)]
    ok = np.isfinite(lm).all(axis=(1, 2))
    out = np.full((len(lm), len(chosen)), np.nan)
    if ok.any():
        pts = face_frame_points(lm[ok])
        good = np.isfinite(pts).all(axis=(1, 2))
        values = np.stack([p.value(pts) for p in chosen], axis=1) if chosen else \
            np.zeros((len(pts), 0))
        values[~good] = np.nan
        out[ok] = values
    return out


def activity_frame(landmarks: np.ndarray, aus: Sequence[int] | None = None,
                   index: Sequence | None = None, *,
                   proxies: ActivityProxies | None = None) -> Any:
    """:func:`au_activity` as a table with columns ``AU1``, ``AU2``, ...

    Parameters
    ----------
    landmarks
        ``(N, 68, 2)`` ``(x, y)`` pixels.
    aus
        AU numbers; default every AU the proxies cover.
    index
        Row labels (e.g. image keys); default ``0..N-1``.
    proxies
        :class:`ActivityProxies`; default the package's.

    Returns
    -------
    pandas.DataFrame
        ``N`` rows, one float column per AU.
    """
    import pandas as pd

    proxies = proxies or load_activity_proxies()
    chosen = [proxies[a].number for a in (proxies.aus if aus is None else aus)]
    values = au_activity(landmarks, chosen, proxies)
    return pd.DataFrame(values, columns=[f"AU{a}" for a in chosen], index=index)


def subtract_neutral(activity: np.ndarray, subject: Sequence, neutral: np.ndarray
                     ) -> np.ndarray:
    """Activity relative to each subject's neutral face.

    For datasets with subject ids and neutral frames (e.g. CK+'s first frames): the proxies
    measure face shape as well as expression (a long face has a large AU26 value at rest),
    and subtracting the subject's own neutral removes the shape part.

    Parameters
    ----------
    activity
        ``(N, A)`` from :func:`au_activity`.
    subject
        ``N`` subject ids (any hashable values).
    neutral
        ``(N,)`` bool: which rows are neutral frames.

    Returns
    -------
    numpy.ndarray
        ``(N, A)``: each row minus the mean (ignoring NaN) of its subject's neutral rows.
        Rows of a subject without a finite neutral frame are NaN.
    """
    act = np.asarray(activity, dtype=float)
    neutral = np.asarray(neutral, dtype=bool)
    subject = list(subject)
    if act.ndim != 2 or len(subject) != len(act) or neutral.shape != (len(act),):
        raise ValueError(f"activity {act.shape}, {len(subject)} subject ids and neutral "
                         f"{neutral.shape} must all have one entry per image")
    out = np.full_like(act, np.nan)
    codes: dict[Any, list[int]] = {}
    for i, s in enumerate(subject):
        codes.setdefault(s, []).append(i)
    for rows in codes.values():
        rows_arr = np.array(rows)
        base = act[rows_arr[neutral[rows_arr]]]
        if len(base) == 0:
            continue
        finite = np.isfinite(base)
        counts = finite.sum(axis=0)
        mean = np.where(counts > 0, np.where(finite, base, 0).sum(axis=0) / np.maximum(counts, 1),
                        np.nan)
        out[rows_arr] = act[rows_arr] - mean
    return out


def _auc(positive: np.ndarray, score: np.ndarray) -> float:
    """One-vs-rest ROC AUC (Mann-Whitney U over n1 n0; ties count half); NaN scores dropped."""
    from scipy.stats import rankdata

    keep = np.isfinite(score)
    positive, score = positive[keep], score[keep]
    n1 = int(positive.sum())
    n0 = len(positive) - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def separation_table(activity: np.ndarray, expressions: Sequence[str | None],
                     aus: Sequence[int] = ACTIVITY_AUS) -> Any:
    """How well each proxy separates expressions: one-vs-rest ROC AUC per AU.

    The check that a proxy measures its AU where only expression labels exist: faces whose
    expression's EMFACS prototype (:data:`interp_fer.labels.EMFACS_PROTOTYPES`) holds the AU
    should have larger activity than the others (AUC > 0.5).

    Parameters
    ----------
    activity
        ``(N, A)`` from :func:`au_activity`, columns in the order of ``aus``.
    expressions
        ``N`` expression names (``"happy"``, ``"angry"``, ...; aliases as
        :func:`interp_fer.labels.prototype_name` reads them); None or unknown names are
        left out.
    aus
        The AU of each column; default :data:`ACTIVITY_AUS`.

    Returns
    -------
    pandas.DataFrame
        One row per AU: ``au``, ``prototype_of`` (expressions whose prototype holds it, joined
        by ``+``; empty when none), ``auc_prototype`` (those against the rest; NaN when none),
        then one column per expression present: that expression against the rest.
    """
    import pandas as pd

    from .labels import EMFACS_PROTOTYPES, prototype_name

    act = np.asarray(activity, dtype=float)
    names = np.array([prototype_name(e) or "" for e in expressions], dtype=object)
    if act.ndim != 2 or act.shape != (len(names), len(aus)):
        raise ValueError(f"activity {act.shape} must be (N, A) for {len(names)} expressions and "
                         f"{len(aus)} AUs")
    known = names != ""
    act, names = act[known], names[known]
    present = sorted(set(names))
    rows = []
    for j, au in enumerate(aus):
        holders = [e for e in present if int(au) in EMFACS_PROTOTYPES[e]]
        positive = np.isin(names, holders)
        row: dict[str, Any] = {"au": int(au), "prototype_of": "+".join(holders),
                               "auc_prototype": _auc(positive, act[:, j])}
        for e in present:
            row[e] = _auc(names == e, act[:, j])
        rows.append(row)
    return pd.DataFrame(rows)
