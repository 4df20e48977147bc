"""The mapping's controls on real faces, through the whole pipeline (DESIGN.md, controls).

* planted network: channels built to respond where AU regions lie are mapped to those AUs;
* no spatial preference: no more significant pairs than the false discovery rate allows,
  over several seeds.

Faces: the first FER2013 test images when the split is on this machine, else the sample
faces, mirrored and turned by up to 6 degrees (70 real faces, landmarks detected anew on
each).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from interp_fer import open_dataset
from interp_fer.controls import mean_region_templates, no_preference_model, planted_model
from interp_fer.layer_mapping import MappingOptions
from interp_fer.mapping import input_landmarks, map_dataset
from interp_fer.samples import SAMPLE_FACES, sample_face

# Regions that do not contain one another (AU25 lies inside AU23's lips, AU12/14/20 share
# the mouth corners): a planted channel must then have exactly one right answer.
PLANTED = [1, 2, 6, 9, 17]
FDR = 0.05


@pytest.fixture(scope="module")
def faces(fer2013_optional, tmp_path_factory, mini_xception):
    if fer2013_optional is not None:
        dataset = open_dataset(fer2013_optional / "test_labels.csv",
                               class_names=mini_xception.class_names)
        return dataset.subset(limit=160, stratify=True)
    folder = tmp_path_factory.mktemp("faces")
    for name in SAMPLE_FACES:
        face = Image.fromarray(sample_face(name))
        for mirrored in (False, True):
            image = face.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if mirrored else face
            for angle in (-6, -3, 0, 3, 6):
                image.rotate(angle, resample=Image.Resampling.BILINEAR).save(
                    folder / f"{name}_{'mirror' if mirrored else 'plain'}_{angle}.png")
    return open_dataset(folder)


def _map(model, faces, seed):
    options = MappingOptions(n_boot=10, n_null=20, seed=seed)
    return map_dataset(model, faces, ["detector"], locate="rf-center", options=options,
                       batch_size=64, progress=False)


def test_planted_channels_are_mapped_to_their_aus(mini_xception, faces):
    landmarks = input_landmarks(mini_xception, faces)
    templates = mean_region_templates(landmarks, PLANTED, mini_xception.input_size)
    # Each channel responds in proportion to how often its AU's region covers a pixel.
    assert (templates.max(axis=(1, 2)) > 0.2).all()
    templates /= templates.max(axis=(1, 2), keepdims=True)
    result = _map(planted_model(mini_xception, templates), faces, seed=0)
    mapping = result.mapping.set_index("channel")
    assert mapping["au"].astype("Int64").fillna(-1).tolist() == PLANTED, result.mapping
    assert (mapping["q_value"] < 0.01).all()
    assert (mapping["stability"] >= 0.9).all()
    assert (mapping["hit_rate"] > mapping["chance_rate"]).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_spatial_preference_maps_nothing_beyond_the_fdr(mini_xception, faces, seed):
    model = no_preference_model(mini_xception, channels=8, seed=seed)
    result = _map(model, faces, seed=seed)
    scores = result.scores
    assert scores["p_value"].notna().all()
    # Under the global null, Benjamini-Hochberg bounds P(any discovery) by the FDR; allow one
    # false pair per run (of 8 x 17 = 136) so the test checks calibration, not luck.
    assert (scores["q_value"] <= FDR).sum() <= 1, scores.nsmallest(5, "p_value")
    # The p-values of a null are spread out, not piled at 0.
    assert np.mean(scores["p_value"] < 0.05) < 0.15
