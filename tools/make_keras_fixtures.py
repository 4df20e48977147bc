"""Build the small Keras 3 models that tests/test_keras_import.py converts, with Keras's outputs.

Run (keras from PyPI on its torch backend; no TensorFlow)::

    KERAS_BACKEND=torch python tools/make_keras_fixtures.py [--out tests/data]

Writes, for each model NAME in ``sequential``, ``functional``:

- ``keras_NAME.h5``     the model saved by Keras 3 in its legacy HDF5 layout;
- ``keras_NAME.keras``  the same model in the Keras 3 zip layout;
- ``keras_NAME.npz``    ``inputs`` float32 (N, H, W, C), ``outputs`` float32 (N, classes)
  as computed by Keras (``model.predict``), ``meta`` (JSON: versions);

and ``keras_unsupported.keras``, a model with layers the converter refuses.

Between them the two models hold every supported layer: Conv2D (valid, 'same' stride 1,
'same' stride 2 with its bottom/right padding, fused ReLU), SeparableConv2D, DepthwiseConv2D
(depth multiplier 2), BatchNormalization (non-default epsilon, random statistics), Activation,
ReLU, MaxPooling2D (valid, 'same' symmetric, 'same' bottom/right), AveragePooling2D (valid,
'same' symmetric; not 'same' with bottom/right padding: Keras 3's torch backend pads that case
by replicating the edge, where TensorFlow, which trained the published files and which the
converter follows, leaves the padding out of the average; tests check that case on its own),
GlobalAveragePooling2D, ZeroPadding2D, Dropout, Flatten before Dense (channels-last order),
Dense, Add, Concatenate; Sequential and functional.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import layers  # noqa: E402


def sequential() -> keras.Model:
    return keras.Sequential([
        keras.Input((16, 16, 1)),
        layers.Conv2D(4, 3, padding="same", activation="relu", name="conv1"),
        layers.BatchNormalization(epsilon=1e-2, name="bn1"),
        layers.MaxPooling2D(3, strides=2, padding="same", name="pool_same"),      # 16 -> 8, pad 0/1
        layers.Conv2D(6, 3, padding="valid", name="conv2"),                      # 8 -> 6
        layers.Activation("relu", name="relu2"),
        layers.AveragePooling2D(3, strides=1, padding="same", name="avg_same"),  # 6 -> 6, pad 1/1
        layers.ZeroPadding2D(((1, 0), (0, 1)), name="zpad"),                     # 6 -> 7
        layers.MaxPooling2D(2, name="pool_valid"),                               # 7 -> 3
        layers.Dropout(0.5, name="drop1"),
        layers.Flatten(name="flat"),
        layers.Dense(8, activation="relu", name="fc1"),
        layers.Dropout(0.3, name="drop2"),
        layers.Dense(7, activation="softmax", name="predictions"),
    ], name="seq")


def functional() -> keras.Model:
    image = keras.Input((20, 20, 3), name="image")
    x = layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False, name="stem")(image)  # 20 -> 10
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    a = layers.SeparableConv2D(8, 3, padding="same", name="sep")(x)
    a = layers.BatchNormalization(epsilon=1e-5, name="sep_bn")(a)
    b = layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="dw")(x)
    b = layers.Conv2D(8, 1, name="dw_project")(b)
    s = layers.Add(name="add")([a, b])
    s = layers.Activation("relu", name="add_relu")(s)
    c = layers.Concatenate(name="concat")([s, x])
    c = layers.MaxPooling2D(3, strides=2, padding="same", name="pool")(c)      # 10 -> 5, pad 0/1
    c = layers.AveragePooling2D(3, strides=1, padding="same", name="avg")(c)   # symmetric 1/1
    c = layers.AveragePooling2D(2, name="avg_valid")(c)                         # 5 -> 2
    c = layers.Conv2D(16, 1, activation="relu", name="head")(c)
    c = layers.GlobalAveragePooling2D(name="gap")(c)
    out = layers.Dense(7, name="logits")(c)
    return keras.Model(image, out, name="func")


def unsupported() -> keras.Model:
    image = keras.Input((8, 8, 1))
    x = layers.Conv2D(2, 3, padding="same", name="conv")(image)
    x = layers.UpSampling2D(name="upsample")(x)
    x = layers.LayerNormalization(name="layer_norm")(x)
    x = layers.Conv2DTranspose(2, 3, name="deconv")(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(image, layers.Dense(3)(x))


def randomise_batchnorm(model: keras.Model, rng: np.random.Generator) -> None:
    # Fresh BatchNormalization layers are the identity; random statistics make them count.
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.3, beta.shape),
                               rng.normal(0, 0.3, mean.shape), rng.uniform(0.5, 2.0, var.shape)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "tests" / "data"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    meta = json.dumps({"keras": keras.__version__, "backend": keras.backend.backend(),
                       "numpy": np.__version__})
    for name, build in (("sequential", sequential), ("functional", functional)):
        model = build()
        randomise_batchnorm(model, rng)
        shape = model.input_shape[1:]
        inputs = rng.uniform(-1, 1, (4, *shape)).astype(np.float32)
        outputs = np.asarray(model.predict(inputs, verbose=0), np.float32)
        model.save(out / f"keras_{name}.h5")
        model.save(out / f"keras_{name}.keras")
        np.savez_compressed(out / f"keras_{name}.npz", inputs=inputs, outputs=outputs, meta=meta)
        print(f"{name}: {model.count_params()} parameters, outputs {outputs.shape}")
    unsupported().save(out / "keras_unsupported.keras")


if __name__ == "__main__":
    main()
