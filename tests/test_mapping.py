"""From per-pair scores to the channel -> AU table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from interp_fer.mapping import MAPPING_COLUMNS, channels_for_au, long_scores, mapping_table


def _scores():
    rows = []
    # channel 0: AU 12 strong and significant, AU 6 weaker but also significant -> 12
    # channel 1: nothing significant -> au empty, best_au 4
    for channel, au, distance, p in [(0, 6, 0.8, 1e-6), (0, 12, 1.5, 1e-9), (0, 4, -0.2, 0.9),
                                     (1, 6, 0.1, 0.4), (1, 12, 0.05, 0.6), (1, 4, 0.2, 0.3)]:
        rows.append(dict(layer="conv_2", channel=channel, au=au, distance=distance, ci_low=0.0,
                         ci_high=1.0, p_value=p, stability=0.5, hit_rate=0.3, chance_rate=0.1,
                         iou=0.05, n_images=100))
    return pd.DataFrame(rows)


def test_mapping_picks_largest_significant_distance():
    table = mapping_table(_scores())
    assert list(table.columns[:len(MAPPING_COLUMNS)]) == MAPPING_COLUMNS
    first, second = table.iloc[0], table.iloc[1]
    assert first["au"] == 12 and first["significant"]
    assert first["q_value"] < 1e-8
    assert pd.isna(second["au"]) and second["best_au"] == 4 and not second["significant"]
    assert list(channels_for_au(table, 12)["channel"]) == [0]


def test_long_table_has_every_measure_of_every_pair():
    long = long_scores(_scores())
    assert set(long.columns) == {"layer", "channel", "au", "measure", "value"}
    assert len(long) == 6 * long["measure"].nunique()
    value = long[(long.channel == 0) & (long.au == 12) & (long.measure == "distance")]["value"]
    np.testing.assert_allclose(value, 1.5)


def test_map_refuses_several_faces_per_image(mini_xception, sample_faces):
    from interp_fer.faces import LandmarkSettings
    from interp_fer.mapping import map_dataset

    with pytest.raises(ValueError, match="one face per image"):
        map_dataset(mini_xception, sample_faces, ["conv2"],
                    landmark_settings=LandmarkSettings(faces="all"), progress=False)


def test_layer_summary_of_mapped_pairs():
    from interp_fer.mapping import MappingResult, add_q_values, layer_summary

    scores = _scores()
    scores["excess"] = [1.0, 2.0, 0.0, 0.1, 0.1, 0.1]
    scores["label_auc"] = [0.6, 0.9, 0.5, 0.5, 0.5, 0.5]
    scores = add_q_values(scores)
    summary = layer_summary(MappingResult(mapping_table(scores), scores, {}))
    row = summary.iloc[0]
    # Only channel 0 is mapped (to AU 12): its pair's numbers, not channel 1's.
    assert (row["channels"], row["mapped"]) == (2, 1)
    assert row["median_excess"] == 2.0
    np.testing.assert_allclose(row["hit_minus_chance"], 0.2)
    np.testing.assert_allclose(row["label_auc_strength"], 0.4)


def test_control_percentile_ranks_excess_among_the_controls_channels():
    from interp_fer.mapping import compare_with_control

    scores = _scores()
    scores["excess"] = [3.0, 0.5, -1.0, 0.0, 0.0, 0.0]
    control = _scores()
    # control: 4 channels per AU would be typical; 2 here, with a tie at 0.5 for AU 12
    control = pd.concat([control, control.assign(channel=control["channel"] + 2)])
    control["excess"] = [1.0, 0.5, 0.0, 2.0, 0.5, 0.0,
                         1.0, 0.1, 0.0, 2.0, 0.1, 0.0]
    out = compare_with_control(scores, control)
    by_pair = out.set_index(["channel", "au"])["control_percentile"]
    assert by_pair[(0, 6)] == 1.0  # 3.0 beats 1, 2, 1, 2
    assert by_pair[(0, 12)] == 0.75  # 0.5 beats 0.1, 0.1 and ties 0.5 twice: (2 + 1) / 4
    assert by_pair[(0, 4)] == 0.0
    table = mapping_table(out)
    assert table.loc[0, "control_percentile"] == 0.75  # channel 0 maps to AU 12
