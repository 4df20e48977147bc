"""AU regions: the data file's schema and validation errors, and invariants of the geometry
(inside the face, left/right mirror symmetry, sizes within bounds, anchoring to the right
landmarks, masks that agree across resolutions and grids)."""

from __future__ import annotations

import copy
import csv
import json
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest
from _helpers import assert_rejected, broken

from interp_fer.au_regions import (
    AURegionError,
    AURegions,
    FaceFrame,
    grid_points,
    load_au_regions,
    load_sham_regions,
    polygons_mask,
    region_clipping,
)
from interp_fer.faces import MIRROR_INDEX, LandmarkDetector, mirror_landmarks

REPO = Path(__file__).resolve().parents[1]
REQUIRED = [1, 2, 4, 5, 6, 7, 9, 10, 12, 14, 15, 17, 20, 23, 25, 26, 27]

#: Landmarks each AU may be anchored to, from anatomy (FACS): an index slip in the data file
#: (e.g. 47 for 48, or 1-based indices) lands outside these sets.
ALLOWED_ANCHORS = {
    "AU01": {20, 21, 22, 23},                     # inner brows
    "AU02": {17, 18, 19, 24, 25, 26},             # outer brows
    "AU04": set(range(19, 25)) | {27},            # inner brows, nose root
    "AU05": set(range(36, 48)),                   # eyes (upper lids)
    "AU06": set(range(36, 48)),                   # eyes (lower lids) -> cheek below
    "AU07": set(range(36, 48)),                   # eyes (lower lids)
    "AU09": set(range(27, 36)) | {39, 42},        # nose, inner eye corners
    "AU10": set(range(31, 36)) | set(range(48, 55)),  # nostrils, upper lip
    "AU12": {48, 54},                             # lip corners
    "AU14": {48, 54},
    "AU15": {48, 54},
    "AU16": set(range(54, 60)) | {48},            # lower lip
    "AU17": set(range(5, 12)) | set(range(54, 60)),  # chin, lower lip
    "AU20": {3, 4, 12, 13, 48, 54},              # lip corners, jaw beside them
    "AU23": set(range(48, 68)),                   # lips
    "AU25": set(range(60, 68)),                   # inner lip contour
    "AU26": set(range(3, 14)),                    # jaw line
    "AU27": {1, 2, 3, 13, 14, 15},                # jaw contour beside the ramus
}


@pytest.fixture(scope="module")
def regions() -> AURegions:
    return load_au_regions()


@pytest.fixture(scope="module")
def raw() -> dict:
    return json.loads((REPO / "landmarks" / "au_regions.json").read_text())


@pytest.fixture(scope="module")
def symmetric_face(regions) -> tuple[np.ndarray, tuple[int, int]]:
    """The reference face (left/right symmetric) at IOD = 120 px, centred on the pixel grid so
    that mirroring the image maps pixel centres onto pixel centres."""
    shape = (420, 361)
    lm = regions.reference_face * 120 + [(shape[1] - 1) / 2, 150]
    return lm, shape


@pytest.fixture(scope="module")
def astronaut_landmarks() -> tuple[np.ndarray, tuple[int, int]]:
    from skimage import data

    image = data.astronaut()
    return LandmarkDetector()(image).landmarks, image.shape[:2]


@pytest.fixture(scope="module")
def fer_landmarks(fer2013) -> np.ndarray:
    """Detected landmarks of 150 FER2013 test faces (every 40th image, detection path)."""
    from PIL import Image

    with open(fer2013 / "test_labels.csv") as handle:
        paths = [row["path"] for row in csv.DictReader(handle)][::40][:150]
    imgs = [np.asarray(Image.open(fer2013 / p).convert("L")) for p in paths]
    found = [r[0] for r in LandmarkDetector().detect_many(imgs)]
    return np.array([f.landmarks for f in found if f.status == "detected"])


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def distance_to_rings(points: np.ndarray, rings: list[np.ndarray]) -> np.ndarray:
    """Distance of each (x, y) point to the nearest edge of any closed ring."""
    best = np.full(len(points), np.inf)
    for ring in rings:
        a, b = ring, np.roll(ring, -1, axis=0)
        ab = b - a
        t = ((points[:, None] - a) * ab).sum(-1) / np.maximum((ab**2).sum(-1), 1e-12)
        near = a + np.clip(t, 0, 1)[..., None] * ab
        best = np.minimum(best, np.linalg.norm(points[:, None] - near, axis=-1).min(axis=1))
    return best


def similarity(lm: np.ndarray, angle_deg: float, scale: float, shift) -> np.ndarray:
    t = np.radians(angle_deg)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    return lm @ rot.T * scale + np.asarray(shift)


# -- the data file -------------------------------------------------------------------------------


def test_installed_data_is_the_reviewed_file(regions, raw):
    """The package reads landmarks/au_regions.json through interp_fer.landmarks."""
    packaged = json.loads(files("interp_fer.landmarks").joinpath("au_regions.json").read_text())
    assert packaged == raw
    shams = json.loads(files("interp_fer.landmarks").joinpath("sham_regions.json").read_text())
    assert shams == json.loads((REPO / "landmarks" / "sham_regions.json").read_text())
    setup = (REPO / "setup.cfg").read_text()
    assert "interp_fer.landmarks = landmarks" in setup and "*.json" in setup


def test_required_aus_are_defined_with_their_facts(regions, raw):
    assert [r.number for r in regions] == sorted(r.number for r in regions)
    for n in REQUIRED:
        r = regions[n]
        assert r.name and r.muscles and r.sources and r.anchors
        assert all(s in raw["_meta"]["sources"] for s in r.sources)
    assert regions[12].name == "Lip corner puller" and "zygomaticus major" in regions[12].muscles
    assert regions["AU01"].name == "Inner brow raiser"
    meta = raw["_meta"]
    assert meta["version"] and meta["conventions"]["unit"] == "IOD"
    assert "0-based" in meta["conventions"]["landmarks"]


def test_each_au_is_anchored_to_the_right_landmarks(regions):
    for r in regions:
        assert set(r.all_anchors) <= ALLOWED_ANCHORS[r.au], (r.au, r.all_anchors)
    assert set(regions[12].all_anchors) == {48, 54}
    assert set(regions[1].all_anchors) == {21, 22}
    assert set(regions[25].all_anchors) == set(range(60, 68))


def test_coded_landmarks_expose_index_errors(regions):
    """Landmark i sits at x = i (py-feat's coded fixture; eyes kept level so that the face
    frame is the image frame with IOD = 6): each disc or sector centre must then lie at the
    x of its anchor index, plus its offset, on both sides."""
    lm = np.stack([np.arange(68, dtype=float), np.zeros(68)], axis=1)
    frame = FaceFrame.of(lm)
    assert frame.iod == pytest.approx(6.0) and np.allclose(frame.ex, [1, 0])
    for r in regions:
        if r.shape["type"] not in ("disc", "sector"):
            continue
        centre = r.shape["center"]
        at = centre["at"] if isinstance(centre["at"], list) else [centre["at"]]
        dx, dy = centre.get("offset", [0, 0])
        polys = r.polygons(lm, frame)
        sides = [(at, dx)] + ([([MIRROR_INDEX[i] for i in at], -dx)] if r.bilateral else [])
        for poly, (idx, sdx) in zip(polys, sides, strict=True):
            expected = np.array([np.mean(idx) + 6 * sdx, 6 * dy])
            # every vertex lies on the circle(s) of the stated radii around that centre
            dist = np.linalg.norm(poly.exterior - expected, axis=1)
            radii = 6 * np.array([r.shape["radius"], r.shape.get("inner_radius", 0.0)])
            assert np.abs(dist[:, None] - radii[None, :]).min(axis=1).max() < 1e-9, r.au


def test_regions_move_with_their_anchors_only(regions, symmetric_face):
    """Moving one landmark changes exactly the regions anchored to it (eye points move the
    face frame, hence every region, and are left out)."""
    lm, _ = symmetric_face
    base = regions.polygons(lm)
    eyes = set(range(36, 48))
    for i in sorted(set(range(68)) - eyes):
        moved = lm.copy()
        moved[i] += [3.0, -2.0]
        after = regions.polygons(moved)
        for r in regions:
            changed = any(not np.allclose(np.concatenate([a.exterior, *a.holes]),
                                          np.concatenate([b.exterior, *b.holes]))
                          for a, b in zip(base[r.au], after[r.au], strict=True))
            assert changed == (i in r.all_anchors), (r.au, i)


# -- invariants of the geometry ---------------------------------------------------------------------


def test_every_region_is_inside_the_face(regions, symmetric_face, astronaut_landmarks):
    lm, shape = symmetric_face
    face = regions.face_mask(lm, shape)
    for au, m in regions.masks(lm, shape).items():
        assert m.any(), au
        assert not (m & ~face).any(), au  # the reference face: every pixel inside
    lm, shape = astronaut_landmarks  # a real, slightly turned face: nearly every pixel
    face = regions.face_mask(lm, shape)
    for au, m in regions.masks(lm, shape).items():
        assert (m & face).sum() >= 0.9 * m.sum(), au


def test_regions_inside_the_face_on_fer2013(regions, fer_landmarks):
    inside = {au: [] for au in regions.names}
    for lm in fer_landmarks[:60]:
        face = regions.face_mask(lm, (48, 48), mode="fraction")
        for au, m in regions.masks(lm, (48, 48), mode="fraction").items():
            inside[au].append((np.minimum(m, face)).sum() / max(m.sum(), 1e-9))
    for au, shares in inside.items():
        assert np.median(shares) > 0.97, au


def test_regions_do_not_overlap_on_the_reference_face(regions, symmetric_face):
    lm, shape = symmetric_face
    masks = regions.masks(lm, shape)
    names = list(masks)
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            both = (masks[names[a]] & masks[names[b]]).sum()
            assert both <= 0.02 * min(masks[names[a]].sum(), masks[names[b]].sum()), \
                (names[a], names[b])


def test_mirror_symmetry_on_a_symmetric_face(regions, symmetric_face):
    lm, shape = symmetric_face
    assert np.allclose(mirror_landmarks(lm, shape[1]), lm, atol=0.15)  # symmetric input
    for au, m in regions.masks(lm, shape).items():
        assert iou(m, m[:, ::-1]) > 0.97, au
    for r in regions:
        if r.bilateral:  # the two sides are each other's mirror image, vertex for vertex
            left, right = r.polygons(lm)
            mirrored = left.exterior * [-1, 1] + [shape[1] - 1, 0]
            assert np.abs(np.sort(mirrored, axis=0) - np.sort(right.exterior, axis=0)).max() \
                < 0.5, r.au


def test_mirror_equivariance_on_a_real_face(regions, astronaut_landmarks):
    """Regions of the mirrored face are the mirrored regions, for an asymmetric face too."""
    lm, shape = astronaut_landmarks
    a = regions.masks(lm, shape)
    b = regions.masks(mirror_landmarks(lm, shape[1]), shape)
    for au in a:
        assert iou(a[au], b[au][:, ::-1]) > 0.97, au


def test_sizes_match_the_data_and_stay_within_bounds(regions, symmetric_face,
                                                      astronaut_landmarks):
    lm, _ = symmetric_face
    for au, area in regions.areas(lm).items():
        r = regions[au]
        assert area == pytest.approx(r.area, rel=0.03, abs=1e-3), au
        lo, hi = r.area_bounds
        assert lo <= area <= hi, au
    lm, _ = astronaut_landmarks
    for au, area in regions.areas(lm).items():
        lo, hi = regions[au].area_bounds
        assert lo <= area <= hi, (au, area)


def test_sizes_within_bounds_on_fer2013(regions, fer_landmarks):
    """The bounds hold 1st-99th percentile of FER2013 faces, widened 20 %."""
    for au in regions.names:
        lo, hi = regions[au].area_bounds
        areas = np.array([regions.areas(lm, [au])[au] for lm in fer_landmarks])
        assert ((areas >= lo) & (areas <= hi)).mean() >= 0.95, au


def test_sizes_are_in_iod_units(regions, astronaut_landmarks):
    """Rotating, scaling and moving a face changes no size in IOD^2, nor any share."""
    lm, _ = astronaut_landmarks
    other = similarity(lm, 25, 2.7, (40, -30))
    a, b = regions.areas(lm), regions.areas(other)
    for au in a:  # exact for plain polygons; regions with holes are measured on a raster
        assert b[au] == pytest.approx(a[au], rel=1e-6 if not regions[au].shape.get("holes")
                                      else 0.01), au
    sa, sb = regions.area_shares(lm), regions.area_shares(other)
    for au in sa:
        assert sb[au] == pytest.approx(sa[au], abs=0.01), au
    assert 0.3 < sum(sa.values()) < 0.9  # the regions cover a good part of the face


def test_masks_agree_across_resolutions(regions, astronaut_landmarks):
    """A mask at 128 px and one at 512 px (same face) differ only by resampling."""
    from PIL import Image

    lm, _ = astronaut_landmarks
    lm = lm - lm.min(axis=0) + 20  # the face in a 128 x 128 frame, then 4x larger
    lo = regions.masks(lm, (128, 128))
    hi = regions.masks((lm + 0.5) * 4 - 0.5, (512, 512))
    polys = regions.polygons((lm + 0.5) * 4 - 0.5)
    for au in lo:
        up = np.asarray(Image.fromarray(lo[au]).resize((512, 512), Image.Resampling.NEAREST))
        assert iou(up, hi[au]) > 0.75, au
        # they differ only along the outline: every pixel that disagrees lies within half a
        # 128-px pixel's diagonal (2.83 px at 512) of the region's outline
        rows, cols = np.nonzero(up != hi[au])
        outline = [ring for p in polys[au] for ring in (p.exterior, *p.holes)]
        dist = distance_to_rings(np.stack([cols, rows], axis=1).astype(float), outline)
        assert dist.max(initial=0) <= 2 * np.sqrt(2) + 1e-6, au
        # on a common grid the two agree much better
        coarse = regions.masks((lm + 0.5) * 4 - 0.5, (512, 512), grid=(128, 128))[au]
        assert iou(coarse, lo[au]) > 0.97, au


def test_feature_map_grids(regions, astronaut_landmarks):
    lm, shape = astronaut_landmarks
    fine = regions.masks(lm, shape, aus=[12, 25, 4])
    for grid in [(16, 16), (7, 7), (3, 3)]:
        frac = regions.masks(lm, shape, grid, aus=[12, 25, 4], mode="fraction")
        over = regions.masks(lm, shape, grid, aus=[12, 25, 4], mode="overlap")
        centre = regions.masks(lm, shape, grid, aus=[12, 25, 4])
        for au in fine:
            # block-averaged pixel mask vs covered fraction per cell
            h, w = grid
            blocks = fine[au][: shape[0] // h * h, : shape[1] // w * w]
            block_mean = blocks.reshape(h, shape[0] // h, w, shape[1] // w).mean(axis=(1, 3))
            assert np.abs(block_mean - frac[au]).max() < 0.1, (au, grid)
            assert over[au].any() and not (centre[au] & ~over[au]).any()  # centre within overlap
            assert np.array_equal(over[au], frac[au] > 0) or over[au].sum() >= (frac[au] > 0).sum()


def test_grid_orientation_rows_are_y(regions):
    """(x, y) in, [row, col] out: a face in the right half of a wide image marks columns on
    the right, and a face low in a tall image marks the bottom rows."""
    ref = regions.reference_face * 20
    wide = regions.masks(ref + [150, 40], (80, 200), aus=[12])["AU12"]
    assert wide.any() and np.nonzero(wide)[1].min() > 100
    tall = regions.masks(ref + [40, 150], (200, 80), aus=[12])["AU12"]
    assert tall.any() and np.nonzero(tall)[0].min() > 100
    pts = grid_points((4, 6), (2, 3))
    assert pts.shape == (2, 3, 1, 2)
    np.testing.assert_allclose(pts[1, 2, 0], [4.5, 2.5])  # cell [row 1, col 2] centre (x, y)


def test_tiny_region_on_a_coarse_grid_marks_its_cell():
    from interp_fer.au_regions import Polygon

    tiny = Polygon(np.array([[10.0, 10.0], [10.4, 10.0], [10.0, 10.4]]))
    m = polygons_mask([tiny], (48, 48), (3, 3), mode="overlap")
    assert m.sum() == 1 and m[0, 0]
    assert polygons_mask([tiny], (48, 48), (3, 3)).sum() == 0  # centre rule misses it


def test_face_and_shares(regions, symmetric_face):
    lm, shape = symmetric_face
    face = regions.face_polygon(lm)
    brows_top = lm[17:27, 1].min()
    assert face.exterior[:, 1].min() < brows_top - 0.5 * 120  # extended above the brows
    shares = regions.area_shares(lm)
    areas = regions.areas(lm, unit="px")
    for au, share in shares.items():
        assert share == pytest.approx(areas[au] / face.area, rel=0.05, abs=0.002), au


def test_bad_landmarks_are_rejected(regions):
    with pytest.raises(ValueError, match="68, 2"):
        regions.polygons(np.zeros((5, 2)))
    with pytest.raises(ValueError, match="NaN"):
        regions.polygons(np.full((68, 2), np.nan))


def test_figure_of_every_region(regions, astronaut_landmarks):
    from matplotlib.figure import Figure
    from skimage import data

    from interp_fer.figures import au_regions_figure, plot_au_regions

    lm, _ = astronaut_landmarks
    fig = plot_au_regions(data.astronaut(), lm, regions)
    assert isinstance(fig, Figure)
    labels = {t.get_text() for t in fig.axes[0].texts}
    assert labels == {str(r.number) for r in regions}
    assert isinstance(au_regions_figure(data.astronaut()), Figure)
    assert (REPO / "landmarks" / "au_regions.png").is_file()


# -- validation errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("edit, words", [
    (lambda d: d["AU12"]["shape"]["center"].update(at=68), ["AU12", "shape.center.at",
                                                             "unknown landmark index 68"]),
    (lambda d: d["AU10"]["shape"]["points"][0].update(at=-1), ["AU10", "shape.points[0].at",
                                                               "unknown landmark index -1"]),
    (lambda d: d["AU04"]["shape"].update(points=d["AU04"]["shape"]["points"][:2]),
     ["AU04", "shape.points", "at least 3 points"]),
    (lambda d: d["AU01"]["shape"].update(radius=0), ["AU01", "shape.radius", "outside"]),
    (lambda d: d["AU02"]["shape"]["center"].update(offset=[0, -22]),
     ["AU02", "shape.center.offset", "units are IOD"]),
    (lambda d: d["_meta"]["conventions"].update(unit="px"), ["_meta", "conventions.unit"]),
    (lambda d: d["AU06"].pop("muscles"), ["AU06", "missing muscles"]),
    (lambda d: d["AU06"].pop("size"), ["AU06", "missing size"]),
    (lambda d: d["AU07"].update(sources=["Nobody2020"]), ["AU07", "sources", "Nobody2020"]),
    (lambda d: d["AU09"].update(anchors=[27, 31]), ["AU09", "anchors", "differ"]),
    (lambda d: d["AU14"]["shape"].update(raduis=0.2), ["AU14", "unknown field(s) raduis"]),
    (lambda d: d["AU15"]["shape"].update(type="blob"), ["AU15", "shape.type", "blob"]),
    (lambda d: d["AU15"]["shape"].update(angles=[160, 105]), ["AU15", "shape.angles"]),
    (lambda d: d["AU17"]["size"].update(area=0.5, bounds=[0.1, 0.9]),
     ["AU17", "size.area", "covers"]),
    (lambda d: d["AU20"]["size"].update(bounds=[0.2, 0.3]), ["AU20", "size.bounds"]),
    (lambda d: d["AU10"]["shape"]["points"].insert(3, d["AU10"]["shape"]["points"].pop(0)),
     ["AU10", "shape", "crosses itself"]),
    (lambda d: (d["AU25"]["shape"].update(points=[{"at": 62}, {"at": 62}, {"at": 62}]),
                d["AU25"].update(anchors=[62])), ["AU25", "no area"]),
    (lambda d: d.update(Brow={}), ["Brow", "AU keys"]),
    (lambda d: d.update(AU1=d["AU01"]), ["AU1", "same AU number as AU01"]),
    (lambda d: d["_meta"]["reference_face"].update(points=[[0, 0]] * 67),
     ["_meta", "reference_face.points"]),
    (lambda d: d["AU23"].update(bilateral="yes"), ["AU23", "bilateral"]),
])
def test_validation_errors_name_the_au_and_field(raw, edit, words):
    assert_rejected(AURegionError, lambda: AURegions(broken(raw, edit)), words)


def test_file_errors_name_the_file(tmp_path, raw):
    path = tmp_path / "regions.json"
    path.write_text("{ not json")
    with pytest.raises(AURegionError, match="regions.json"):
        load_au_regions(path)
    path.write_text(json.dumps(broken(raw, lambda d: d["AU12"]["shape"]["center"].update(at=99))))
    with pytest.raises(AURegionError, match=r"regions\.json: AU12"):
        load_au_regions(path)
    path.write_text(json.dumps(raw))
    assert load_au_regions(path).names == load_au_regions().names


# -- sham regions ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shams():
    return load_sham_regions()


def test_sham_regions_are_au1_discs_elsewhere(regions, shams, raw):
    """Four shams with AU1's shape and size, on the same reference face, named as shams."""
    assert shams.kind == "sham" and regions.kind == "au"
    assert shams.names == ["sham_cheek", "sham_nose_side", "sham_forehead", "sham_jaw"]
    np.testing.assert_array_equal(shams.reference_face, regions.reference_face)
    au1 = regions[1]
    for s in shams:
        assert s.number is None and s.name.startswith("Sham")
        assert s.shape["type"] == au1.shape["type"] and s.shape["radius"] == au1.shape["radius"]
        assert s.bilateral == au1.bilateral and s.area == au1.area
    with pytest.raises(KeyError, match="no region for AU01"):
        shams[1]


def test_sham_regions_lie_on_the_face_off_the_au_regions(regions, shams, symmetric_face,
                                                         astronaut_landmarks):
    """Inside the face, apart from each other; on the reference face they overlap the AU
    regions by at most a third of their area (0 for cheek and forehead: the lower face is
    tiled by AU regions, so the nose-side and jaw shams share 15 % and 32 %)."""
    lm, shape = symmetric_face
    face = regions.face_mask(lm, shape)
    union = np.zeros(shape, dtype=bool)
    for m in regions.masks(lm, shape).values():
        union |= m
    sham_masks = shams.masks(lm, shape)
    overlap = {}
    for name, m in sham_masks.items():
        assert m.any() and not (m & ~face).any(), name
        overlap[name] = (m & union).sum() / m.sum()
        for other, o in sham_masks.items():
            assert other == name or not (m & o).any(), (name, other)
    assert overlap["sham_cheek"] < 0.01 and overlap["sham_forehead"] < 0.01, overlap
    assert max(overlap.values()) < 0.35, overlap
    assert (sham_masks["sham_forehead"] & ~regions.masks(lm, shape, aus=[1, 2])["AU01"]).any()
    top_of_brows = lm[17:27, 1].min()
    rows = np.nonzero(sham_masks["sham_forehead"])[0]
    assert rows.max() < top_of_brows  # above the brows
    lm, shape = astronaut_landmarks
    face = regions.face_mask(lm, shape)
    for name, m in shams.masks(lm, shape).items():
        assert (m & face).sum() >= 0.9 * m.sum(), name


def test_sham_file_validation(shams):
    data = copy.deepcopy(shams.data)
    data["sham_Cheek"] = data.pop("sham_cheek")
    with pytest.raises(AURegionError, match="sham_Cheek: field '\\(key\\)'"):
        AURegions(data, "sham")
    data = copy.deepcopy(shams.data)
    data["sham_jaw"]["shape"]["center"]["at"] = 70
    with pytest.raises(AURegionError, match="sham_jaw: field 'shape.center.at'"):
        AURegions(data, "sham")
    with pytest.raises(AURegionError, match="AU keys"):
        AURegions(shams.data)  # sham names are not AU keys


# -- faces cut by the image frame --------------------------------------------------------------------


def test_region_clipping_of_a_face_whose_chin_is_cut(regions, shams):
    """A sample face cropped just below the mouth: the chin (8) is outside the image, so
    the jaw, chin and lower-lip regions are partly lost, and the eye regions are not."""
    from interp_fer.samples import sample_face

    image = sample_face("happy")
    lm = LandmarkDetector()(image).landmarks
    bottom = int(lm[57, 1] + 0.05 * FaceFrame.of(lm).iod)  # just below the lower lip
    crop = image[:bottom]
    assert lm[8, 1] > crop.shape[0] - 0.5
    share = region_clipping(regions, lm, crop.shape[:2])
    assert set(share) == set(regions.names)
    assert share["AU26"] > 0.6 and share["AU17"] > 0.6 and 0 < share["AU16"] < 1
    for au in ("AU01", "AU02", "AU05", "AU06", "AU07", "AU12", "AU25"):
        assert share[au] == 0.0, au
    # the share matches the masks: the part of the pixel mask of the full image that the crop
    # keeps, against the full region
    full = regions.masks(lm, image.shape[:2], aus=[17, 26])
    kept = regions.masks(lm, crop.shape[:2], aus=[17, 26])
    for au in ("AU17", "AU26"):
        lost = 1 - kept[au].sum() / full[au].sum()
        assert share[au] == pytest.approx(lost, abs=0.02), au
    assert region_clipping(regions, lm, image.shape[:2]) == dict.fromkeys(regions.names, 0.0)
    sham_share = region_clipping(shams, lm, crop.shape[:2])
    assert sham_share["sham_forehead"] == 0.0 and sham_share["sham_jaw"] > 0
    # a face half outside on the left: every region left of the nose is cut
    moved = lm - [lm[30, 0], 0]
    left = region_clipping(regions, moved, image.shape[:2])
    assert left["AU12"] == pytest.approx(0.5, abs=0.02) and left["AU25"] > 0.3
