"""Making an actor profile (engine.calibration) from a performance, and re-calibrating a take.

`calibrate_video` measures a recorded take: its locked identity, its neutral (the
quietest frames) and, if asked, how far each shape goes. `GuidedSession` runs in front of
a camera: it prompts the performer through a neutral face and a few extremes, timing
every step by the frames' own clock, so any FrameSource (a video file in the tests)
can stand in for the camera. `recalibrate_track` re-maps a recorded take's blendshapes
for `capture stream --actor`.

Every measurement is on the raw fits (no filtering, no calibration) with the identity
already locked, as the profile will later be applied: the optimiser's expression
weights depend on the identity they are fitted with.
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from capture.pipeline import FaceCapture, run_take
from capture.sources import VideoSource
from engine.arkit import arkit_from_model
from engine.calibration import ActorProfile, CalibrationError, gaze_shapes, neutral_from_frames, peaks_from_frames

#: Percentile of a shape over a take that counts as its peak (a few stray frames above it
#: are fit noise, not the performer's range), and within a guided step's window.
VIDEO_PEAK_PERCENTILE = 98.0
GUIDED_PEAK_PERCENTILE = 95.0
#: A peak counts only where the shape rose this far above its neutral.
MIN_PEAK_RISE = 0.2
#: Frame times are sums of 1/fps: a step boundary this close counts as reached.
EPSILON_S = 1e-6

#: The guided extremes: what the performer is asked to do, and the shapes it measures.
EXTREMES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("blink both eyes, a few times", ("eyeBlink_L", "eyeBlink_R")),
    ("open your jaw wide", ("jawOpen",)),
    ("smile wide", ("mouthSmile_L", "mouthSmile_R")),
    ("raise your eyebrows", ("browInnerUp_L", "browInnerUp_R", "browOuterUp_L", "browOuterUp_R")),
)


@dataclass
class Calibration:
    """A measured profile and what it was measured on: frames with a face used, the
    frames the neutral is the median of, and notes for the performer (steps missed)."""

    profile: ActorProfile
    frames: int
    neutral_frames: int
    notes: list[str] = dataclasses.field(default_factory=list)


def _raw_settings(capture: FaceCapture, actor: ActorProfile | None) -> None:
    """Switch capture to raw fits (no filtering, no calibration), optionally with a locked
    identity, and start a new take."""
    capture.settings = dataclasses.replace(capture.settings, actor=actor, auto_neutral=False, filtering=False)
    capture.reset()


def calibrate_video(path: str | Path, capture: FaceCapture, neutral_s: float | None = None,
                    extremes: bool = False, max_frames: int | None = None, progress: bool = True,
                    name: str = "") -> Calibration:
    """An actor profile from a recorded video (its first max_frames frames).

    Two passes: the first runs until the take's identity locks; the second fits every
    frame with that identity locked, as a take with the profile will. The neutral is
    neutral_from_frames over the whole video, or over its first neutral_s seconds;
    with extremes, each shape's peak is its 98th percentile where that is more than
    MIN_PEAK_RISE above the neutral. capture's settings are replaced (raw fits).
    """
    names = capture.model.expression_names
    _raw_settings(capture, None)
    source = VideoSource(path)
    try:
        summary = run_take(source, capture, None, progress=False, max_frames=max_frames,
                           on_result=lambda frame, result: not capture.fitter.identity_locked)
    finally:
        source.close()
    if summary.faces == 0:
        raise CalibrationError(f"no face found in {path}")
    notes = []
    if not capture.fitter.identity_locked:
        notes.append(f"the identity did not converge (it locks after {capture.settings.identity_frames} "
                     "frames with a face): a longer video gives a better one")
    identity = capture.fitter.identity.copy()

    _raw_settings(capture, ActorProfile.from_identity(identity, names))
    times, expressions = [], []

    def collect(frame, result):
        if result.face_found:
            times.append(frame.time_s)
            expressions.append(result.expression)

    source = VideoSource(path)
    try:
        run_take(source, capture, None, progress=progress, max_frames=max_frames, on_result=collect)
    finally:
        source.close()
    if not expressions:
        raise CalibrationError(f"no face found in {path}")
    E, times = np.array(expressions), np.array(times)
    gaze = gaze_shapes(names)
    quiet = E if neutral_s is None else E[times < times[0] + neutral_s]
    neutral = neutral_from_frames(quiet, ignore=gaze)
    peak = np.ones(len(names))
    if extremes:
        peak = peaks_from_frames(E, neutral, VIDEO_PEAK_PERCENTILE, MIN_PEAK_RISE, ~gaze)
    profile = ActorProfile(identity, neutral, peak, names, name or Path(path).stem, Path(path).name, len(E))
    return Calibration(profile, len(E), _quiet_count(len(quiet)), notes)


def _quiet_count(frames: int, quiet_fraction: float = 0.25) -> int:
    """How many frames neutral_from_frames takes the median of."""
    return min(frames, max(1, int(np.ceil(quiet_fraction * frames))))


@dataclass(frozen=True)
class Step:
    """One step of a guided calibration: the prompt, how long frames are measured, and the
    shapes whose peaks it measures (none: the neutral face)."""

    prompt: str
    duration_s: float
    shapes: tuple[str, ...] = ()


def guided_steps(neutral_s: float = 3.0, extremes: bool = True, extreme_s: float = 2.0) -> list[Step]:
    """The neutral face, then (extremes) blink, jaw, smile and brows."""
    steps = [Step("hold a neutral face: relaxed, mouth closed, looking at the camera", neutral_s)]
    if extremes:
        steps += [Step(prompt, extreme_s, shapes) for prompt, shapes in EXTREMES]
    return steps


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class GuidedSession:
    """Walks a performer through guided_steps in front of any FrameSource.

    Use it as run_take's on_result: it returns False once the last step is done. Time is
    the frames' own (frame.time_s), so a video stands in for a camera exactly. First a
    countdown (countdown_s, and on until `ready()`, e.g. the identity has locked); then
    each step's prompt, get_ready_s to react, and duration_s of measured frames. Messages
    (countdown, each step, what was measured) go to `say`; `caption` is the current
    prompt with the seconds left, for a preview window.
    """

    def __init__(self, steps: list[Step], shape_names, countdown_s: float = 3.0, get_ready_s: float = 1.0,
                 ready=lambda: True, say=_say):
        self.steps = list(steps)
        self.shape_names = tuple(shape_names)
        self.countdown_s, self.get_ready_s = countdown_s, get_ready_s
        self.ready, self.say = ready, say
        self.measured: list[list[np.ndarray]] = [[] for _ in self.steps]
        self.caption = ""
        self._start_s: float | None = None
        self._step = -1          # -1: the countdown
        self._step_start_s = 0.0
        self._said = None

    @property
    def done(self) -> bool:
        return self._step >= len(self.steps)

    def __call__(self, frame, result) -> bool:
        t = frame.time_s
        if self._start_s is None:
            self._start_s = self._step_start_s = t
            self.say(f"calibration: {len(self.steps)} step(s); look at the camera")
        elapsed = t - self._step_start_s
        if self._step < 0:
            left = self.countdown_s - elapsed
            if left <= 0 and self.ready():
                self._next(t)
            else:
                self._countdown(f"starting in {max(int(np.ceil(left)), 1)}" if left > 0 else "waiting for the face")
                return True
        else:  # steps follow each other on the schedule, not on frame times: no drift
            end_s = self._step_start_s + self.get_ready_s + self.steps[self._step].duration_s
            if t >= end_s - EPSILON_S:
                self._next(end_s)
        if self.done:
            self.caption = "done"
            return False
        step = self.steps[self._step]
        elapsed = t - self._step_start_s
        measuring = elapsed >= self.get_ready_s - EPSILON_S
        left = self.get_ready_s + step.duration_s - elapsed
        self.caption = f"[{self._step + 1}/{len(self.steps)}] {step.prompt}  {left:.0f} s"
        if measuring and result.face_found:
            self.measured[self._step].append(np.asarray(result.expression, dtype=np.float64))
        return True

    def _countdown(self, text: str) -> None:
        self.caption = text
        if text != self._said:
            self.say(f"  {text}")
            self._said = text

    def _next(self, t: float) -> None:
        if self._step >= 0:
            self.say(f"    {len(self.measured[self._step])} frames with a face")
        self._step += 1
        self._step_start_s = t
        if not self.done:
            step = self.steps[self._step]
            self.say(f"[{self._step + 1}/{len(self.steps)}] {step.prompt} ({step.duration_s:g} s)")

    def calibration(self, identity: np.ndarray, name: str = "", source: str = "") -> Calibration:
        """The profile measured: neutral_from_frames over the neutral step; each extreme
        step's shapes peak at their 95th percentile within it, where that is more than
        MIN_PEAK_RISE above the neutral. A step with fewer than 3 frames with a face is
        left out (peaks 1.0), noted."""
        names = self.shape_names
        gaze = gaze_shapes(names)
        neutral_steps = [i for i, s in enumerate(self.steps) if not s.shapes]
        quiet = [e for i in neutral_steps for e in self.measured[i]]
        if not quiet:
            raise CalibrationError("no face during the neutral step: nothing to calibrate from")
        neutral = neutral_from_frames(np.array(quiet), ignore=gaze)
        peak, notes = np.ones(len(names)), []
        for step, frames in zip(self.steps, self.measured):
            if not step.shapes:
                continue
            if len(frames) < 3:
                notes.append(f"'{step.prompt}': too few frames with a face, not measured")
                continue
            mask = np.isin(names, step.shapes)
            reached = peaks_from_frames(np.array(frames), neutral, GUIDED_PEAK_PERCENTILE, MIN_PEAK_RISE, mask)
            peak[mask] = reached[mask]
            missed = [n for n in step.shapes if reached[names.index(n)] == 1.0]
            if missed:
                notes.append(f"'{step.prompt}': {', '.join(missed)} hardly moved, not measured (peak 1.0)")
        frames = sum(len(f) for f in self.measured)
        profile = ActorProfile(identity, neutral, peak, names, name, source, frames)
        return Calibration(profile, frames, _quiet_count(len(quiet)), notes)


def recalibrate_track(track: dict, mapping: np.ndarray, profile: ActorProfile | None) -> dict:
    """A recorded track whose blendshapes are re-made from its stored (uncalibrated)
    expression weights: through profile, or raw when None. mapping: (52, M) ARKit matrix."""
    if "expression" not in track:
        raise CalibrationError("the take has no expression weights to calibrate (recorded by an older capture)")
    expression = track["expression"].astype(np.float64)
    if expression.shape[1] != mapping.shape[1]:
        raise CalibrationError(f"the take has {expression.shape[1]} expression weights, the face model "
                               f"{mapping.shape[1]}: use the model the take was made with")
    found = track["face_found"]
    weights = expression[found] if profile is None else profile.apply(expression[found])
    blendshapes = np.array(track["blendshapes"], dtype=np.float32)
    blendshapes[found] = arkit_from_model(weights, mapping)
    return {**track, "blendshapes": blendshapes}
