"""The per-frame pipeline: landmarks -> fit -> gaze -> filtering -> outputs.

The fit is CoarseNet's one pass on the face crop (engine.coarse_fitting, the
default) or the landmark optimiser (engine.fitting); everything around it is
the same for both, so a take has the same files and arrays whichever ran.

Calibration (engine.calibration: an actor profile, or the take's automatic
neutral) maps the fitted weights to the performer's own range before filtering;
the blendshapes and streams carry the calibrated weights, while the mesh,
landmarks68 and track.npz's `expression` stay the fit's own, which is what the
face in the picture does (and what a profile can be applied to again later).

`FaceCapture` turns one picture into a `FrameResult`; `run_take` drives a
whole source through it into the files animators use (blendshapes.csv,
meshes/, track.npz), with a reader thread, a progress bar and per-stage timings.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from capture.sinks import BackgroundMeshWriter, DetailMapWriter, LiveLinkCsvWriter, MeshSequenceWriter, TrackWriter
from capture.sources import Frame, FrameReader, FrameSource, SourceError
from capture.streams import StreamHub, stream_frame
from capture.take_folder import (DETAIL_FOLDER, DETAIL_NORMAL_FOLDER, POINTCLOUD_FOLDER, OutputError, cut_back,
                                 reason)
from capture.tracking import (FOLLOW_CONFIDENCE, FOLLOW_MIN_PRESENCE, FOLLOW_PATIENCE_FRAMES, FaceTracker,
                              follow_region)
from engine.arkit import arkit_from_model
from engine.calibration import ActorProfile, AutoNeutral
from engine.coarse_fitting import CoarseFitter, open_runtime
from engine.contour import Landmarks68
from engine.correspondence import LandmarkCorrespondence
from engine.depth import backproject, write_ply_points
from engine.depth_fit import DepthBasis, DepthRefiner, DepthSettings
from engine.device import CPU_BACKEND, coarse_runtime_on
from engine.facemodel import FaceModel, barycentric_points
from engine.filters import OneEuroFilter
from engine.fine_runtime import FineRuntime
from engine.fitting import HELD_EXPRESSION_PRIORS, FitResult, FitSettings, LandmarkBasis, TakeFitter
from engine.eyestate import EyeClosure, subject_left_first
from engine.landmark_expression import LandmarkExpression
from engine.gaze import (IRIS_CENTRES, IRIS_LANDMARKS, EyeModel, LidClosure, eye_look_weights, gaze_angles,
                         gaze_visibility, lid_aperture)
from engine.pose import (FRONTAL, default_camera_matrix, head_rotation, project, rodrigues, rotation_to_axis_angle,
                         yaw_pitch_roll)

STAGES = ("decode", "landmarks", "fit", "filter", "stream", "write")  # "fit": whichever engine runs
#: A face the tracker cannot follow any more is fitted from the picture alone while it stays turned at
#: least this far from the camera (degrees of yaw), in the previous fit and in its own.
PICTURE_MIN_YAW_DEG = 45.0
#: ... and while at least this share of its landmark points lies inside the picture.
PICTURE_MIN_INSIDE = 0.5
#: The confidence of a frame fitted from the picture alone: the lowest a followed frame reads
#: (capture.tracking: FOLLOW_CONFIDENCE times FOLLOW_MIN_PRESENCE).
PICTURE_CONFIDENCE = FOLLOW_CONFIDENCE * FOLLOW_MIN_PRESENCE
#: The eye model is rebuilt for a take's moving identity when a weight has moved this far (units of the
#: prior's std; the eyeballs then move well under a millimetre) or once the identity stops moving.
EYES_IDENTITY_STEP = 0.05
ENGINES = ("coarse", "fit")
#: Where eyeBlink comes from: MediaPipe's lid gap against the take's open eye (engine.gaze.LidClosure;
#: videos, the default), the eye-state net on each eye's pixels (sees the winks MediaPipe's lids miss,
#: but reads real open eyes as 0.15-0.25 shut), or the engine's fitted weights.
BLINK_SOURCES = ("lids", "eyes", "fit")
#: Where the expression weights come from. "merged": the landmark-expression MLP (engine.landmark_expression);
#: with the coarse engine only the shapes it read better than the network on validation (the rest are
#: CoarseNet's), with the fit engine every shape (the optimiser then solves pose and identity with them
#: held). "network": CoarseNet's alone (coarse engine only). "solve": the fit engine's optimiser solves
#: all 53 weights from the landmarks itself (fit engine only; its only reading until 2026-12-06).
EXPRESSION_SOURCES = ("merged", "network", "solve")
#: The engine each source other than "merged" needs.
EXPRESSION_ENGINE = {"network": "coarse", "solve": "fit"}


def expression_needs(engine: str, expression: str) -> str | None:
    """The engine the expression source needs where `engine` cannot take it; None where it can."""
    needs = EXPRESSION_ENGINE.get(expression, engine)
    return None if needs == engine else needs


def expression_for(engine: str, expression: str) -> str:
    """The expression source `engine` runs with when `expression` is asked of both engines (the benches):
    that one where the engine takes it, else "merged"."""
    return "merged" if expression_needs(engine, expression) else expression


def fitted_yaw_deg(fit: FitResult) -> float:
    """The fitted head's yaw, degrees (engine.pose.yaw_pitch_roll)."""
    return float(np.degrees(yaw_pitch_roll(head_rotation(fit.rotation))[0]))


@dataclass
class CaptureSettings:
    """What a user may tune. focal_px None: max(width, height) (about 53° across).

    engine: "coarse" (CoarseNet, one network pass per frame) or "fit" (the landmark
    optimiser of engine.fitting). coarse_weights None: the file shipped in
    engine/weights/ for coarse_runtime ("onnx": ONNX Runtime; "torch").

    actor: a performer's profile (`capture calibrate`): its identity is locked from the
    first frame and its neutral and peaks calibrate every frame (photos too); auto_neutral
    is then ignored. auto_neutral, without a profile: each take's neutral is estimated
    from its quietest frames (engine.calibration.AutoNeutral); never for photos, where
    every picture is a face of its own. Neither: the raw fitted weights.
    """

    engine: str = "coarse"
    coarse_weights: Path | None = None
    coarse_runtime: str = "onnx"
    device_backend: str = CPU_BACKEND   # engine.device: where the networks run (choose_device(...).backend)
    coarse_refine_iterations: int = 1   # Gauss-Newton steps on CoarseNet's head pose against the landmarks
    photo_refine_iterations: int = 4    # the same for a photo: no time limit, no previous frame
    blink: str = "lids"                 # eyeBlink from: BLINK_SOURCES (eyes: engine.eyestate.EyeClosure)
    expression: str = "merged"          # EXPRESSION_SOURCES (merged: engine.landmark_expression)
    focal_px: float | None = None
    filtering: bool = True
    small_faces: bool = True
    follow_profiles: bool = True    # a face FaceMesh loses (turned to profile) is followed from the previous fit
    static: bool = False            # photos: every picture fitted on its own
    identity_frames: int = 40       # frames with a face before a take's identity locks
    photo_passes: int = 4           # fit passes over one photo (identity and expression alternate; fit engine)
    photo_identity_prior: float = 0.5
    expression_cutoff_hz: float = 1.5
    expression_beta: float = 2.0
    pose_cutoff_hz: float = 1.5     # tuned on d10/d12/d14: lag ≤ 1.6% of the eye distance (median)
    rotation_beta: float = 30.0     # per rad/s
    translation_beta: float = 3.0   # per cm/s
    actor: ActorProfile | None = None
    auto_neutral: bool = True
    depth: DepthSettings = field(default_factory=DepthSettings)  # frames that come with depth (RGB-D)


@dataclass
class FrameResult:
    """One frame's output. Arrays are absent (None) when no face was found.

    rotation (3, 3) / translation (3,) cm: model to camera; expression (53,) the fitted
    model weights (uncalibrated: the mesh's); blendshapes (52,) ARKit order, from the
    calibrated weights; head_ypr_rad (3,); eyes_ypr_rad (2, 3)
    for the subject's left then right eye; landmarks68 (68, 2) px; landmarks (478, 3)
    MediaPipe's, px.
    """

    index: int
    time_s: float
    face_found: bool
    camera_matrix: np.ndarray
    image_size: tuple[int, int]
    confidence: float = 0.0  # the tracker's (FaceTracker.confidence): 1 FaceMesh's own, <= 0.5 followed, 0 no face
    from_picture: bool = False  # fitted from the picture alone (no landmarks; confidence PICTURE_CONFIDENCE)
    decoded: bool = True     # False: the source could not decode this frame (nothing was tracked)
    landmarks: np.ndarray | None = None
    rotation: np.ndarray | None = None
    translation: np.ndarray | None = None
    expression: np.ndarray | None = None
    identity: np.ndarray | None = None
    blendshapes: np.ndarray | None = None
    head_ypr_rad: np.ndarray | None = None
    eyes_ypr_rad: np.ndarray | None = None
    landmarks68: np.ndarray | None = None
    rms_px: float = float("nan")
    depth_samples: int = 0                       # depth samples the fit was refined against (0: no depth used)
    depth_residual_mm: float = float("nan")      # median |model - depth| over the front-face ones, point to plane
    timings_s: dict = field(default_factory=dict)


@dataclass
class TrackedFrame:
    """A frame tracked but not yet fitted (FaceCapture.track -> finish). landmarks (478, 3) px, None when
    the tracker found no face; K (3, 3) px; predict_s: its share of a batched network pass, counted in
    the fit stage."""

    image: np.ndarray
    time_s: float
    index: int
    depth_mm: np.ndarray | None
    K: np.ndarray
    landmarks: np.ndarray | None
    confidence: float
    timings_s: dict
    predict_s: float = 0.0


class FaceCapture:
    """Landmarks, fit, gaze and filtering for a stream of pictures of one take."""

    def __init__(self, model: FaceModel, correspondence: LandmarkCorrespondence,
                 settings: CaptureSettings | None = None):
        self.model = model
        self.settings = settings or CaptureSettings()
        if self.settings.engine not in ENGINES:
            raise ValueError(f"unknown engine {self.settings.engine!r} (choose from {', '.join(ENGINES)})")
        if self.settings.blink not in BLINK_SOURCES:
            raise ValueError(f"unknown blink source {self.settings.blink!r} (choose from {', '.join(BLINK_SOURCES)})")
        if self.settings.expression not in EXPRESSION_SOURCES:
            raise ValueError(f"unknown expression source {self.settings.expression!r} "
                             f"(choose from {', '.join(EXPRESSION_SOURCES)})")
        needs = expression_needs(self.settings.engine, self.settings.expression)
        if needs:
            raise ValueError(f"expression source {self.settings.expression!r} needs the {needs} engine "
                             f"(this take uses {self.settings.engine!r})")
        actor = self.settings.actor
        if actor is not None and actor.shape_names != model.expression_names:
            raise ValueError("the actor profile's shapes are not this face model's expression shapes")
        self._runtime = None  # bad weights fail here, before the tracker loads
        if self.settings.engine == "coarse":  # one runtime for the whole take (photos get a fitter each)
            kind, provider = coarse_runtime_on(self.settings.device_backend, self.settings.coarse_runtime,
                                               self.settings.coarse_weights is not None)
            self._runtime = open_runtime(kind, self.settings.coarse_weights, provider)
        self._landmark_expression = LandmarkExpression.load() if self.settings.expression == "merged" else None
        # iris landmarks take no part in the lid/face fit: the eyeballs are rigid in the model
        self.basis = LandmarkBasis.from_correspondence(model, correspondence, exclude=IRIS_LANDMARKS)
        self.landmarks68 = Landmarks68(model, self.basis.identity.shape[0])
        iris = list(IRIS_CENTRES)
        self._iris_surface = (correspondence.triangle[iris], correspondence.barycentric[iris])
        self._arkit = model.arkit_mapping()
        self._look = {name: model.expression_names.index(name) for name in
                      eye_look_weights(np.zeros((2, 2)))}
        self._blink = [model.expression_names.index(n) for n in ("eyeBlink_L", "eyeBlink_R")]  # gaze.py's eye order
        self.eye_closure = EyeClosure(subject_left_first(model, correspondence)) \
            if self.settings.blink == "eyes" else None
        self._expression_2d = model.expression_modes.reshape(model.n_expression, -1)
        self.tracker = FaceTracker(static=self.settings.static, small_faces=self.settings.small_faces)
        # the vertices the eye model reads: both scleras and the iris landmarks' triangles
        self._eye_vertices = np.union1d(model.material_vertices("M_ScleraLeft", "M_ScleraRight"),
                                        model.triangles[self._iris_surface[0]])
        self._identity_mesh = None
        self._identity_of_mesh = None
        self.eyes = None
        self._eyes_identity = self._last_identity = None
        self._follow = None  # () -> where the last fitted face was (capture.tracking.FollowRegion), None after a loss
        self._follow_fit = None  # that fit (FitResult)
        self._tracked_px = None  # (N, 2) the tracker's last landmarks, px (where a picture fit crops)
        self._follow_misses = 0  # frames without a face since that fit
        self.depth_basis = None  # engine.depth_fit's samples, built with the first frame that has depth
        self.identity_depth_basis = None  # and the identity solves' denser ones
        self._warm_up()
        self.reset()

    def _warm_up(self) -> None:
        """Load the engine now (compiled kernels, the network's first pass), not on a live take's first frame."""
        if self._runtime is not None:
            CoarseFitter(self.basis, self._runtime).warm_up()
            return
        K = default_camera_matrix(640, 480)
        R, t = FRONTAL, np.array([0.0, 0.0, 60.0])
        identity = np.zeros(self.basis.identity.shape[0])
        landmarks = project(self.basis.points(identity, np.zeros(self.model.n_expression)) @ R.T + t, K)
        fitter = TakeFitter(self.basis, FitSettings(identity_frames=1, identity_rounds=1),
                            landmark_expression=self._landmark_expression)
        fitter.fit(landmarks, K)

    def reset(self) -> None:
        """Start a new take: identity, tracking, filters and the automatic neutral start afresh
        (an actor profile's identity is locked again)."""
        s = self.settings
        self._new_fitter()
        # eye closure from the lids: the take learns its open eye (a photo has none to learn from)
        self.lid_closure = LidClosure() if s.blink == "lids" and not s.static else None
        self.auto_neutral = None
        if s.actor is None and s.auto_neutral and not s.static:
            self.auto_neutral = AutoNeutral(self.model.expression_names)
        self._expression_filter = OneEuroFilter(s.expression_cutoff_hz, s.expression_beta)
        self._calibrated_filter = OneEuroFilter(s.expression_cutoff_hz, s.expression_beta)
        self._pose_filter = OneEuroFilter(s.pose_cutoff_hz, np.r_[np.full(3, s.rotation_beta),
                                                                  np.full(3, s.translation_beta)])
        self.tracker.reset()
        self._follow = self._follow_fit = self._tracked_px = None
        self._update_eyes(self.fitter.identity)

    def _new_fitter(self) -> None:
        s = self.settings
        identity = s.actor.identity if s.actor is not None else None  # locked from the first frame
        self.depth_refiner = None  # made by the first frame with depth (_refine_with_depth)
        if self._runtime is not None:  # a photo's identity is its own network output
            self.fitter = CoarseFitter(self.basis, self._runtime, 1 if s.static else s.identity_frames, identity,
                                       s.photo_refine_iterations if s.static else s.coarse_refine_iterations,
                                       self._landmark_expression)
            return
        if s.static:  # one photo's passes see the same landmarks: its prior must not weaken with them
            fit = FitSettings(identity_frames=s.photo_passes, identity_prior_joint=s.photo_identity_prior)
        else:
            held = HELD_EXPRESSION_PRIORS if self._landmark_expression is not None else {}
            fit = FitSettings(identity_frames=s.identity_frames, **held)
        self.fitter = TakeFitter(self.basis, fit, identity, landmark_expression=self._landmark_expression)

    def _calibrated(self, expression: np.ndarray) -> np.ndarray | None:
        """The fitted weights in the performer's own range (the profile's, else the take's
        automatic neutral); None when calibration is off."""
        if self.settings.actor is not None:
            return self.settings.actor.apply(expression)
        if self.auto_neutral is not None:
            return self.auto_neutral(expression)
        return None

    def _eyes_stale(self, identity: np.ndarray) -> bool:
        """Whether the eye model should follow this identity: always for a photo; in a take, when the
        identity has moved EYES_IDENTITY_STEP since the eyes were built or has stopped moving (locked),
        so the take's first frames, whose identity moves a little every frame, do not rebuild the
        eyes every frame (about 3 ms each)."""
        if np.array_equal(identity, self._eyes_identity):
            return False
        return (self.settings.static or np.abs(identity - self._eyes_identity).max() >= EYES_IDENTITY_STEP
                or np.array_equal(identity, self._last_identity))

    def _update_eyes(self, identity: np.ndarray) -> None:
        """Eyeball centres and rest gaze for this identity (only the eye vertices are built)."""
        idx, k = self._eye_vertices, len(identity)
        vertices = np.zeros_like(self.model.neutral)
        vertices[idx] = self.model.neutral[idx] + np.tensordot(
            identity.astype(np.float32), self.model.identity_modes[:k, idx], axes=1)
        iris = barycentric_points(vertices, self.model.triangles, *self._iris_surface)
        self.eyes = EyeModel.from_model(self.model, vertices, iris)
        self._eyes_identity = identity.copy()

    def camera_matrix(self, width: int, height: int) -> np.ndarray:
        return default_camera_matrix(width, height, self.settings.focal_px)

    def process(self, image: np.ndarray, time_s: float, index: int = 0, depth_mm: np.ndarray | None = None,
                camera_matrix: np.ndarray | None = None) -> FrameResult:
        """One RGB picture (H, W, 3) uint8 at time_s -> FrameResult.

        depth_mm: (H, W) depth registered to the picture (colour camera z, mm; 0 = no data): the
        fit is refined against it (engine.depth_fit). camera_matrix: the colour camera's K (px),
        when the source knows it (its calibration wins over settings.focal_px, a guess for
        sources without one, and the depth is registered with it)."""
        return self.finish(self.track(image, time_s, index, depth_mm, camera_matrix))

    def track(self, image: np.ndarray, time_s: float, index: int = 0, depth_mm: np.ndarray | None = None,
              camera_matrix: np.ndarray | None = None, before_follow=None) -> TrackedFrame:
        """The first half of `process`: the frame's landmarks. Frames may be tracked ahead of their fits
        (`finish`, in the same order): the tracker needs the previous frame's fit only when FaceMesh
        loses the face, and then calls before_follow() first, which must finish every frame tracked
        so far (run_take's batches)."""
        h, w = image.shape[:2]
        K = self.camera_matrix(w, h) if camera_matrix is None else np.asarray(camera_matrix, np.float64)
        t0 = time.perf_counter()
        if self.settings.static:  # every photo its own face: fresh identity and tracking
            self.tracker.reset()
            self._new_fitter()
            self._update_eyes(self.fitter.identity)

        waited = [0.0]  # finishing the frames before this one is their time, not this frame's tracking

        def follow():
            if before_follow is not None:
                t = time.perf_counter()
                before_follow()
                waited[0] = time.perf_counter() - t
            # a face lost while turned is fitted from the picture: MediaPipe's landmarks for a profile are
            # guesses (bench/eval_profile.py: its followed landmarks put the yaw 30-90 degrees off)
            region = self._follow_region()
            return None if region is None or self._turned(self._follow_fit) else region()

        landmarks = self.tracker.track(image, follow if self._following() else None)
        timings = {"landmarks": time.perf_counter() - t0 - waited[0]}
        return TrackedFrame(image, time_s, index, depth_mm, K, landmarks, self.tracker.confidence, timings)

    def _following(self) -> bool:
        """Whether a face this take lost may be followed from its last fit."""
        return self.settings.follow_profiles and not self.settings.static

    def _follow_region(self):
        """() -> where the last fitted face was (capture.tracking.FollowRegion), or None."""
        return self._follow if self._following() else None

    def predict(self, tracked: list[TrackedFrame]) -> list[dict | None]:
        """CoarseNet on the crops of these tracked frames in one batch: each frame's raw outputs
        (CoarseFitter.predict), None for a frame without landmarks; for `finish`. All None with the
        optimiser (it has no network)."""
        if self._runtime is None:
            return [None] * len(tracked)
        found = [f for f in tracked if f.landmarks is not None]
        if not found:
            return [None] * len(tracked)
        t0 = time.perf_counter()
        outs = iter(self.fitter.predict_batch([f.image for f in found], [f.landmarks for f in found],
                                              [f.K for f in found]))
        share = (time.perf_counter() - t0) / len(found)
        for f in found:
            f.predict_s = share
        return [next(outs) if f.landmarks is not None else None for f in tracked]

    def finish(self, tracked: TrackedFrame, predicted: dict | None = None) -> FrameResult:
        """The second half of `process`: fit, gaze, calibration and filters of a tracked frame.
        predicted: CoarseNet's outputs for it (`predict`), else the network runs here."""
        image, K, landmarks, time_s = tracked.image, tracked.K, tracked.landmarks, tracked.time_s
        timings = dict(tracked.timings_s)
        t1 = time.perf_counter()
        follow = self._follow_region()
        turned = follow is not None and self._turned(self._follow_fit)
        h, w = image.shape[:2]
        fit = self._fit_from_picture(image, K) if landmarks is None and turned else None
        result = FrameResult(tracked.index, time_s, landmarks is not None or fit is not None, K, (w, h),
                             tracked.confidence if fit is None else PICTURE_CONFIDENCE,
                             from_picture=fit is not None, timings_s=timings)
        if not result.face_found:
            self._follow_misses += 1
            if self._follow_misses > FOLLOW_PATIENCE_FRAMES:
                self._follow = self._follow_fit = self._tracked_px = None
            self.fitter.lose_track()
            self._expression_filter.reset()
            self._calibrated_filter.reset()
            self._pose_filter.reset()
            timings["fit"] = timings["filter"] = 0.0
            return result
        gaze = {"angles": np.zeros((2, 2))}
        if fit is not None:  # from the picture alone: the fit's own landmarks stand in for the tracker's
            landmarks = np.zeros((len(self._tracked_px), 3))
            landmarks[:, :2] = self._fitted_landmarks_px(fit, K)
        else:
            self._tracked_px = landmarks[:, :2]
            fit = self._fit_landmarks(image, landmarks, K, tracked.depth_mm, gaze, result, predicted)
        if self._eyes_stale(fit.identity):
            self._update_eyes(fit.identity)
        self._last_identity = fit.identity
        if self._following():
            # made only if the next frames lose the face: FaceMesh finds it in almost every frame
            self._follow_fit = fit
            self._follow = lambda: follow_region(self.basis.points(fit.identity, fit.expression), fit.rotation,
                                                 fit.translation, K)
            self._follow_misses = 0
        t2 = time.perf_counter()
        timings["fit"] = t2 - t1 + tracked.predict_s

        R, t, e = fit.rotation, fit.translation, fit.expression
        shapes = gaze.get("shapes")  # with depth: the engine's weights, which the blendshapes read
        calibrated = self._calibrated(e if shapes is None else shapes)
        if calibrated is None and shapes is not None:  # no calibration: the engine's own, filtered on their own
            calibrated = shapes
        if self.settings.filtering and not self.settings.static:
            e = np.clip(self._expression_filter(e, time_s), 0.0, 1.0)
            if calibrated is not None:  # filtered on its own: the streams see smooth calibrated values
                calibrated = np.clip(self._calibrated_filter(calibrated, time_s), 0.0, 1.0)
            pose = self._pose_filter(np.r_[rotation_to_axis_angle(R @ FRONTAL.T), t], time_s)
            R, t = rodrigues(pose[:3]) @ FRONTAL, pose[3:]
        eyes = np.zeros((2, 3))
        eyes[:, :2] = gaze["angles"]
        result.landmarks = landmarks
        result.rotation, result.translation, result.expression = R, t, e
        result.identity = fit.identity
        result.blendshapes = arkit_from_model(e if calibrated is None else calibrated, self._arkit)
        result.head_ypr_rad = yaw_pitch_roll(head_rotation(R))
        result.eyes_ypr_rad = eyes
        result.landmarks68 = self.landmarks68.project(fit.identity, e, R, t, K)
        result.rms_px = fit.rms_px
        timings["filter"] = time.perf_counter() - t2
        return result

    def _fit_landmarks(self, image: np.ndarray, landmarks: np.ndarray, K: np.ndarray, depth_mm: np.ndarray | None,
                       gaze: dict, result: FrameResult, predicted: dict | None = None) -> FitResult:
        """The engine's fit of a frame with landmarks: gaze and blink pinned at the fitted pose (their
        angles left in gaze["angles"]), refined against the depth when the frame has it. predicted:
        CoarseNet's outputs for the frame, already run (`predict`)."""
        apertures = np.array([lid_aperture(landmarks, i) for i in self.eyes.iris_landmark])
        visible = np.array([[gaze_visibility(a)] for a in apertures])
        if self.eye_closure is not None:
            blink = self.eye_closure(image, landmarks)
        else:
            blink = self.lid_closure(apertures) if self.lid_closure is not None else None

        def pin(R, t):
            gaze["angles"] = gaze_angles(self.eyes, landmarks, R, t, K) * visible
            pinned = {self._look[n]: v for n, v in eye_look_weights(gaze["angles"]).items()}
            if blink is not None:
                pinned.update(zip(self._blink, blink))
            gaze["pinned"] = pinned.keys()
            return pinned

        # on a photo, the optimiser alternates identity and expression over the passes; the network needs one
        passes = self.settings.photo_passes if self.settings.static and self._runtime is None else 1
        for _ in range(passes):
            if predicted is not None:
                fit = self.fitter.fit(landmarks, K, pin=pin, image=image, predicted=predicted)
            else:
                fit = self.fitter.fit(landmarks, K, pin=pin, image=image)
        if depth_mm is not None:  # timed apart too ("depth"), inside "fit"
            t_depth = time.perf_counter()
            engine_fit = fit
            fit, result.depth_samples, result.depth_residual_mm = self._refine_with_depth(fit, landmarks, K,
                                                                                          depth_mm, pin, gaze["pinned"])
            if fit is not engine_fit and self.settings.depth.solve_expression:
                # the depth reshapes the mesh through the expression weights, which then fit the surface but
                # mean less (bench/eval_rgbd.py: blendshape MAE 0.033 -> 0.039): the blendshapes keep the
                # engine's, their gaze and blink pinned at the refined pose
                shapes = engine_fit.expression.copy()
                pinned = list(gaze["pinned"])
                shapes[pinned] = fit.expression[pinned]
                gaze["shapes"] = shapes
            result.timings_s["depth"] = time.perf_counter() - t_depth
        return fit

    def _turned(self, fit: FitResult | None) -> bool:
        """Whether a lost face with this fit is one to fit from the picture (CoarseNet only)."""
        return self._runtime is not None and fit is not None and abs(fitted_yaw_deg(fit)) >= PICTURE_MIN_YAW_DEG

    def _fitted_landmarks_px(self, fit: FitResult, K: np.ndarray) -> np.ndarray:
        """(N, 2) px: where the fit puts the tracker's landmark points."""
        return project(self.basis.points(fit.identity, fit.expression) @ fit.rotation.T + fit.translation, K)

    def _fit_from_picture(self, image: np.ndarray, K: np.ndarray) -> FitResult | None:
        """A face turned past what the tracker follows, fitted by CoarseNet from the picture alone
        (engine.coarse_fitting.CoarseFitter.fit_from_picture), cropped where the tracker's landmarks
        last were (a crop made from the previous picture fit drifts: bench/eval_profile.py's clips
        read the yaw 68-81 degrees off that way, 3-10 from the last landmarks' box).
        Only while the face stays turned: the previous fit and this one both at least
        PICTURE_MIN_YAW_DEG from the camera (a face nearer frontal that the tracker misses is not
        a profile: occluded, or gone), and most of it inside the picture. None otherwise, and with
        the optimiser (it needs landmarks)."""
        last = self._follow_fit
        if not self._turned(last):
            return None
        fit = self.fitter.fit_from_picture(image, self._tracked_px, K)
        if not self._turned(fit):
            return None
        h, w = image.shape[:2]
        uv = self._fitted_landmarks_px(fit, K)
        inside = (uv[:, 0] >= 0) & (uv[:, 0] < w) & (uv[:, 1] >= 0) & (uv[:, 1] < h)
        if fit.translation[2] <= 0 or inside.mean() < PICTURE_MIN_INSIDE:
            return None
        return fit

    def _refine_with_depth(self, fit: FitResult, landmarks: np.ndarray, K: np.ndarray, depth_mm: np.ndarray, pin,
                           pinned_indices):
        """The fit refined against the frame's depth (the weights the fit pinned, pinned_indices,
        held at its values), gaze and blink pinned again at the refined pose; once the depth has
        locked an identity, the fitter keeps it for the rest of the take. The depth refiner (and
        its samples, ~20 ms to build) is made on the first frame with depth: colour takes never
        pay for it."""
        if self.depth_refiner is None:
            d, k = self.settings.depth, self.basis.identity.shape[0]
            if self.depth_basis is None:
                self.depth_basis = DepthBasis.build(self.model, k)
                self.identity_depth_basis = DepthBasis.build(self.model, k, d.identity_spacing_cm,
                                                             d.identity_side_spacing_cm)
            self.depth_refiner = DepthRefiner(self.basis, self.depth_basis, d, self.identity_depth_basis)
            if self.settings.actor is not None:
                self.depth_refiner.lock(self.settings.actor.identity)
        pinned = {i: fit.expression[i] for i in pinned_indices}
        refined, seen, residual_mm = self.depth_refiner.refine(fit, landmarks, K, depth_mm, pinned)
        if not seen:
            return fit, 0, residual_mm
        for i, value in pin(refined.rotation, refined.translation).items():
            refined.expression[i] = value
        if self.depth_refiner.identity_locked and not np.array_equal(self.fitter.identity, refined.identity):
            self.fitter.identity = refined.identity.copy()
            self.fitter.identity_locked = True
        return refined, seen, residual_mm

    def undecodable(self, index: int, time_s: float, like: np.ndarray) -> FrameResult:
        """The result of a frame the source could not decode, in a take whose pictures are like `like`."""
        h, w = like.shape[:2]
        return FrameResult(index, time_s, False, self.camera_matrix(w, h), (w, h), decoded=False)

    def mesh_vertices(self, result: FrameResult) -> np.ndarray:
        """(V, 3) float32 camera-space vertices (cm) of a frame with a face."""
        if self._identity_of_mesh is None or not np.array_equal(result.identity, self._identity_of_mesh):
            self._identity_mesh = self.model.vertices(result.identity.astype(np.float32))
            self._identity_of_mesh = result.identity.copy()
        v = self._identity_mesh + (result.expression.astype(np.float32) @ self._expression_2d).reshape(-1, 3)
        return (v @ result.rotation.T.astype(np.float32) + result.translation.astype(np.float32)).astype(np.float32)

    def close(self) -> None:
        self.tracker.close()


class TakeWriter:
    """The output folder of one take: blendshapes.csv, meshes/NNNNNN.obj|ply, track.npz (and with --detail
    detail/ and detail_normals/).

    Every file is valid after every frame (rows flushed, meshes renamed into
    place, track.npz checkpointed), so an error midway loses nothing written.
    A write that fails (a full disk) is kept in `failure`; `close` then cuts
    the files back to the frames all of them hold (`kept`).
    """

    def __init__(self, out_dir: Path, capture: FaceCapture, fps: float, mesh_format: str = "obj",
                 source_fps: float | None = None, swap_mouth_lr: bool = False, pointclouds: bool = False,
                 detail: FineRuntime | None = None):
        """fps times the CSV's rows; source_fps (None: unknown, e.g. photos) goes into track.npz;
        swap_mouth_lr exchanges MouthLeft and MouthRight in the CSV only (LiveLinkCsvWriter);
        pointclouds: each frame with depth also gets pointclouds/NNNNNN.ply, its registered depth
        in camera space (cm, coloured), whether or not it shows a face. detail (--detail): each frame
        with a face gets FineNet's maps (DetailMapWriter), and its mesh is the head with the face skin
        subdivided and displaced (FineRuntime.triangles: the same vertex order every frame, the model's
        vertices first)."""
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.capture = capture
        self.csv = LiveLinkCsvWriter(self.out_dir / "blendshapes.csv", fps, swap_mouth_lr)
        self.detail = detail
        self.meshes = None
        if mesh_format != "none":
            triangles = detail.triangles if detail is not None else capture.model.triangles
            self.meshes = BackgroundMeshWriter(MeshSequenceWriter(self.out_dir / "meshes", triangles, mesh_format))
        self.track = TrackWriter(self.out_dir / "track.npz", n_expression=capture.model.n_expression,
                                 n_identity=capture.basis.identity.shape[0],
                                 fps=source_fps or float("nan"))
        self.detail_maps = None
        if detail is not None:
            self.detail_maps = DetailMapWriter(self.out_dir / DETAIL_FOLDER, self.out_dir / DETAIL_NORMAL_FOLDER,
                                               detail.max_mm)
            self.track.detail_scale_mm = detail.max_mm
        self.pointclouds = self.out_dir / POINTCLOUD_FOLDER if pointclouds else None
        self._camera_set = False
        self.failure: OSError | None = None  # the first write that failed
        self.kept: int | None = None  # frames the take holds, once closed
        self._writing: int | None = None  # the frame whose writes are under way

    def write(self, result: FrameResult, frame: Frame | None = None) -> None:
        """One frame's files; frame (its picture and depth) is needed for point clouds and --detail only."""
        self._writing = result.index
        try:
            self._write(result, frame)
            if self.pointclouds is not None and frame is not None and frame.depth_mm is not None:
                self._write_pointcloud(result, frame)
        except OSError as exc:
            self.failure = self.failure or exc
            raise
        self._writing = None

    def _write(self, result: FrameResult, frame: Frame | None) -> None:
        if not self._camera_set:
            self.track.set_camera(result.camera_matrix, result.image_size)
            self._camera_set = True
        if result.face_found:
            self.csv.write(result.time_s, result.blendshapes, result.head_ypr_rad,
                           result.eyes_ypr_rad[0], result.eyes_ypr_rad[1])
            detail = self.detail is not None and frame is not None
            # the whole mesh costs about a millisecond: only for mesh files and the detail
            vertices = self.capture.mesh_vertices(result) if self.meshes is not None or detail else None
            if detail:
                t0 = time.perf_counter()
                displacement, geometry = self.detail.displacement(frame.image, vertices, result.camera_matrix)
                self.detail_maps.write(result.index, displacement, self.detail.normal_map(geometry, displacement))
                vertices = self.detail.mesh_vertices(vertices, displacement)
                result.timings_s["detail"] = time.perf_counter() - t0
            if self.meshes is not None:
                self.meshes.write(result.index, vertices)
            self.track.set_identity(result.identity)
        self.track.add(result.index, result.time_s, result.face_found, blendshapes=result.blendshapes,
                       expression=result.expression, rotation=result.rotation,
                       translation=result.translation, landmarks68=result.landmarks68,
                       identity=result.identity, eyes_ypr_rad=result.eyes_ypr_rad,
                       confidence=result.confidence, decoded=result.decoded,
                       depth_residual_mm=result.depth_residual_mm)

    def _write_pointcloud(self, result: FrameResult, frame: Frame) -> None:
        points = backproject(frame.depth_mm, result.camera_matrix).reshape(-1, 3)
        valid = np.isfinite(points[:, 2])
        self.pointclouds.mkdir(exist_ok=True)
        write_ply_points(self.pointclouds / f"{result.index:06d}.ply", points[valid],
                         colours=frame.image.reshape(-1, 3)[valid])

    def close(self, complete: bool = True) -> None:
        """Finishes the files. complete=False: the take stopped midway (an error, an interrupt,
        perhaps inside a frame's writes); then, and after any failed write, the files are cut
        back to agree (capture.take_folder.cut_back). Errors other than OSError are raised
        after the files are finished."""
        error = None
        for part in (self.meshes, self.csv):
            try:
                if part is not None:
                    part.close()
            except OSError as exc:
                self.failure = self.failure or exc
            except BaseException as exc:  # noqa: BLE001 - raised once track.npz is saved
                error = error or exc
        try:
            if complete and self.failure is None and error is None:
                try:
                    self.track.close()
                    self.kept = self.track.frames
                except OSError as exc:
                    self.failure = exc
            if self.kept is None:
                self.kept = cut_back(self.track, self.csv.path, self.meshes.writer if self.meshes else None,
                                     self._writing)
                self.track.close(save=False)
                if self.detail_maps is not None:
                    self.detail_maps.keep_only(self.track.arrays(self.kept)["frame_index"])
        finally:
            if error is not None:
                raise error


#: A live take keeps its per-frame records (stage timings, frames without a face) for its most
#: recent frames only, 5 minutes at 30 frames/s: hours of streaming must not grow memory.
LIVE_HISTORY_FRAMES = 9000


@dataclass
class TakeSummary:
    """What a take did. timings_s (per stage) and frames_without_face hold one entry per frame:
    every frame of a recorded source, the last LIVE_HISTORY_FRAMES of a live one."""

    frames: int = 0
    faces: int = 0
    dropped: int = 0
    skipped: int = 0  # frames the source could not decode: rows marked decoded=False in track.npz
    wall_s: float = 0.0
    timings_s: dict = field(default_factory=lambda: {s: [] for s in STAGES})
    frames_without_face: list = field(default_factory=list)


def run_take(source: FrameSource, capture: FaceCapture, out_dir: Path | None, mesh_format: str = "obj",
             progress: bool = True, max_frames: int | None = None, on_result=None,
             queue_size: int = 4, streams: StreamHub | None = None, swap_mouth_lr: bool = False,
             pointclouds: bool = False, detail: FineRuntime | None = None, batch: int = 1) -> TakeSummary:
    """Drive a source through the pipeline into out_dir (None: no files).

    batch > 1 (recorded sources): frames are tracked up to `batch` ahead, CoarseNet runs on their crops
    in one pass (FaceCapture.predict), and they are fitted, streamed and written in order; the results
    are those of batch 1 (the network's arithmetic aside: a batch may sum in another order). A frame
    whose face FaceMesh loses needs the previous fit, so the frames before it are finished first.
    Live sources run one frame at a time whatever batch says: a batch would only add latency.

    A SourceError raised midway (e.g. a truncated video) propagates after every
    frame before it has been written and the outputs closed.
    Each result goes to the streams first (they want it soonest), then to the
    files. on_result(frame, result) is called per frame after both (preview);
    return False from it to stop. A frame the source could not decode
    (Frame.skipped_s) gets its row in track.npz, marked decoded=False, and
    nothing else; summary.skipped counts them, and max_frames counts them too.

    The files are always finished, whatever stops the take (an error, Ctrl-C,
    a closed progress pipe), and agree with each other. A write that fails
    (a full disk) stops the take with OutputError saying how many frames it
    keeps; so does an output folder that cannot be written before the first frame.
    """
    from tqdm import tqdm

    summary = TakeSummary()
    if source.live:
        summary.timings_s = {s: deque(maxlen=LIVE_HISTORY_FRAMES) for s in STAGES}
        summary.frames_without_face = deque(maxlen=LIVE_HISTORY_FRAMES)
    fps = source.fps or 30.0
    writer = None
    if out_dir is not None:
        try:
            writer = TakeWriter(out_dir, capture, fps, mesh_format, source.fps, swap_mouth_lr, pointclouds, detail)
        except OSError as exc:
            raise OutputError(f"cannot write in the take folder {out_dir}: {reason(exc)}") from None
    total = source.frame_count if max_frames is None else min(max_frames, source.frame_count or max_frames)
    start = time.perf_counter()
    reader = FrameReader(source, queue_size=queue_size)
    bar = None
    completed = False
    try:
        bar = tqdm(total=total, unit="frame", disable=not progress, dynamic_ncols=True, leave=True)
        batch = 1 if source.live else max(1, int(batch))
        pending = []  # (frame, TrackedFrame) or (None, FrameResult of an undecodable frame), in order
        taken = 0     # frames and undecodable ones handed to the pipeline (max_frames counts both)
        stopped = []  # on_result asked to stop

        def emit(frame: Frame | None, result: FrameResult) -> None:
            if frame is None:  # undecodable: a row, nothing else
                if writer is not None:
                    writer.write(result)
                summary.skipped += 1
                bar.update(1)
                return
            t0 = time.perf_counter()
            if streams is not None:
                streams.send(stream_frame(result, frame.captured_s, fps))
            result.timings_s["stream"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            if writer is not None:
                writer.write(result, frame)
            result.timings_s["write"] = time.perf_counter() - t0
            result.timings_s["decode"] = frame.decode_s
            for stage in STAGES:
                summary.timings_s[stage].append(result.timings_s.get(stage, 0.0))
            summary.frames += 1
            summary.faces += result.face_found
            if not result.face_found:
                summary.frames_without_face.append(frame.name or frame.index)
            bar.update(1)
            bar.set_postfix(faces=summary.faces, refresh=False)
            if on_result is not None and on_result(frame, result) is False:
                stopped.append(True)

        def drain() -> None:
            """Fit and emit every pending frame, in order (one network pass for all of them)."""
            tracked = [item for frame, item in pending if frame is not None]
            predicted = iter(capture.predict(tracked) if len(tracked) > 1 else [None] * len(tracked))
            items = list(pending)
            pending.clear()
            for frame, item in items:
                if stopped:  # frames after the one that stopped the take are not kept
                    return
                emit(frame, item if frame is None else capture.finish(item, next(predicted)))

        try:
            for frame in reader:
                first_skipped = frame.index - len(frame.skipped_s)
                for index, time_s in enumerate(frame.skipped_s, first_skipped):
                    if max_frames is not None and taken >= max_frames:
                        break
                    pending.append((None, capture.undecodable(index, time_s, frame.image)))
                    taken += 1
                if max_frames is not None and taken >= max_frames:
                    break
                tracked = capture.track(frame.image, frame.time_s, frame.index, frame.depth_mm,
                                        source.camera_matrix, before_follow=drain)
                pending.append((frame, tracked))
                taken += 1
                if len(pending) >= batch:
                    drain()
                if stopped or (max_frames is not None and taken >= max_frames):
                    break
        except (SourceError, KeyboardInterrupt):  # the frames tracked before it are still written
            drain()
            raise
        drain()
        completed = True
    except OSError as exc:
        if writer is None or exc is not writer.failure:
            raise
    finally:
        summary.dropped = reader.dropped
        _close_all(reader.close, None if writer is None else lambda: writer.close(complete=completed),
                   None if bar is None else bar.close)
        summary.wall_s = time.perf_counter() - start
    if writer is not None and writer.failure is not None:
        raise OutputError(f"{reason(writer.failure)} writing {out_dir}: stopped; the take keeps its first "
                          f"{writer.kept} frames (blendshapes.csv, meshes and track.npz agree)")
    return summary


def _close_all(*closers) -> None:
    """Calls every closer (None: skipped), even when one fails; then raises the first failure."""
    first = None
    for close in closers:
        try:
            if close is not None:
                close()
        except BaseException as exc:  # noqa: BLE001 - re-raised below, after the rest have run
            first = first or exc
    if first is not None:
        raise first
