"""engine.arkit: ARKit names, the model -> ARKit mapping and the left/right convention,
checked end to end on renders of the face model run through the capture pipeline."""
from __future__ import annotations


import numpy as np
import pytest


from engine.arkit import (
    ARKIT_NAMES,
    LIVELINK_CSV_NAMES,
    LIVELINK_POSE_NAMES,
    arkit_from_model,
    arkit_mapping_matrix,
    arkit_name_of_model_shape,
    pascal_case,
)
from engine.pose import default_camera_matrix, model_to_camera, project



# ---------------------------------------------------------------- names


def test_arkit_names_in_apples_order():
    assert len(ARKIT_NAMES) == 52 and len(set(ARKIT_NAMES)) == 52
    assert ARKIT_NAMES[0] == "eyeBlinkLeft"
    assert ARKIT_NAMES[7] == "eyeBlinkRight"
    assert ARKIT_NAMES[14] == "jawForward"
    assert ARKIT_NAMES[15] == "jawLeft" and ARKIT_NAMES[16] == "jawRight"
    assert ARKIT_NAMES[17] == "jawOpen"
    assert ARKIT_NAMES[21] == "mouthLeft" and ARKIT_NAMES[22] == "mouthRight"
    assert ARKIT_NAMES[43] == "browInnerUp"
    assert ARKIT_NAMES[46] == "cheekPuff"
    assert ARKIT_NAMES[-1] == "tongueOut"


def test_livelink_names_are_a_permutation_of_arkit():
    assert len(LIVELINK_CSV_NAMES) == 52
    assert sorted(LIVELINK_CSV_NAMES) == sorted(pascal_case(n) for n in ARKIT_NAMES)
    # Live Link Face swaps the Left/Right order of jaw and mouth only
    differ = [i for i, (a, b) in enumerate(zip(ARKIT_NAMES, LIVELINK_CSV_NAMES)) if pascal_case(a) != b]
    assert differ == [15, 16, 21, 22]
    assert LIVELINK_CSV_NAMES[15:17] == ("JawRight", "JawLeft")
    assert LIVELINK_CSV_NAMES[21:23] == ("MouthRight", "MouthLeft")
    assert len(LIVELINK_POSE_NAMES) == 9


def test_pascal_case_and_shape_names():
    assert pascal_case("eyeBlinkLeft") == "EyeBlinkLeft"
    assert arkit_name_of_model_shape("eyeBlink_L") == "eyeBlinkLeft"
    assert arkit_name_of_model_shape("mouthSmile_R") == "mouthSmileRight"
    assert arkit_name_of_model_shape("jawOpen") == "jawOpen"


# ---------------------------------------------------------------- mapping


def test_mapping_matrix_of_the_real_model_name_by_name(model):
    names = model.expression_names
    assert len(names) == 53
    W = model.arkit_mapping()
    assert W.shape == (52, 53)
    np.testing.assert_array_equal(W, arkit_mapping_matrix(names))
    ark = {n: i for i, n in enumerate(ARKIT_NAMES)}
    halves = {"browInnerUp_L", "browInnerUp_R", "cheekPuff_L", "cheekPuff_R"}
    for j, name in enumerate(names):
        col = W[:, j]
        if name in halves:
            target = name[:-2]
            assert col[ark[target]] == 0.5, name
            assert np.count_nonzero(col) == 1, name
            continue
        if name.endswith("_L"):
            target = name[:-2] + "Left"
        elif name.endswith("_R"):
            target = name[:-2] + "Right"
        else:
            target = name
        assert target in ark, name
        assert col[ark[target]] == 1.0, name
        assert np.count_nonzero(col) == 1, name
    # rows: tongueOut has no model shape; the two merged shapes have two halves; all others exactly one 1
    for i, an in enumerate(ARKIT_NAMES):
        row = W[i]
        if an == "tongueOut":
            assert not row.any()
        elif an in ("browInnerUp", "cheekPuff"):
            assert sorted(names[j] for j in np.flatnonzero(row)) == [an + "_L", an + "_R"]
            assert np.all(row[row != 0] == 0.5)
        else:
            assert np.count_nonzero(row) == 1 and row.max() == 1.0, an
    # explicit spot checks of the side convention (no swap)
    assert W[ark["eyeBlinkLeft"], names.index("eyeBlink_L")] == 1.0
    assert W[ark["eyeBlinkRight"], names.index("eyeBlink_R")] == 1.0
    assert W[ark["mouthLeft"], names.index("mouthLeft")] == 1.0
    assert W[ark["jawRight"], names.index("jawRight")] == 1.0


def test_mapping_rejects_unknown_names():
    with pytest.raises(ValueError):
        arkit_mapping_matrix(["eyeBlink_L", "notAShape"])


def test_arkit_from_model(model):
    W = model.arkit_mapping()
    names = model.expression_names
    w = np.zeros((2, 53))
    w[0, names.index("browInnerUp_L")] = 0.8
    w[0, names.index("browInnerUp_R")] = 0.4
    w[0, names.index("jawOpen")] = 0.7
    w[1, names.index("cheekPuff_L")] = 1.0
    a = arkit_from_model(w, W)
    assert a.shape == (2, 52)
    ark = {n: i for i, n in enumerate(ARKIT_NAMES)}
    assert a[0, ark["browInnerUp"]] == pytest.approx(0.6)
    assert a[0, ark["jawOpen"]] == pytest.approx(0.7)
    assert a[1, ark["cheekPuff"]] == pytest.approx(0.5)
    assert np.count_nonzero(a[0]) == 2 and np.count_nonzero(a[1]) == 1
    assert np.all(arkit_from_model(np.full(53, 3.0), W) <= 1.0)


# ---------------------------------------------------------------- left / right on the model


def _moved(model, name, threshold_cm=0.1):
    d = np.linalg.norm(model.expression_modes[model.expression_names.index(name)], axis=1)
    return d > threshold_cm


@pytest.mark.parametrize("shape,sign", [("eyeBlink_L", 1), ("eyeBlink_R", -1),
                                        ("mouthSmile_L", 1), ("mouthSmile_R", -1)])
def test_model_left_shapes_move_the_subjects_left(model, shape, sign):
    """The model's _L moves vertices on +x, the subject's left."""
    moved = _moved(model, shape)
    assert moved.sum() > 20
    x = model.neutral[moved, 0]
    if shape.startswith("eyeBlink"):
        assert np.all(sign * x > 0)
    else:  # a smile drags a little across the midline; nearly all its motion lies on one side
        d = np.linalg.norm(model.expression_modes[model.expression_names.index(shape)], axis=1)
        assert sign * np.average(model.neutral[:, 0], weights=d) > 2.0
        assert d[sign * model.neutral[:, 0] > 0].sum() > 0.85 * d.sum()


def test_subjects_left_is_on_the_image_right(model):
    """Frontal pose, unmirrored camera: what eyeBlink_L moves projects right of the principal point."""
    K = default_camera_matrix(640, 480)
    R = model_to_camera(0.0, 0.0, 0.0)
    t = np.array([0.0, 0.0, 60.0])
    cam = model.neutral.astype(np.float64) @ R.T + t
    uv = project(cam, K)
    for shape, right in (("eyeBlink_L", True), ("eyeBlink_R", False)):
        u = uv[_moved(model, shape), 0]
        assert np.all(u > K[0, 2]) if right else np.all(u < K[0, 2]), shape
    # and the model's +y (up) is the image's up
    top = uv[np.argmax(model.neutral[:, 1]), 1]
    bottom = uv[np.argmin(model.neutral[:, 1]), 1]
    assert top < K[1, 2] < bottom


# ---------------------------------------------------------------- end to end: render -> MediaPipe -> fit -> ARKit


@pytest.fixture(scope="module")
def pipeline(model):
    from capture.pipeline import CaptureSettings, FaceCapture
    from engine.correspondence import LandmarkCorrespondence

    # the landmark optimiser: these renders check its conventions end to end (CoarseNet has its own tests)
    cap = FaceCapture(model, LandmarkCorrespondence.load(), CaptureSettings(static=True, engine="fit"))
    yield cap
    cap.close()


@pytest.fixture(scope="module")
def renderer(model):
    from trainers.correspondence import drawn_triangles, render, vertex_colours

    tris = drawn_triangles(model)
    colours = vertex_colours(model)
    size = 512
    K = np.array([[1200.0, 0.0, (size - 1) / 2], [0.0, 1200.0, (size - 1) / 2], [0.0, 0.0, 1.0]])
    t = np.array([0.0, -1.0, 75.0])

    def draw(weights: dict[str, float]) -> np.ndarray:
        e = np.zeros(model.n_expression)
        for name, value in weights.items():
            e[model.expression_names.index(name)] = value
        img, _ = render(model, model.vertices(None, e), model_to_camera(0.0, 0.0, 0.0), t, K, (size, size),
                        tris, colours)
        return img

    return draw


def _arkit(pipeline, image) -> dict[str, float]:
    result = pipeline.process(image, 0.0)
    assert result.face_found, "MediaPipe found no face in the render"
    return dict(zip(ARKIT_NAMES, result.blendshapes.tolist()))


def test_render_subjects_left_eye_is_on_image_right(renderer):
    """The render itself: closing the model's left eye changes the image's right half.

    (eyeBlink_L also carries float16-rounding motion of ~0.002 cm elsewhere, which may flip
    a silhouette pixel or two; the eye itself is hundreds of pixels.)"""
    open_eyes = renderer({}).astype(int)
    closed = renderer({"eyeBlink_L": 1.0}).astype(int)
    changed = np.abs(closed - open_eyes).sum(axis=2) > 30
    half = open_eyes.shape[1] // 2
    right, left = changed[:, half:].sum(), changed[:, :half].sum()
    assert right > 200
    assert left < 0.02 * right


def test_neutral_render_gives_no_blink_or_smile(pipeline, renderer):
    a = _arkit(pipeline, renderer({}))
    for name in ("eyeBlinkLeft", "eyeBlinkRight", "mouthSmileLeft", "mouthSmileRight"):
        assert a[name] < 0.2, (name, a[name])


@pytest.mark.parametrize("shape,closed,open_", [("eyeBlink_L", "eyeBlinkLeft", "eyeBlinkRight"),
                                                ("eyeBlink_R", "eyeBlinkRight", "eyeBlinkLeft")])
def test_end_to_end_one_eye_closed(pipeline, renderer, shape, closed, open_):
    """The model's left eye fully closed must come out as ARKit's eyeBlinkLeft (the subject's
    own left), clearly more closed than the open eye."""
    a = _arkit(pipeline, renderer({shape: 1.0}))
    assert a[closed] > 0.4 and a[open_] < 0.2, {closed: a[closed], open_: a[open_]}


@pytest.mark.parametrize("shape,side,other", [("mouthSmile_L", "mouthSmileLeft", "mouthSmileRight"),
                                              ("mouthSmile_R", "mouthSmileRight", "mouthSmileLeft")])
def test_end_to_end_one_sided_smile(pipeline, renderer, shape, side, other):
    a = _arkit(pipeline, renderer({shape: 1.0}))
    assert a[side] > 0.4 and a[other] < 0.2, {side: a[side], other: a[other]}
