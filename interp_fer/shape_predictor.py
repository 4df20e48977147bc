"""dlib's shape predictor, read from its ``.dat`` file and evaluated with numpy.

dlib's own predictor runs one face at a time (about 4 ms per face in the dlib-bin build),
which caps two cores below the toolkit's 400 faces/s target. :class:`ShapePredictor` evaluates
the same ensemble of regression trees on a batch of faces with numpy (about 1 ms per face),
with the same float32 arithmetic in the same order, so its output rounded to whole pixels is
dlib's (tests check it on real faces); it also keeps the sub-pixel value dlib rounds away.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

MODEL_PACKAGE = "face_recognition_models"
PREDICTOR_FILE = "shape_predictor_68_face_landmarks.dat"


def model_path(filename: str) -> Path:
    """Path of a model file shipped in the ``face-recognition-models`` distribution.

    The package is located without being imported: its ``__init__`` imports ``pkg_resources``,
    which recent setuptools no longer ship.

    Parameters
    ----------
    filename
        File name inside the package's ``models/`` folder, e.g. :data:`PREDICTOR_FILE`.

    Returns
    -------
    pathlib.Path
        An existing file.

    Raises
    ------
    FileNotFoundError
        When the package or the file is missing (the message says how to fix it).
    """
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    hint = "install it with: pip install face-recognition-models==0.3.0"
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the package {MODEL_PACKAGE!r} is not installed; {hint}")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / filename
    if not path.is_file():
        raise FileNotFoundError(f"dlib model file {path} is missing; {hint}")
    return path


def _intensity(image: np.ndarray) -> np.ndarray:
    """Grey levels as dlib samples them: RGB pixels become ``(r + g + b) // 3``."""
    if image.ndim == 2:
        return image
    return (image.astype(np.uint16).sum(axis=2) // 3).astype(np.uint8)



def _varint_starts(buf: np.ndarray, block: int = 1 << 14, margin: int = 256) -> np.ndarray:
    """Offsets of every integer in a dlib-serialised file.

    dlib writes every number as a small variable-length integer (a header byte whose low four
    bits give the number of little-endian bytes that follow; bit 7 is the sign) and floats as
    two of them (mantissa, exponent), so the whole file is one chain of such tokens. The chain
    is walked in many blocks at once: a walk started at an arbitrary byte re-synchronises with
    the true chain within a few tokens, so each block only keeps the tokens it finds past a
    ``margin``. The result is verified end to end, so a failed re-synchronisation is an error,
    never a wrong model.
    """
    n = buf.size
    pad = block + margin + 16
    step = np.ones(n + pad, dtype=np.int64)
    step[:n] += buf & 0x0F
    starts_block = np.arange(0, n, block, dtype=np.int64)
    own_from = starts_block + margin
    own_from[0] = 0
    stop = np.minimum(starts_block + block + margin, n)
    mark = np.zeros(n + pad, dtype=bool)
    pos = starts_block.copy()
    while True:
        live = pos < stop
        if not live.any():
            break
        mark[pos[live & (pos >= own_from)]] = True
        pos = np.where(live, pos + step[pos], pos)
    starts = np.flatnonzero(mark[:n])
    ok = (
        starts.size > 0
        and starts[0] == 0
        and np.array_equal(starts[1:], starts[:-1] + step[starts[:-1]])
        and starts[-1] + step[starts[-1]] == n
    )
    if not ok:
        raise ValueError("could not tokenise the dlib model file (not a dlib serialisation?)")
    return starts


def _decode_varints(buf: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Values of the dlib integers starting at ``starts`` (see :func:`_varint_starts`)."""
    padded = np.concatenate([buf, np.zeros(16, dtype=np.uint8)])
    header = padded[starts]
    size = header & 0x0F
    if size.max() > 8:
        raise ValueError("dlib model file holds an integer wider than 64 bits")
    values = np.zeros(starts.size, dtype=np.int64)
    for j in range(int(size.max())):
        sel = np.flatnonzero(size > j)
        values[sel] |= padded[starts[sel] + 1 + j].astype(np.int64) << (8 * j)
    np.negative(values, out=values, where=(header & 0x80) != 0)
    return values


def _floats(mantissa: np.ndarray, exponent: np.ndarray) -> np.ndarray:
    """dlib's portable float encoding: ``mantissa * 2**exponent`` (as float32)."""
    if np.abs(exponent).max(initial=0) > 1000:  # dlib's codes for inf/nan: not in real models
        raise ValueError("dlib model file holds non-finite floats")
    return np.ldexp(mantissa.astype(np.float64), exponent.astype(np.int64)).astype(np.float32)


def parse_shape_predictor(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a dlib ``shape_predictor`` file into arrays.

    The layout (dlib ``shape_predictor`` serialisation, version 1): initial shape (column
    matrix), forests (cascade levels x trees, each tree = splits ``(idx1, idx2, thresh)`` in
    breadth-first order and leaf displacement vectors), anchor indices and pixel deltas of the
    feature pixels of each level.

    Parameters
    ----------
    path
        The ``.dat`` file.

    Returns
    -------
    dict
        ``initial`` (P, 2) float32, ``idx1``/``idx2`` (levels, trees, splits) int16, ``thresh``
        (levels, trees, splits) float32, ``leaves`` (levels, trees, splits + 1, 2P) float32,
        ``anchors`` (levels, features) int16, ``deltas`` (levels, features, 2) float32.
        Shape coordinates are normalised to the face box (0..1).
    """
    buf = np.fromfile(path, dtype=np.uint8)
    v = _decode_varints(buf, _varint_starts(buf))
    pos = 0

    def take(k: int) -> np.ndarray:
        nonlocal pos
        out = v[pos : pos + k]
        if out.size != k:
            raise ValueError(f"{path}: truncated dlib shape predictor file")
        pos += k
        return out

    def expect(value: int, what: str) -> None:
        got = int(take(1)[0])
        if got != value:
            raise ValueError(f"{path}: unexpected {what} {got} (expected {value})")

    expect(1, "version")
    rows, cols = (int(x) for x in take(2))
    n2 = abs(rows)
    if abs(cols) != 1 or n2 % 2:
        raise ValueError(f"{path}: initial shape is {rows}x{cols}, not a column of (x, y) pairs")
    initial = take(2 * n2).reshape(-1, 2)
    initial = _floats(initial[:, 0], initial[:, 1]).reshape(-1, 2)
    n_levels = int(take(1)[0])
    n_trees = int(v[pos])
    n_splits = int(v[pos + 1])
    n_leaves = int(v[pos + 2 + 4 * n_splits])
    tree_len = 1 + 4 * n_splits + 1 + n_leaves * (2 + 2 * n2)
    levels = take(n_levels * (1 + n_trees * tree_len)).reshape(n_levels, -1)
    if not (levels[:, 0] == n_trees).all():
        raise ValueError(f"{path}: cascade levels do not all hold {n_trees} trees")
    trees = levels[:, 1:].reshape(n_levels, n_trees, tree_len)
    if not ((trees[:, :, 0] == n_splits).all() and (trees[:, :, 1 + 4 * n_splits] == n_leaves)
            .all() and n_leaves == n_splits + 1):
        raise ValueError(f"{path}: trees are not all complete trees of the same depth")
    splits = trees[:, :, 1 : 1 + 4 * n_splits].reshape(n_levels, n_trees, n_splits, 4)
    leaves = trees[:, :, 2 + 4 * n_splits :].reshape(n_levels, n_trees, n_leaves, 2 + n2 * 2)
    if not ((leaves[..., 0] == -n2).all() and (leaves[..., 1] == -1).all()):
        raise ValueError(f"{path}: leaf vectors are not {n2}-long columns")
    leaf_values = leaves[..., 2:].reshape(n_levels, n_trees, n_leaves, n2, 2)
    anchors, deltas = [], []
    expect(n_levels, "number of anchor lists")
    for _ in range(n_levels):
        anchors.append(take(int(take(1)[0])))
    expect(n_levels, "number of delta lists")
    for _ in range(n_levels):
        d = take(4 * int(take(1)[0])).reshape(-1, 4)
        deltas.append(np.stack([_floats(d[:, 0], d[:, 1]), _floats(d[:, 2], d[:, 3])], axis=1))
    if pos != v.size:
        raise ValueError(f"{path}: {v.size - pos} unread numbers at the end of the file")
    return {
        "initial": initial,
        "idx1": splits[..., 0].astype(np.int16),
        "idx2": splits[..., 1].astype(np.int16),
        "thresh": _floats(splits[..., 2], splits[..., 3]),
        "leaves": _floats(leaf_values[..., 0], leaf_values[..., 1]),
        "anchors": np.stack(anchors).astype(np.int16),
        "deltas": np.stack(deltas).astype(np.float32),
    }


class ShapePredictor:
    """dlib's 68-point shape predictor evaluated with numpy, on many faces at once.

    Parameters
    ----------
    arrays
        Output of :func:`parse_shape_predictor`.

    Notes
    -----
    Per cascade level, as dlib does: the similarity transform from the mean shape to the
    current shape places each feature pixel (anchor landmark + rotated/scaled delta); the box
    maps normalised to image coordinates; the pixel nearest to it (or 0 outside the image) is
    sampled; each tree compares pixel pairs down to a leaf; leaf displacements are added to the
    shape in float32 in tree order (so results match dlib bit for bit before its final rounding).
    """

    #: Faces per vectorised chunk (bounds memory: about 0.5 MB per face).
    CHUNK = 256

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.initial = np.asarray(arrays["initial"], dtype=np.float32)
        n_levels, n_trees, n_splits = arrays["idx1"].shape
        self.n_levels, self.n_trees, self.n_splits = n_levels, n_trees, n_splits
        self.depth = int(round(math.log2(n_splits + 1)))
        self.n_points = self.initial.shape[0]
        self.n_features = arrays["anchors"].shape[1]
        # flat per-level tables indexed by tree * n_splits + node
        self.idx1 = arrays["idx1"].reshape(n_levels, -1).astype(np.int64)
        self.idx2 = arrays["idx2"].reshape(n_levels, -1).astype(np.int64)
        self.thresh = arrays["thresh"].reshape(n_levels, -1).astype(np.float32)
        self.leaves = arrays["leaves"].reshape(n_levels, n_trees * (n_splits + 1), -1)
        self.anchors = arrays["anchors"].astype(np.intp)
        self.deltas = arrays["deltas"].astype(np.float32)
        centred = self.initial.astype(np.float64) - self.initial.mean(axis=0)
        self._ref_centred = centred
        self._ref_norm = float((centred**2).sum())

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, *, cache: bool = True) -> ShapePredictor:
        """Load a dlib shape predictor, converting it once to a cached ``.npz``.

        Parameters
        ----------
        path
            The ``.dat`` file; default dlib's 68-point model from face-recognition-models.
        cache
            Keep the converted arrays under ``cache_dir("landmarks")`` (parsing the 100 MB
            file takes a few seconds; loading the cache a fraction of one).
        """
        if path is None:
            path = model_path(PREDICTOR_FILE)
        path = Path(path)
        if not cache:
            return cls(parse_shape_predictor(path))
        from .paths import cache_dir

        stat = path.stat()
        with open(path, "rb") as handle:  # head + tail + size: cheap and enough to spot a swap
            head = handle.read(1 << 20)
            handle.seek(max(0, stat.st_size - (1 << 20)))
            tail = handle.read()
        digest = hashlib.blake2b(head + tail + str(stat.st_size).encode(), digest_size=8)
        target = cache_dir("landmarks") / f"{path.stem}-{digest.hexdigest()}.npz"
        if target.is_file():
            try:
                with np.load(target) as data:
                    return cls({k: data[k] for k in data.files})
            except (OSError, ValueError, KeyError) as exc:
                log.warning("ignoring unreadable converted predictor %s: %s", target, exc)
        arrays = parse_shape_predictor(path)
        partial = target.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(partial, **arrays)
        os.replace(partial, target)  # atomic: concurrent workers never read half a file
        return cls(arrays)

    def predict(self, images: Sequence[np.ndarray], boxes: np.ndarray) -> np.ndarray:
        """Landmarks of one face per (image, box) pair.

        Parameters
        ----------
        images
            N uint8 images, ``(H, W)`` or ``(H, W, 3)``; sizes may differ. The same image
            object may appear several times (several faces).
        boxes
            ``(N, 4)`` face boxes ``(left, top, right, bottom)`` in pixels; fractional values
            are used as they are (dlib would round them).

        Returns
        -------
        numpy.ndarray
            ``(N, 68, 2)`` float64 ``(x, y)`` pixel coordinates.
        """
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        if len(images) != len(boxes):
            raise ValueError(f"{len(images)} images but {len(boxes)} boxes")
        out = np.empty((len(boxes), self.n_points, 2))
        for a in range(0, len(boxes), self.CHUNK):
            out[a : a + self.CHUNK] = self._predict(images[a : a + self.CHUNK],
                                                    boxes[a : a + self.CHUNK])
        return out

    def _similarity(self, cur: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Least-squares rotation+scale ``[[a, -b], [b, a]]`` from the mean shape to ``cur``."""
        c = cur.astype(np.float64) - cur.mean(axis=1, keepdims=True, dtype=np.float64)
        r = self._ref_centred
        a = (c[..., 0] * r[:, 0] + c[..., 1] * r[:, 1]).sum(axis=1) / self._ref_norm
        b = (c[..., 1] * r[:, 0] - c[..., 0] * r[:, 1]).sum(axis=1) / self._ref_norm
        return a.astype(np.float32)[:, None], b.astype(np.float32)[:, None]

    def _predict(self, images: Sequence[np.ndarray], boxes: np.ndarray) -> np.ndarray:
        n = len(images)
        # one flat pixel buffer for the chunk (each distinct image once), with a 0 at the end
        # that out-of-image samples point to
        index_of: dict[int, int] = {}
        planes, offsets, heights, widths = [], [], [], []
        total = 0
        for img in images:
            if id(img) not in index_of:
                index_of[id(img)] = len(planes)
                g = _intensity(img)
                planes.append(g.ravel())
                offsets.append(total)
                heights.append(g.shape[0])
                widths.append(g.shape[1])
                total += g.size
        which = np.array([index_of[id(img)] for img in images])
        flat = np.concatenate([*planes, np.zeros(1, np.uint8)]).astype(np.float32)
        off = np.array(offsets, dtype=np.int64)[which][:, None]
        hs = np.array(heights, dtype=np.int64)[which][:, None]
        ws = np.array(widths, dtype=np.int64)[which][:, None]

        x0, y0 = boxes[:, 0:1], boxes[:, 1:2]
        bw, bh = boxes[:, 2:3] - x0, boxes[:, 3:4] - y0
        cur = np.repeat(self.initial[None], n, axis=0)
        tree_base = (np.arange(self.n_trees) * self.n_splits)[None, :]
        leaf_base = (np.arange(self.n_trees) * (self.n_splits + 1))[None, :]
        row_base = (np.arange(n) * self.n_features)[:, None]
        for k in range(self.n_levels):
            a, b = self._similarity(cur)
            d = self.deltas[k]
            anchor = cur[:, self.anchors[k]]
            u = a * d[:, 0] - b * d[:, 1] + anchor[..., 0]  # float32, as dlib
            v = b * d[:, 0] + a * d[:, 1] + anchor[..., 1]
            px = np.floor(x0 + u * bw + 0.5).astype(np.int64)  # float64 + round, as dlib
            py = np.floor(y0 + v * bh + 0.5).astype(np.int64)
            inside = (px >= 0) & (py >= 0) & (px < ws) & (py < hs)
            feat = flat[np.where(inside, off + py * ws + px, flat.size - 1)].ravel()
            node = np.zeros((n, self.n_trees), dtype=np.int64)
            for _ in range(self.depth):
                j = tree_base + node
                left = (feat[row_base + self.idx1[k][j]] - feat[row_base + self.idx2[k][j]]
                        > self.thresh[k][j])
                node = 2 * node + 2 - left
            leaf = node - self.n_splits + leaf_base
            table = self.leaves[k]
            flat_cur = cur.reshape(n, -1)
            for t in range(self.n_trees):  # in order, in float32: dlib's rounding exactly
                flat_cur += table[leaf[:, t]]
        return np.stack([x0 + cur[..., 0] * bw, y0 + cur[..., 1] * bh], axis=-1)
