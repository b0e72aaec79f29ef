"""A preview window: the fitted mesh drawn over the live picture."""
from __future__ import annotations

import os
import sys

import cv2
import numpy as np

from engine.facemodel import NARROW_FACE_VERTICES
from engine.pose import project


def draw_overlay(image_rgb: np.ndarray, capture, result, triangles: np.ndarray, caption: str = "") -> np.ndarray:
    """BGR picture with the mesh wireframe, the 68 landmarks and the head angles; caption
    (e.g. a calibration prompt) along the bottom."""
    out = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)
    if caption:
        h = out.shape[0]
        cv2.putText(out, caption, (10, h - 15), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (0, 0, 0), 4, cv2.LINE_AA)
        cv2.putText(out, caption, (10, h - 15), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (0, 255, 255), 2, cv2.LINE_AA)
    if not result.face_found:
        cv2.putText(out, "no face", (10, 30), cv2.FONT_HERSHEY_SIMPLEX, 0.8, (0, 0, 255), 2)
        return out
    v = capture.mesh_vertices(result)
    px = project(v.astype(np.float64), result.camera_matrix)
    polys = np.round(px[triangles] * 4).astype(np.int32)  # 2 bits of sub-pixel precision
    wire = out.copy()
    cv2.polylines(wire, list(polys), True, (90, 220, 90), 1, cv2.LINE_AA, shift=2)
    out = cv2.addWeighted(wire, 0.6, out, 0.4, 0.0)  # the face stays visible under the mesh
    for x, y in result.landmarks68:
        cv2.circle(out, (int(x), int(y)), 2, (0, 0, 255), -1)
    yaw, pitch, roll = np.degrees(result.head_ypr_rad)
    cv2.putText(out, f"yaw {yaw:+.0f} pitch {pitch:+.0f} roll {roll:+.0f}", (10, 30),
                cv2.FONT_HERSHEY_SIMPLEX, 0.7, (255, 255, 255), 2)
    return out


class PreviewError(RuntimeError):
    """No window can be opened here."""


def check_display() -> None:
    """OpenCV's window toolkit aborts the whole process when there is no display,
    so ask first: on Linux a window needs $DISPLAY or $WAYLAND_DISPLAY."""
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        raise PreviewError("--preview needs a display (DISPLAY is not set); run without --preview for headless capture")


class Preview:
    """An OpenCV window; `show(frame, result)` returns False when the user closes it (q or Esc)."""

    def __init__(self, capture, title: str = "capture"):
        check_display()
        self.capture = capture
        self.title = title
        tris = capture.model.triangles
        face = np.all(tris < NARROW_FACE_VERTICES.stop, axis=1)
        self._triangles = tris[face][::8]  # an eighth of the face triangles: legible and cheap to draw
        self._sized = False
        cv2.namedWindow(title, cv2.WINDOW_NORMAL)

    def show(self, frame, result, caption: str = "") -> bool:
        if not self._sized:
            h, w = frame.image.shape[:2]
            cv2.resizeWindow(self.title, w, h)
            self._sized = True
        cv2.imshow(self.title, draw_overlay(frame.image, self.capture, result, self._triangles, caption))
        key = cv2.waitKey(1) & 0xFF
        return key not in (ord("q"), 27)

    def close(self) -> None:
        cv2.destroyWindow(self.title)
