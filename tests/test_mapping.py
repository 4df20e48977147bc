"""The mapping's tables and stages (interp_fer.mapping) on small, known inputs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from interp_fer.decision import _looks_at
from interp_fer.mapping import (
    MappingResult,
    _containment,
    channels_for_au,
    compare_with_control,
    face_activity,
    headline,
    label_activity,
    layer_summary,
    long_scores,
    weights_digest,
)


def _scores():
    rows = []
    for channel, au, distance, p in [(0, 6, 0.8, 1e-6), (0, 12, 1.5, 1e-9), (0, 4, -0.2, 0.9),
                                     (1, 6, 0.1, 0.4), (1, 12, 0.05, 0.6), (1, 4, 0.2, 0.3)]:
        rows.append(dict(layer="conv_2", channel=channel, au=au, distance=distance, ci_low=0.0,
                         ci_high=1.0, p_value=p, stability=0.5, hit_rate=0.3, chance_rate=0.1,
                         iou=0.05, n_images=100))
    return pd.DataFrame(rows)


def test_long_table_has_every_measure_of_every_pair():
    long = long_scores(_scores())
    assert set(long.columns) == {"layer", "channel", "au", "measure", "value"}
    assert len(long) == 6 * long["measure"].nunique()
    value = long[(long.channel == 0) & (long.au == 12) & (long.measure == "distance")]["value"]
    np.testing.assert_allclose(value, 1.5)


def test_channels_for_au_strongest_first():
    mapping = pd.DataFrame({"layer": "l", "channel": [0, 1, 2],
                            "au": pd.array([12, pd.NA, 12], dtype="Int64"),
                            "auc": [0.7, 0.9, 0.8]})
    assert list(channels_for_au(mapping, 12)["channel"]) == [2, 0]


def test_map_refuses_several_faces_per_image(mini_xception, sample_faces):
    from interp_fer.faces import LandmarkSettings
    from interp_fer.mapping import map_dataset

    with pytest.raises(ValueError, match="one face per image"):
        map_dataset(mini_xception, sample_faces, ["conv2"],
                    landmark_settings=LandmarkSettings(faces="all"), progress=False)


def test_control_percentile_ranks_excess_among_the_controls_channels():
    scores = _scores()
    scores["excess"] = [3.0, 0.5, -1.0, 0.0, 0.0, 0.0]
    control = _scores()
    control = pd.concat([control, control.assign(channel=control["channel"] + 2)])
    control["excess"] = [1.0, 0.5, 0.0, 2.0, 0.5, 0.0,
                         1.0, 0.1, 0.0, 2.0, 0.1, 0.0]
    out = compare_with_control(scores, control)
    by_pair = out.set_index(["channel", "au"])["control_percentile"]
    assert by_pair[(0, 6)] == 1.0  # 3.0 beats 1, 2, 1, 2
    assert by_pair[(0, 12)] == 0.75  # 0.5 beats 0.1, 0.1 and ties 0.5 twice: (2 + 1) / 4
    assert by_pair[(0, 4)] == 0.0


def test_containment_counts_nested_cells():
    # Region 0's cells lie inside region 1's on both faces; region 2 is elsewhere; region 3
    # is empty on face 1 (clipped) and never counts as inside anything.
    member = np.zeros((2, 4, 6), dtype=bool)
    member[:, 0, [1, 2]] = True
    member[:, 1, [1, 2, 3]] = True
    member[:, 2, [5]] = True
    member[0, 3, [1]] = True
    counts = _containment(member)
    assert counts[0, 1] == 2 and counts[1, 0] == 0
    assert counts[3, 0] == 1 and counts[3, 1] == 1
    assert counts[2].sum() == 0 and np.trace(counts) == 0


def test_looks_at_says_when_regions_share_cells():
    looks = pd.DataFrame({"layer": "l", "channel": [0, 0, 0, 1, 1, 1],
                          "region": ["AU23", "AU25", "sham_jaw"] * 2,
                          "distance": [0.5, 0.9, 0.1, 0.2, 0.1, 0.3]})
    containment = {"l": np.array([[0, 0, 0], [10, 0, 0], [0, 0, 0]])}  # AU25 inside AU23
    table = _looks_at(looks, containment, n_faces=10).set_index("channel")
    assert table.loc[0, "looks_at"] == "AU25"
    assert not table.loc[0, "looks_at_resolvable"]
    assert table.loc[0, "looks_at_shares_cells_with"] == "AU23"
    assert table.loc[1, "looks_at"] == "sham_jaw" and table.loc[1, "looks_at_resolvable"]


def _records(aus):
    from interp_fer.data import Record

    return [Record(key=str(i), label_name=name, aus=a)
            for i, (name, a) in enumerate(aus)]


def test_activity_prefers_labels_coded_on_every_face(sample_faces, mini_xception):
    from interp_fer.mapping import prepare_faces

    faces = prepare_faces(mini_xception, sample_faces, progress=False).faces[:3]
    records = _records([("happy", {12: 1.0, 1: 0.0}), ("sad", {12: 0.0, 1: 2.0}),
                        ("neutral", {12: 0.0})])
    activity, tested, sources = face_activity(faces, records, [1, 12, 27])
    assert tested == (1, 12, 27)
    # AU12 is coded everywhere: labels. AU1 misses a code on one face: landmarks.
    assert sources == {"AU1": "landmarks", "AU12": "labels", "AU27": "landmarks"}
    np.testing.assert_array_equal(activity[:, 1], [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(label_activity(records, [1])[:, 0], [0.0, 2.0, np.nan])
    only, tested, sources = face_activity(faces, records, [1, 12], source="labels")
    assert tested == (12,) and sources == {"AU12": "labels"}
    protos, tested, _ = face_activity(faces, records, [1, 6, 12], source="expressions")
    np.testing.assert_array_equal(protos, [[0, 1, 1], [1, 0, 0], [0, 0, 0]])
    with pytest.raises(ValueError, match="activity source"):
        face_activity(faces, records, [1], source="guess")


def test_weights_digest_changes_with_any_parameter(mini_xception):
    from interp_fer.controls import randomized_copy

    digest = weights_digest(mini_xception.module)
    assert digest == weights_digest(mini_xception.module)
    copy = randomized_copy(mini_xception, seed=1)
    assert weights_digest(copy.module) != digest
    # Every parameter was re-drawn, normalisation terms included.
    trained = dict(mini_xception.module.named_parameters())
    for name, value in copy.module.named_parameters():
        assert not np.allclose(value.detach().cpu().numpy(),
                               trained[name].detach().cpu().numpy()), name


def test_headline_and_layer_summary_put_the_control_beside_the_network():
    mapping = pd.DataFrame({"layer": ["a", "a", "b"], "channel": [0, 1, 0],
                            "au": pd.array([12, pd.NA, 25], dtype="Int64"),
                            "auc": [0.8, 0.5, 0.7], "looks_at": ["AU12", "sham_jaw", "AU25"]})
    control = mapping.assign(au=pd.array([pd.NA, pd.NA, 4], dtype="Int64"))
    run = {"layers": ["a", "b"], "detector": {"small_sample": False},
           "looks_at": {"sham_share": 0.2}}
    result = MappingResult(mapping, pd.DataFrame(), run, control_detectors=control)
    assert headline(result) == ("2 of 3 channels of a, b are AU detectors; the "
                                "random-weights control: 1 of 3")
    summary = layer_summary(result).set_index("layer")
    assert summary.loc["a", "detectors"] == 1 and summary.loc["a", "control_detectors"] == 0
    assert summary.loc["a", "sham_rate"] == 0.5 and summary.loc["b", "control_detectors"] == 1
