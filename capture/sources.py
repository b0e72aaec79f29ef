"""Frame sources: one interface over video files, image lists and live cameras.

Everything downstream consumes `Frame`s in order and never touches OpenCV
capture objects, so decode errors, colour order (RGB, not OpenCV's BGR),
orientation (a phone video's rotation metadata) and timing are settled here
once.  `FrameReader` moves decoding onto a background thread so capture
overlaps with tracking.
"""

from __future__ import annotations

import collections
import json
import os
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import cv2
import numpy as np

from engine.depth import DepthCalibration, denoise_depth, register_depth

# FFmpeg prints lines of its own for every damaged packet of a corrupt video; VideoSource skips those
# frames and counts them instead (read once, when OpenCV first opens a video with FFmpeg).
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET


@dataclass
class Frame:
    """One decoded picture and where it came from."""

    index: int  # 0-based position in the source
    time_s: float  # presentation time, seconds from the source's start
    image: np.ndarray  # (H, W, 3) uint8 RGB
    name: str  # file path for images, "" for video/camera frames
    decode_s: float = 0.0  # seconds spent reading + decoding this frame
    captured_s: float = field(default_factory=time.perf_counter)  # perf_counter when it left the source
    # presentation times (s) of the source's undecodable frames just before this one, which were
    # skipped: they are the indices index - len(skipped_s) ... index - 1
    skipped_s: tuple[float, ...] = ()
    # RGB-D sources: (H, W) float32 mm registered to `image` (the colour camera's z), 0 = no data
    depth_mm: np.ndarray | None = None


class SourceError(Exception):
    """A source that cannot be opened or read; str() is one line naming the path."""


def _bgr_to_rgb(image: np.ndarray) -> np.ndarray:
    """OpenCV decodes to BGR (or gray / BGRA); the pipeline wants 3-channel RGB."""
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _valid_rate(value: float) -> float | None:
    """OpenCV reports unknown rates / counts as 0 or NaN; map those to None."""
    return float(value) if value == value and value > 0 else None


def _mp4_boxes(data: bytes, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    """(type, payload start, box end) for each ISO-BMFF box in data[start:end]."""
    while start + 8 <= end:
        size, kind = struct.unpack(">I4s", data[start:start + 8])
        header = 8
        if size == 1 and start + 16 <= end:
            size, header = struct.unpack(">Q", data[start + 8:start + 16])[0], 16
        elif size == 0:
            size = end - start
        if size < header or start + size > end:
            return
        yield kind, start + header, start + size
        start += size


def _mp4_video_duration_s(path: str) -> float | None:
    """Presentation length of an MP4/MOV's video track(s), None if not found.

    Trimmed clips keep every sample but shorten playback with an edit list;
    FFmpeg (and so OpenCV) then decodes fewer frames than CAP_PROP_FRAME_COUNT
    claims, which must not be mistaken for truncation.  The track header
    (tkhd) duration is the edited length, in movie-timescale units.
    """
    moov_limit_bytes = 64 << 20  # a real moov is KBs-MBs; refuse absurd sizes
    try:
        with open(path, "rb") as file:
            offset = 0
            while True:
                file.seek(offset)
                head = file.read(16)
                if len(head) < 8:
                    return None
                size, kind = struct.unpack(">I4s", head[:8])
                header = 8
                if size == 1 and len(head) == 16:
                    size, header = struct.unpack(">Q", head[8:16])[0], 16
                if size < header:
                    return None
                if kind == b"moov":
                    if size > moov_limit_bytes:
                        return None
                    file.seek(offset + header)
                    moov = file.read(size - header)
                    if len(moov) < size - header:
                        return None
                    break
                if kind not in (b"ftyp", b"free", b"skip", b"wide", b"mdat",
                                b"pdin", b"uuid", b"meta"):
                    return None  # not ISO-BMFF (e.g. AVI, MKV): nothing to learn
                offset += size
    except OSError:
        return None
    try:
        return _moov_video_duration_s(moov)
    except (struct.error, IndexError):
        return None


def _moov_video_duration_s(moov: bytes) -> float | None:
    """Longest video-track (tkhd) duration in a moov payload, in seconds."""
    timescale_hz = None
    video_ticks = []
    for kind, start, end in _mp4_boxes(moov, 0, len(moov)):
        if kind == b"mvhd":
            at = start + (20 if moov[start] == 1 else 12)
            timescale_hz = struct.unpack(">I", moov[at:at + 4])[0]
        elif kind == b"trak":
            ticks, handler = None, None
            for sub, sub_start, sub_end in _mp4_boxes(moov, start, end):
                if sub == b"tkhd" and moov[sub_start] == 1:
                    ticks = struct.unpack(">Q", moov[sub_start + 28:sub_start + 36])[0]
                elif sub == b"tkhd":
                    ticks = struct.unpack(">I", moov[sub_start + 20:sub_start + 24])[0]
                elif sub == b"mdia":
                    for leaf, leaf_start, _ in _mp4_boxes(moov, sub_start, sub_end):
                        if leaf == b"hdlr":
                            handler = moov[leaf_start + 8:leaf_start + 12]
            unknown = (None, 0, 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF)
            if handler == b"vide" and ticks not in unknown:
                video_ticks.append(ticks)
    if not timescale_hz or not video_ticks:
        return None
    return max(video_ticks) / timescale_hz


class FrameSource:
    """Base class: iterate to get Frames in order; close() releases the device/file."""

    fps: float | None = None
    frame_count: int | None = None
    size: tuple[int, int] | None = None  # (width, height) px of the first frame
    live: bool = False
    camera_matrix: np.ndarray | None = None  # the colour camera's (3, 3) K in px, when the source knows it

    def __iter__(self) -> Iterator[Frame]:
        raise NotImplementedError

    def close(self) -> None:
        """Release OS resources; safe to call more than once."""

    def __enter__(self) -> "FrameSource":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


#: cv2.rotate codes that turn a frame upright, by the container's rotation (degrees clockwise).
_UPRIGHT = {90: cv2.ROTATE_90_CLOCKWISE, 180: cv2.ROTATE_180, 270: cv2.ROTATE_90_COUNTERCLOCKWISE}


class _Capture:
    """Shared cv2.VideoCapture handling for files and cameras: timed RGB reads.

    rotate: a cv2.rotate code applied to every frame (None: frames as decoded).
    """

    def __init__(self, cap: cv2.VideoCapture, rotate: int | None = None):
        self.cap = cap
        self.rotate = rotate

    def read(self) -> tuple[np.ndarray | None, float]:
        """Return (RGB image or None at end/failure, seconds spent)."""
        start_s = time.perf_counter()
        try:
            ok, bgr = self.cap.read()
        except cv2.error:
            ok, bgr = False, None
        if not ok or bgr is None:
            return None, time.perf_counter() - start_s
        if self.rotate is not None:
            bgr = cv2.rotate(bgr, self.rotate)
        rgb = _bgr_to_rgb(bgr)
        return rgb, time.perf_counter() - start_s

    def position_s(self) -> float | None:
        """Presentation time of the frame last read, seconds from the stream's start (None: unknown)."""
        value = self.cap.get(cv2.CAP_PROP_POS_MSEC)
        return value / 1000.0 if value == value and value >= 0 else None

    def release(self) -> None:
        self.cap.release()


def _orient(cap: cv2.VideoCapture) -> tuple[int, int | None]:
    """Turn a video's frames upright by its container's rotation (an MP4/MOV's display matrix,
    as phones write for portrait video). Returns (rotation in degrees clockwise, a cv2.rotate
    code still to apply to each frame, or None).

    OpenCV reads the rotation (CAP_PROP_ORIENTATION_META) but, in the 4.11 wheels, applies it
    only when asked (CAP_PROP_ORIENTATION_AUTO, off by default); a backend that refuses the
    request leaves the turn to the caller.
    """
    degrees = cap.get(cv2.CAP_PROP_ORIENTATION_META)
    degrees = int(round(degrees)) % 360 if degrees == degrees else 0
    if degrees not in _UPRIGHT:
        return 0, None
    if cap.set(cv2.CAP_PROP_ORIENTATION_AUTO, 1) and cap.get(cv2.CAP_PROP_ORIENTATION_AUTO) == 1:
        return degrees, None
    return degrees, _UPRIGHT[degrees]


class VideoSource(FrameSource):
    """A video file, decoded sequentially, upright (the container's rotation applied).

    The first frame is decoded at construction so an unreadable file fails
    early.  A frame that cannot be decoded (corrupt bytes) is skipped and
    reading goes on; the next frame that decodes carries the skipped frames'
    times (Frame.skipped_s) and keeps its own index in the source, and
    .skipped counts them.  Once a read has failed, indices follow the
    frames' presentation times, because a damaged stream also loses frames
    inside the decoder without a failed read.  Reading stops at the real
    end: after as many failed reads in a row as the container has frames
    left (or max_failed_reads when it does not say).  If that end comes well
    before the container's frame count, every decodable frame is yielded and
    then SourceError('video truncated: ...').
    """

    frame_count_tolerance = 2  # frames; CAP_PROP_FRAME_COUNT is sometimes approximate
    max_failed_reads = 250  # failed reads in a row that end a video whose frame count is unknown

    def __init__(self, path: str | Path):
        self.path = str(path)
        self.live = False
        self._closed = False
        self.rotation_deg = 0  # the container's rotation, degrees clockwise, applied to every frame
        self.skipped = 0  # undecodable frames skipped so far (this pass)
        self._capture, self._first, self._first_decode_s = self._open()
        cap = self._capture.cap
        self.fps = _valid_rate(cap.get(cv2.CAP_PROP_FPS))
        count = _valid_rate(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        self.frame_count = int(round(count)) if count is not None else None
        edited_s = _mp4_video_duration_s(self.path)
        if self.frame_count is not None and self.fps is not None and edited_s is not None:
            edited_frames = int(round(edited_s * self.fps))
            if edited_frames < self.frame_count - self.frame_count_tolerance:
                self.frame_count = edited_frames  # an edit list trims playback
        self.size = (self._first.shape[1], self._first.shape[0])

    def _open(self) -> tuple[_Capture, np.ndarray, float]:
        """Open the file and decode its first frame, or raise SourceError."""
        if not Path(self.path).exists():
            raise SourceError(f"video not found: {self.path}")
        if not Path(self.path).is_file():
            raise SourceError(f"not a readable video: {self.path}")
        capture = _Capture(cv2.VideoCapture(self.path))
        if not capture.cap.isOpened():
            capture.release()
            raise SourceError(f"not a readable video: {self.path}")
        self.rotation_deg, capture.rotate = _orient(capture.cap)
        first, decode_s = capture.read()
        if first is None:
            capture.release()
            raise SourceError(f"not a readable video: {self.path}")
        return capture, first, decode_s

    def _time_s(self, capture: _Capture, index: int) -> float:
        """index / fps; falls back to the container timestamp when fps is unknown."""
        if self.fps is not None:
            return index / self.fps
        return capture.cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0

    def _read_decodable(self, capture: _Capture, last: int, damaged: bool
                        ) -> tuple[np.ndarray | None, float, int, bool]:
        """The next frame that decodes after index `last`: (RGB or None at the end, seconds spent
        reading, its index, whether the stream has been damaged so far)."""
        spent_s, failed = 0.0, 0
        while True:
            left = (self.frame_count + self.frame_count_tolerance - last - 1
                    if self.frame_count is not None else self.max_failed_reads)
            if failed >= max(left, 1):
                return None, spent_s, last, damaged
            image, decode_s = capture.read()
            spent_s += decode_s
            if image is None:
                failed += 1
                damaged = True
                continue
            index = last + 1 + failed
            position_s = capture.position_s() if damaged and self.fps is not None else None
            if position_s is not None:
                by_time = int(round(position_s * self.fps))
                if by_time <= last:
                    continue  # a confused decoder showing an earlier frame again
                if self.frame_count is None or by_time < self.frame_count + self.frame_count_tolerance:
                    index = by_time
            return image, spent_s, index, damaged

    def _skipped_times_s(self, last: int, last_s: float, index: int, time_s: float) -> tuple[float, ...]:
        """Times of the frames between index `last` (at last_s) and `index` (at time_s): i / fps,
        or evenly spaced between the two when the rate is unknown."""
        if self.fps is not None:
            return tuple(i / self.fps for i in range(last + 1, index))
        step_s = (time_s - last_s) / (index - last)
        return tuple(last_s + step_s * (i - last) for i in range(last + 1, index))

    def __iter__(self) -> Iterator[Frame]:
        if self._closed:
            raise SourceError(f"video already closed: {self.path}")
        if self._capture is None:  # a second pass: reopen from the start
            self._capture, self._first, self._first_decode_s = self._open()
        capture = self._capture
        image, decode_s = self._first, self._first_decode_s
        self._first = None
        self.skipped = 0
        index, last, last_s, damaged, decoded = 0, -1, 0.0, False, 0
        try:
            while image is not None:
                time_s = self._time_s(capture, index)
                skipped_s = self._skipped_times_s(last, last_s, index, time_s)
                self.skipped += len(skipped_s)
                decoded += 1
                yield Frame(index, time_s, image, "", decode_s, skipped_s=skipped_s)
                last, last_s = index, time_s
                image, decode_s, index, damaged = self._read_decodable(capture, last, damaged)
        finally:
            capture.release()
            if self._capture is capture:
                self._capture = None
        expected = self.frame_count
        if expected is not None and last + 1 < expected - self.frame_count_tolerance:
            raise SourceError(
                f"video truncated: decoded {decoded} of {expected} frames of {self.path}"
            )

    def close(self) -> None:
        self._closed = True
        if self._capture is not None:
            self._capture.release()
            self._capture = None
        self._first = None


class ImageSource(FrameSource):
    """Still images, from files and/or folders, each read when it is reached.

    Folders expand to their image files sorted by name; other paths keep the
    order given.  A missing path or an empty folder fails at construction; an
    unreadable file fails during iteration, after the frames before it.
    """

    image_suffixes = frozenset(
        {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}
    )

    def __init__(self, paths: Sequence[str | Path]):
        if isinstance(paths, (str, Path)):
            paths = [paths]
        self.paths: list[str] = []
        for raw in paths:
            path = Path(raw)
            if not path.exists():
                raise SourceError(f"image not found: {raw}")
            if path.is_dir():
                found = sorted(
                    (p for p in path.iterdir()
                     if p.is_file() and p.suffix.lower() in self.image_suffixes),
                    key=lambda p: p.name,
                )
                if not found:
                    raise SourceError(f"no images in folder: {raw}")
                self.paths.extend(str(p) for p in found)
            else:
                self.paths.append(str(path))
        if not self.paths:
            raise SourceError("no image paths given")
        self.fps = None
        self.frame_count = len(self.paths)
        self.size = None  # set from the first image once it has been read
        self.live = False

    def __iter__(self) -> Iterator[Frame]:
        for index, path in enumerate(self.paths):
            start_s = time.perf_counter()
            bgr = cv2.imread(path, cv2.IMREAD_COLOR)
            if bgr is None:
                raise SourceError(f"not a readable image: {path}")
            image = _bgr_to_rgb(bgr)
            decode_s = time.perf_counter() - start_s
            if index == 0:
                self.size = (image.shape[1], image.shape[0])
            yield Frame(index, 0.0, image, path, decode_s)


class CameraSource(FrameSource):
    """A live camera; time_s is monotonic seconds since it was opened."""

    def __init__(self, index: int, width: int | None = None,
                 height: int | None = None, fps: float | None = None):
        self.index = index
        self.live = True
        self.frame_count = None
        cap = cv2.VideoCapture(index)
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"camera {index} could not be opened")
        if width is not None:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, width)
        if height is not None:
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
        if fps is not None:
            cap.set(cv2.CAP_PROP_FPS, fps)
        self._capture: _Capture | None = _Capture(cap)
        self._opened_s = time.monotonic()
        first, decode_s = self._capture.read()
        if first is None:
            self.close()
            raise SourceError(f"camera {index} gave no first frame")
        self._first: np.ndarray | None = first
        self._first_time_s = time.monotonic() - self._opened_s
        self._first_decode_s = decode_s
        self.fps = _valid_rate(cap.get(cv2.CAP_PROP_FPS)) or fps
        self.size = (first.shape[1], first.shape[0])

    def __iter__(self) -> Iterator[Frame]:
        if self._capture is None:
            raise SourceError(f"camera {self.index} is closed")
        capture = self._capture
        if self._first is not None:
            yield Frame(0, self._first_time_s, self._first, "", self._first_decode_s)
            self._first = None
        index = 1
        while self._capture is capture:
            image, decode_s = capture.read()
            if image is None:
                if self._capture is not capture:  # closed while reading
                    return
                raise SourceError(f"camera {self.index} stopped delivering frames")
            yield Frame(index, time.monotonic() - self._opened_s, image, "", decode_s)
            index += 1

    def close(self) -> None:
        if self._capture is not None:
            self._capture.release()
            self._capture = None
        self._first = None


def is_rgbd_folder(path: str | Path) -> bool:
    """True for a folder holding rgb/ and depth/ folders: an RGB-D take (ours or BIWI's layout)."""
    folder = Path(path)
    return folder.is_dir() and (folder / "rgb").is_dir() and (folder / "depth").is_dir()


def _describe_image(image: np.ndarray) -> str:
    """'8-bit, 3 channels' and the like, for error messages."""
    bits = image.dtype.itemsize * 8
    channels = 1 if image.ndim == 2 else image.shape[2]
    kind = "float" if image.dtype.kind == "f" else f"{bits}-bit"
    return f"{kind}, {channels} channel{'s' if channels != 1 else ''}"


def _take_calibration(folder: Path) -> tuple[DepthCalibration, float]:
    """The take's calibration and frame rate (frames/s): rgbd.json (ours), else BIWI's
    depth_intrinsics.txt with the BIWI Kinect's colour calibration, at 30 frames/s."""
    ours = folder / "rgbd.json"
    if ours.exists():
        try:
            data = json.loads(ours.read_text(encoding="utf-8"))
            calibration = DepthCalibration.from_dict(data)
            fps = data.get("fps", RGBDFolderSource.default_fps)
            if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps < float("inf"):
                raise ValueError(f"fps must be a number > 0, got {fps!r}")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise SourceError(f"not a valid RGB-D calibration ({reason}): {ours}") from None
        return calibration, float(fps)
    if (folder / "depth_intrinsics.txt").exists():
        try:
            return DepthCalibration.biwi(folder), RGBDFolderSource.default_fps
        except ValueError as error:
            raise SourceError(f"not a valid RGB-D calibration: {error}") from None
    raise SourceError(f"RGB-D take without a calibration (rgbd.json or depth_intrinsics.txt): {folder}")


class RGBDFolderSource(FrameSource):
    """A recorded RGB-D take: colour rgb/NAME.png|jpg and 16-bit depth depth/NAME.png, paired by
    name, in name order; the calibration from rgbd.json (RGBDTakeWriter's) or BIWI's layout.

    Each Frame carries the colour image and its depth registered to it (engine.depth.register_depth;
    depth stored already registered is only scaled to mm), denoised unless denoise=False; time_s is
    index / fps. Names that do not pair up and an empty take fail at construction; an unreadable
    file or a depth image that is not 16-bit single-channel fails when it is reached, after the
    frames before it.
    """

    default_fps = 30.0  # frames/s of a take whose rgbd.json gives none (BIWI's Kinect: 30)
    colour_suffixes = (".png", ".jpg", ".jpeg")

    def __init__(self, folder: str | Path, denoise: bool = True):
        self.folder = Path(folder)
        if not self.folder.exists():
            raise SourceError(f"RGB-D take not found: {folder}")
        if not is_rgbd_folder(self.folder):
            raise SourceError(f"not an RGB-D take (no rgb/ and depth/ folders): {folder}")
        self.calibration, self.fps = _take_calibration(self.folder)
        self.pairs = self._pair(self.folder)
        self.denoise = denoise
        self.live = False
        self.frame_count = len(self.pairs)
        self.camera_matrix = np.array(self.calibration.colour_K)
        first = cv2.imread(str(self.pairs[0][0]), cv2.IMREAD_COLOR)
        if first is None:
            raise SourceError(f"not a readable image: {self.pairs[0][0]}")
        self.size = (first.shape[1], first.shape[0])

    def _pair(self, folder: Path) -> list[tuple[Path, Path]]:
        """(colour, depth) paths paired by name (without suffix), in name order."""
        colour: dict[str, Path] = {}
        for path in sorted((folder / "rgb").iterdir()):
            if path.is_file() and path.suffix.lower() in self.colour_suffixes:
                if path.stem in colour:
                    raise SourceError(f"two colour images for one frame ({colour[path.stem].name}): {path}")
                colour[path.stem] = path
        depth = {path.stem: path for path in sorted((folder / "depth").iterdir())
                 if path.is_file() and path.suffix.lower() == ".png"}
        lonely = sorted(colour.keys() - depth.keys())
        if lonely:
            raise SourceError(f"no depth image depth/{lonely[0]}.png for colour image: {colour[lonely[0]]}")
        lonely = sorted(depth.keys() - colour.keys())
        if lonely:
            raise SourceError(f"no colour image rgb/{lonely[0]}.png|jpg for depth image: {depth[lonely[0]]}")
        if not colour:
            raise SourceError(f"no frames in RGB-D take: {folder}")
        return [(colour[stem], depth[stem]) for stem in sorted(colour)]

    def _depth_mm(self, raw: np.ndarray, path: Path) -> np.ndarray:
        """The raw depth image as (H, W) float32 mm in the colour camera."""
        if raw.dtype != np.uint16 or raw.ndim != 2:
            raise SourceError(f"depth image is not 16-bit single-channel ({_describe_image(raw)}): {path}")
        calibration = self.calibration
        W, H = self.size
        if calibration.is_registered:
            if raw.shape != (H, W):
                raise SourceError(f"depth image is {raw.shape[1]}x{raw.shape[0]}, its take's colour "
                                  f"{W}x{H} (stored registered, they must match): {path}")
            depth_mm = raw.astype(np.float32)
            if calibration.depth_unit_mm != 1.0:
                depth_mm *= np.float32(calibration.depth_unit_mm)
        else:
            depth_mm = register_depth(raw, calibration, (W, H))
        return denoise_depth(depth_mm) if self.denoise else depth_mm

    def __iter__(self) -> Iterator[Frame]:
        for index, (colour_path, depth_path) in enumerate(self.pairs):
            start_s = time.perf_counter()
            bgr = cv2.imread(str(colour_path), cv2.IMREAD_COLOR)
            if bgr is None:
                raise SourceError(f"not a readable image: {colour_path}")
            if (bgr.shape[1], bgr.shape[0]) != self.size:
                raise SourceError(f"colour image is {bgr.shape[1]}x{bgr.shape[0]}, the take's first "
                                  f"{self.size[0]}x{self.size[1]}: {colour_path}")
            raw = cv2.imread(str(depth_path), cv2.IMREAD_UNCHANGED)
            if raw is None:
                raise SourceError(f"not a readable depth image: {depth_path}")
            depth_mm = self._depth_mm(raw, depth_path)
            image = _bgr_to_rgb(bgr)
            yield Frame(index, index / self.fps, image, str(colour_path), time.perf_counter() - start_s,
                        depth_mm=depth_mm)


def _write_png(path: Path, image: np.ndarray) -> None:
    """A PNG written under a temporary name and renamed: a take never holds half a picture."""
    ok, data = cv2.imencode(".png", image)
    if not ok:
        raise OSError(f"could not encode {path}")
    tmp = path.with_name("." + path.name + ".tmp")
    try:
        tmp.write_bytes(data.tobytes())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class RGBDTakeWriter:
    """Writes an RGB-D take that RGBDFolderSource reads back exactly: rgbd.json (the calibration
    and fps) first, then per frame rgb/NNNNNN.png (lossless) and depth/NNNNNN.png (uint16 raw
    values, × calibration.depth_unit_mm = mm).

    Depth given as uint16 is stored as it is; as float mm it is rounded to the depth unit (0 and
    below, NaN: no data). With DepthCalibration.registered(K) the depth must already be in the
    colour camera, at the colour image's size. Refuses a folder that already holds frames.
    """

    def __init__(self, folder: str | Path, calibration: DepthCalibration, fps: float):
        if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps < float("inf"):
            raise ValueError(f"fps must be a number > 0, got {fps!r}")
        self.folder = Path(folder)
        self.calibration = calibration
        self.fps = float(fps)
        self.count = 0
        for sub in ("rgb", "depth"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
            if any((self.folder / sub).iterdir()):
                raise FileExistsError(f"{self.folder / sub} already holds frames")
        calibration.to_json(self.folder / "rgbd.json", fps=self.fps)

    def write(self, rgb: np.ndarray, depth: np.ndarray) -> int:
        """One frame: rgb (H, W, 3) uint8 RGB, depth (Hd, Wd) uint16 raw or float mm. Returns its index."""
        rgb = np.asarray(rgb)
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"rgb must be (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
        raw = self._raw_depth(np.asarray(depth))
        if self.calibration.is_registered and raw.shape != rgb.shape[:2]:
            raise ValueError(f"registered depth must be the colour image's size {rgb.shape[:2]}, got {raw.shape}")
        name = f"{self.count:06d}.png"
        _write_png(self.folder / "rgb" / name, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        _write_png(self.folder / "depth" / name, raw)
        self.count += 1
        return self.count - 1

    def _raw_depth(self, depth: np.ndarray) -> np.ndarray:
        """uint16 raw depth values from uint16 (as is) or float mm (rounded to the unit)."""
        if depth.ndim != 2:
            raise ValueError(f"depth must be (H, W), got {depth.shape}")
        if depth.dtype == np.uint16:
            return depth
        if depth.dtype.kind != "f":
            raise ValueError(f"depth must be uint16 raw or float mm, got {depth.dtype}")
        with np.errstate(invalid="ignore"):
            raw = np.rint(np.where(depth > 0, depth, 0.0) / self.calibration.depth_unit_mm)
        if raw.max(initial=0) > np.iinfo(np.uint16).max:
            raise ValueError(f"depth beyond {np.iinfo(np.uint16).max} units of {self.calibration.depth_unit_mm} mm")
        return raw.astype(np.uint16)

    def close(self) -> None:
        """Nothing is held open; for symmetry with the other writers."""

    def __enter__(self) -> "RGBDTakeWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def write_rgbd_take(folder: str | Path, frames, calibration: DepthCalibration, fps: float) -> int:
    """Writes (rgb, depth) pairs as an RGB-D take (RGBDTakeWriter); returns how many."""
    with RGBDTakeWriter(folder, calibration, fps) as writer:
        for rgb, depth in frames:
            writer.write(rgb, depth)
        return writer.count


class _LiveRGBDSource(FrameSource):
    """A live RGB-D camera whose driver hands colour and depth over as one pair, depth already
    registered to the colour image. The first pair is read on opening, so a camera that gives
    nothing fails early; time_s is monotonic seconds since it was opened. Iterated through a
    FrameReader (live: stale pairs are dropped there), each pair is read on the reader thread.
    """

    live = True
    frame_count = None
    name = "RGB-D camera"

    def _start(self, denoise: bool) -> None:
        """Reads the first pair; the subclass has opened its device and set camera_matrix."""
        self.denoise = denoise
        self._opened_s = time.monotonic()
        try:
            first = self._read_pair()
        except SourceError:
            self.close()
            raise
        if first is None:
            self.close()
            raise SourceError(f"{self.name} gave no first frame")
        self._first = first
        self._first_time_s = time.monotonic() - self._opened_s
        self.size = (first[0].shape[1], first[0].shape[0])

    def _read_pair(self) -> tuple[np.ndarray, np.ndarray, float] | None:
        """(RGB (H, W, 3) uint8, depth (H, W) float32 mm registered, seconds spent), None once closed;
        SourceError when the device fails."""
        raise NotImplementedError

    def _frame(self, index: int, pair, time_s: float) -> Frame:
        image, depth_mm, decode_s = pair
        if self.denoise:
            depth_mm = denoise_depth(depth_mm)
        return Frame(index, time_s, image, "", decode_s, depth_mm=depth_mm)

    def __iter__(self) -> Iterator[Frame]:
        if self._first is not None:
            yield self._frame(0, self._first, self._first_time_s)
            self._first = None
        index = 1
        while True:
            pair = self._read_pair()
            if pair is None:  # closed
                return
            yield self._frame(index, pair, time.monotonic() - self._opened_s)
            index += 1


def _import_realsense():
    """The pyrealsense2 module, or SourceError saying how to get it."""
    try:
        import pyrealsense2
    except ImportError as error:
        raise SourceError(f"a RealSense camera needs pyrealsense2 (pip install 'capture[rgbd]'): {error}") from None
    return pyrealsense2


class RealSenseSource(_LiveRGBDSource):
    """An Intel RealSense camera through pyrealsense2: colour (RGB) and depth streams, depth
    aligned to colour by the library (rs.align), scaled by the device's depth unit to mm.
    camera_matrix is the colour stream's intrinsics (its lens distortion, near zero on D400
    colour cameras, is left out).
    """

    name = "RealSense camera"
    timeout_ms = 5000  # a frame later than this: the camera stopped

    def __init__(self, width: int = 640, height: int = 480, fps: float = 30.0, denoise: bool = True):
        rs = _import_realsense()
        self._rs = rs
        self._pipeline = None
        self._first = None
        if len(rs.context().query_devices()) == 0:
            raise SourceError("no RealSense camera found")
        config = rs.config()
        config.enable_stream(rs.stream.depth, int(width), int(height), rs.format.z16, int(fps))
        config.enable_stream(rs.stream.color, int(width), int(height), rs.format.rgb8, int(fps))
        pipeline = rs.pipeline()
        try:
            profile = pipeline.start(config)
        except RuntimeError as error:
            raise SourceError(f"RealSense camera could not be started at {width}x{height}, {fps:g} frames/s: "
                              f"{str(error).splitlines()[0] if str(error) else 'no reason given'}") from None
        self._pipeline = pipeline
        self.fps = float(fps)
        self._depth_unit_mm = np.float32(profile.get_device().first_depth_sensor().get_depth_scale() * 1000.0)
        intrinsics = profile.get_stream(rs.stream.color).as_video_stream_profile().get_intrinsics()
        self.camera_matrix = np.array([[intrinsics.fx, 0.0, intrinsics.ppx],
                                       [0.0, intrinsics.fy, intrinsics.ppy], [0.0, 0.0, 1.0]])
        self._align = rs.align(rs.stream.color)
        self._start(denoise)

    def _read_pair(self):
        while True:
            pipeline = self._pipeline
            if pipeline is None:
                return None
            start_s = time.perf_counter()
            try:
                frames = pipeline.wait_for_frames(self.timeout_ms)
                aligned = self._align.process(frames)
                depth, colour = aligned.get_depth_frame(), aligned.get_color_frame()
            except RuntimeError as error:
                if self._pipeline is None:  # closed while waiting
                    return None
                raise SourceError(f"RealSense camera stopped delivering frames: "
                                  f"{str(error).splitlines()[0] if str(error) else 'no reason given'}") from None
            if not depth or not colour:
                continue  # a set missing one of the two (the streams starting): wait for a whole pair
            depth_mm = np.asanyarray(depth.get_data()).astype(np.float32)
            depth_mm *= self._depth_unit_mm
            image = np.array(np.asanyarray(colour.get_data()), dtype=np.uint8)
            return image, depth_mm, time.perf_counter() - start_s

    def close(self) -> None:
        pipeline, self._pipeline = self._pipeline, None
        self._first = None
        if pipeline is not None:
            try:
                pipeline.stop()
            except RuntimeError:
                pass


class OpenNISource(_LiveRGBDSource):
    """A Kinect-style OpenNI2 camera through OpenCV (cv2.CAP_OPENNI2): one grab() takes a depth
    map and a colour image together; the driver registers depth to colour
    (CAP_PROP_OPENNI_REGISTRATION). camera_matrix uses the driver's focal length with the
    principal point at the image centre. OpenCV's pip wheels are built without OpenNI2; an OpenCV
    built with it is needed.
    """

    def __init__(self, index: int = 0, denoise: bool = True):
        self.index = index
        self.name = f"OpenNI camera {index}"
        self._first = None
        self._capture = None
        cap = cv2.VideoCapture(cv2.CAP_OPENNI2 + int(index))
        if not cap.isOpened():
            cap.release()
            built = any("OpenNI" in line and "YES" in line for line in cv2.getBuildInformation().splitlines())
            raise SourceError(f"{self.name} could not be opened" + (
                "" if built else " (this OpenCV is built without OpenNI2)"))
        self._capture = cap
        cap.set(cv2.CAP_OPENNI_DEPTH_GENERATOR + cv2.CAP_PROP_OPENNI_REGISTRATION, 1)
        if cap.get(cv2.CAP_OPENNI_DEPTH_GENERATOR + cv2.CAP_PROP_OPENNI_REGISTRATION) != 1:
            self.close()
            raise SourceError(f"{self.name} cannot register its depth to its colour camera")
        self.fps = _valid_rate(cap.get(cv2.CAP_OPENNI_IMAGE_GENERATOR + cv2.CAP_PROP_FPS))
        self._focal_px = cap.get(cv2.CAP_OPENNI_DEPTH_GENERATOR + cv2.CAP_PROP_OPENNI_FOCAL_LENGTH)
        self._start(denoise)
        W, H = self.size
        f = self._focal_px if self._focal_px == self._focal_px and self._focal_px > 0 else None
        self.camera_matrix = None if f is None else np.array(
            [[f, 0.0, (W - 1) / 2.0], [0.0, f, (H - 1) / 2.0], [0.0, 0.0, 1.0]])

    def _read_pair(self):
        cap = self._capture
        if cap is None:
            return None
        start_s = time.perf_counter()
        try:
            ok = cap.grab()
            ok_depth, depth = cap.retrieve(flag=cv2.CAP_OPENNI_DEPTH_MAP) if ok else (False, None)
            ok_colour, bgr = cap.retrieve(flag=cv2.CAP_OPENNI_BGR_IMAGE) if ok else (False, None)
        except cv2.error:
            ok = ok_depth = ok_colour = False
        if self._capture is None:  # closed while reading
            return None
        if not (ok and ok_depth and ok_colour) or depth is None or bgr is None:
            raise SourceError(f"{self.name} stopped delivering frames")
        if depth.shape != bgr.shape[:2]:
            raise SourceError(f"{self.name} gave a {depth.shape[1]}x{depth.shape[0]} depth map for a "
                              f"{bgr.shape[1]}x{bgr.shape[0]} colour image")
        return _bgr_to_rgb(bgr), depth.astype(np.float32), time.perf_counter() - start_s

    def close(self) -> None:
        cap, self._capture = self._capture, None
        self._first = None
        if cap is not None:
            cap.release()


class FrameReader:
    """Reads a FrameSource on a background thread into a bounded queue.

    Live sources drop the stalest queued frame when the queue is full (latency
    never builds up; count drops in .dropped).  Recorded sources block the
    reader when the queue is full: no frame is ever dropped.  An exception on
    the reader thread reaches the consumer after every frame read before it.
    """

    def __init__(self, source: FrameSource, queue_size: int = 4,
                 drop_stale: bool | None = None):
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        self.source = source
        self.queue_size = queue_size
        self.drop_stale = source.live if drop_stale is None else drop_stale
        self.dropped = 0
        self._frames: collections.deque[Frame] = collections.deque()
        self._cond = threading.Condition()
        self._stop = False  # consumer asked the reader to quit
        self._done = False  # reader finished (end, error or stop)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="FrameReader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        """Reader thread: pull frames and hand them over until end, error or stop."""
        frames = None
        try:
            frames = iter(self.source)
            for frame in frames:
                if not self._put(frame):
                    break
        except BaseException as error:  # handed to the consumer, not lost
            with self._cond:
                self._error = error
        finally:
            close_frames = getattr(frames, "close", None)
            if close_frames is not None:
                try:
                    close_frames()
                except Exception:
                    pass
            with self._cond:
                stopped = self._stop
            if stopped:  # close() may have given up waiting; release the source here
                self.source.close()
            with self._cond:
                self._done = True
                self._cond.notify_all()

    def _put(self, frame: Frame) -> bool:
        """Queue one frame; returns False when the reader should stop."""
        with self._cond:
            if self.drop_stale:
                if len(self._frames) >= self.queue_size:
                    self._frames.popleft()
                    self.dropped += 1
            else:
                while len(self._frames) >= self.queue_size and not self._stop:
                    self._cond.wait()
            if self._stop:
                return False
            self._frames.append(frame)
            self._cond.notify_all()
            return True

    def __iter__(self) -> Iterator[Frame]:
        while True:
            with self._cond:
                while not self._frames and not self._done:
                    self._cond.wait()
                if self._frames:
                    frame = self._frames.popleft()
                    self._cond.notify_all()
                elif self._error is not None and not self._stop:
                    raise self._error
                else:
                    return
            yield frame

    def close(self, timeout_s: float = 1.0) -> None:
        """Stop the reader (even if blocked on a full queue) and close the source.

        If the thread is stuck inside a blocking device read for longer than
        timeout_s, it is left to exit on its own (it is a daemon) rather than
        closing the source underneath it.
        """
        with self._cond:
            self._stop = True
            self._frames.clear()
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)
        if not self._thread.is_alive():
            self.source.close()
        with self._cond:
            self._done = True
            self._cond.notify_all()

    def __enter__(self) -> "FrameReader":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
