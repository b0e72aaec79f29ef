"""The `capture` command line.

    capture video IN [--out DIR]          a recorded video -> blendshapes.csv, meshes/, track.npz
    capture image IMG... [--out DIR]      photos or folders of photos, one row per picture
    capture live [--camera N] [--preview] a webcam, live, optionally recorded with --out
    capture live --stream URL ...         ... and streamed to avatar applications (VMC, VRChat, Live Link, WebSocket)
    capture stream DIR --to URL ...       replay a recorded take to the same streams at its own frame rate
    capture calibrate VIDEO --out X.toml  an actor profile (identity, neutral face, extremes) for --actor
    capture calibrate --camera N --out X.toml   ... measured live, with prompts
    capture export DIR --format gltf      a recorded take as one .glb (mesh, 52 morph targets, animation)
    capture train coarse --out DIR        train CoarseNet on synthetic renders (trainers/train_coarse.py)
    capture train fine --data D --out DIR train FineNet on real frame pairs (trainers/train_fine.py)
    capture model import FACEXMODEL_DIR   build the face model file from ICT-FaceKit's OBJ folder
    capture engine build                  TensorRT engines of the networks for this GPU (the gpu extra)
"""
from __future__ import annotations

import os

# One BLAS thread: the fit's small matrices are slower when split across cores,
# and the reader thread needs the second core. Set before numpy loads.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import math  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from capture.console import NativeStderrFilter, reopen_closed_std_streams, silence_std_streams  # noqa: E402
from capture.take_folder import TakeLock, check_file_place, make_room, reason  # noqa: E402

#: `capture video --batch`'s default: frames tracked ahead per network pass. On the CPU too, 16 frames
#: at a time run about a quarter faster than one (bench/bench_batch.py), with the same results.
BATCH_FRAMES = 16

OUTPUTS_HELP = """\
outputs (in --out DIR):
  blendshapes.csv   Live Link Face CSV: Timecode, BlendShapeCount (61), the 52 ARKit shapes,
                    head and eye yaw/pitch/roll in radians; one row per frame with a face
  meshes/NNNNNN.obj one mesh per frame with a face (ICT face model topology, camera
                    coordinates in centimetres: x right, y down, z forward)
  track.npz         every frame: face_found, blendshapes, expression, identity, rotation,
                    translation, eyes_ypr_rad, camera_matrix, landmarks68, image_size, fps (see README)
  .capture.lock     held while a capture writes the folder: a second capture into it is refused
A folder that holds an earlier take is refused unless --overwrite, which removes that take's
files first (blendshapes.csv, track.npz, meshes/NNNNNN.*, take.glb; other files stay).
On a full disk capture stops and keeps the frames every file holds; Ctrl-C and SIGTERM
stop with the files finished and saved (README.md, When something goes wrong).
"""

STREAM_HELP = """\
streams (--stream / --to URL, repeatable; host and port may be left out):
  vmc://HOST:PORT       VMC protocol (OSC/UDP) to a Marionette such as VSeeFace (default 127.0.0.1:39539)
  vrchat://HOST:PORT    VRChat OSC, VRCFaceTracking Unified Expressions v2 names (default 127.0.0.1:9000)
  livelink://HOST:PORT  Unreal Live Link Face UDP packets (default 127.0.0.1:11111)
  ws://HOST:PORT        a WebSocket server sending JSON per frame, and a page at http://HOST:PORT/
                        showing the stream (default 127.0.0.1:8765; 0.0.0.0 to serve other machines;
                        pages from other sites are refused unless ?origins=URL,... names them)
A receiver that is absent or goes away never stalls capture; sends that fail are reported once
and only frames that went out are counted. Options go in the URL's query,
e.g. vmc://127.0.0.1:39539?names=camel (see README.md, Streaming).
"""

MODEL_HELP = """\
the face model is read from --face-model, else $CAPTURE_FACE_MODEL, else
../shared/facemodel/ict_face_model_light.npz beside the project.
"""

ACTOR_HELP = """\
calibration (--actor): a neutral face does not fit to all-zero weights, so the avatar
would never rest. FILE applies a profile made by `capture calibrate` (the performer's
identity locked from the first frame, their neutral read as 0 and their measured extremes
as 1); auto (default) estimates each take's neutral from its quietest frames (the first
10 s; nothing for photos); off writes the raw fitted weights. Blendshapes and streams are
calibrated; meshes and track.npz's expression stay the fit's own.
"""

CALIBRATE_HELP = """\
on a video: the identity is the take's locked identity, the neutral the median of the
quietest quarter of its frames (or of its first --neutral-s seconds with
--neutral-from-start); with --extremes, each shape's peak is its 98th percentile where
that rises more than 0.2 above the neutral (1.0 elsewhere). Film the performer resting,
talking and, for --extremes, at their extremes.

live (--camera N): prompts on the console (and the preview with --preview): a countdown,
"hold a neutral face" for --neutral-s seconds, then unless --no-extremes blink, open the
jaw, smile and raise the brows, --step-s seconds each; peaks are the 95th percentile of
the prompted shapes within each step.

The profile is a TOML file (shapes by name, editable); use it with
`capture video|image|live|stream --actor FILE`, on any take of the same performer.
"""

EPILOG = OUTPUTS_HELP + "\n" + ACTOR_HELP + "\n" + MODEL_HELP
LIVE_EPILOG = OUTPUTS_HELP + "\n" + ACTOR_HELP + "\n" + STREAM_HELP + "\n" + MODEL_HELP


def _stream_options(p: argparse.ArgumentParser, flag: str, required: bool) -> None:
    p.add_argument(flag, dest="stream", action="append", metavar="URL", required=required, default=None,
                   help="stream to vmc://, vrchat://, livelink:// or ws:// (repeat for several; see below)")
    p.add_argument("--stream-fps", type=float, default=None,
                   help="send at most this many frames a second (default: every frame)")


def _swap_mouth_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--swap-mouth-lr", action="store_true",
                   help="Live Link outputs (blendshapes.csv, livelink:// streams): write mouthLeft as "
                   "MouthRight and back, to match takes from Live Link Face versions that swap them")


class CaptureError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


def _actor_option(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--actor", default="auto", metavar="FILE|auto|off",
                   help=help + " (a file named auto or off: ./auto)")


def _common(p: argparse.ArgumentParser, out_required: bool = False) -> None:
    p.add_argument("--out", type=Path, required=out_required,
                   help="output folder (default: takes/<input name>)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier take in --out: its files are removed first (other files stay); "
                   "without it a folder holding a take is refused")
    p.add_argument("--mesh-format", choices=("obj", "ply", "none"), default="obj",
                   help="per-frame mesh files (default: obj)")
    p.add_argument("--no-filter", action="store_true",
                   help="write raw per-frame fits (no One-Euro temporal filtering)")
    _actor_option(p, "calibration: FILE an actor profile from `capture calibrate`; auto (default) each "
                  "take's neutral from its quietest frames (nothing for photos); off the raw fitted weights")
    p.add_argument("--detail", action="store_true",
                   help="also capture the skin's detail with FineNet: detail/NNNNNN.png (16-bit displacement "
                   "maps in the face model's UV layout, scale in track.npz), detail_normals/NNNNNN.png (normal "
                   "maps for renderers), and meshes with the face skin subdivided and displaced (about 60 ms "
                   "a frame more on one core; off by default)")
    p.add_argument("--detail-weights", type=Path, default=None, metavar="PATH",
                   help="FineNet weights for --detail, .onnx (default: engine/weights/finenet.onnx)")
    _engine_options(p)
    _swap_mouth_option(p)


def _engine_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--focal-px", type=float, default=None,
                   help="camera focal length in pixels (default: the larger image side, about 53° across)")
    p.add_argument("--face-model", type=Path, default=None, help="face model .npz")
    p.add_argument("--engine", choices=("coarse", "fit"), default="coarse",
                   help="coarse (default): CoarseNet reads the face crop, one network pass per frame; "
                   "fit: no network, a landmark optimiser fits the head pose and identity to MediaPipe's "
                   "landmarks (its expression: see --expression)")
    p.add_argument("--coarse-weights", type=Path, default=None, metavar="PATH",
                   help="CoarseNet weights for --engine coarse: .onnx (ONNX Runtime) or .pt (torch) "
                   "(default: engine/weights/coarsenet.onnx, shipped with capture)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where the networks run: auto (default) and cuda take an NVIDIA GPU when ONNX Runtime's "
                   "CUDA provider (onnxruntime-gpu) or torch with CUDA can use one, else the CPU; one line at "
                   "start-up says which and why")
    p.add_argument("--no-small-faces", action="store_true",
                   help="skip the full-range detector that finds small, distant faces")
    p.add_argument("--blink", choices=("lids", "eyes", "fit"), default="lids",  # pipeline.BLINK_SOURCES
                   help="eyeBlink from: lids (default), MediaPipe's lid gap against the take's own open eye "
                   "(videos; photos use the fit); eyes, a small network on each eye's pixels, which sees the "
                   "winks MediaPipe's lids miss on rendered faces but reads real open eyes as partly shut; "
                   "fit, the engine's fitted weights")
    p.add_argument("--expression", choices=("merged", "network", "solve"), default="merged",  # EXPRESSION_SOURCES
                   help="where the expression comes from: merged (default), a small MLP reading the shape of "
                   "MediaPipe's landmarks: with --engine coarse the shapes it reads better (jaw, smiles, squints; "
                   "chosen on validation renders), the rest from CoarseNet; with --engine fit every shape, the "
                   "optimiser fitting the head pose and identity around it; network (coarse only), CoarseNet's "
                   "alone; solve (fit only), the optimiser solves every shape from the landmarks itself")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="capture", description="Real-time facial performance capture: a 3D face mesh, head pose and "
        "the 52 ARKit blendshapes from every frame of a video, photos or a webcam.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("video", help="process a recorded video", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Track and fit every frame of a video; frames without a face are "
                       "marked in track.npz and skipped in the CSV and meshes. No frame is dropped.")
    p.add_argument("input", type=Path, help="video file (mp4, mov, avi, ...), or an RGB-D take: a folder "
                   "with rgb/ and depth/ (see the README), whose depth refines every fit")
    p.add_argument("--max-frames", type=int, default=None, help="stop after this many frames")
    p.add_argument("--save-pointclouds", action="store_true",
                   help="RGB-D takes: also write pointclouds/NNNNNN.ply, each frame's registered depth in "
                   "camera space (cm, coloured)")
    p.add_argument("--smooth-depth", action="store_true",
                   help="RGB-D takes: smooth each depth image (bilateral, edges kept) before the fit and the "
                   "point clouds; the fit does not need it (about 1 ms a frame), smoother point clouds do")
    p.add_argument("--batch", type=int, default=BATCH_FRAMES, metavar="N",
                   help="track up to N frames ahead, run CoarseNet on their crops in one pass, then fit and "
                   f"write them in order: the same results as one frame at a time, sooner (default {BATCH_FRAMES}; "
                   "1: one at a time)")
    _common(p)

    p = sub.add_parser("image", help="process photos", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Fit each photo on its own (identity per photo, in track.npz's "
                       "identity_per_frame); one row per photo in the order given, folders "
                       "expanded in name order. Exits 1 if a photo has no face, after writing the rest.")
    p.add_argument("input", type=Path, nargs="+", help="image files or folders")
    _common(p)

    p = sub.add_parser("live", help="capture from a camera", epilog=LIVE_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Live capture from a webcam. Stale frames are dropped so latency "
                       "never builds up. Without --out nothing is written; Ctrl-C stops. "
                       "--stream sends every frame to avatar applications as it is captured.")
    p.add_argument("--camera", type=int, default=0, help="camera index (default: 0)")
    p.add_argument("--preview", action="store_true", help="show a window with the fitted mesh over the picture")
    p.add_argument("--width", type=int, default=None, help="requested camera width, px")
    p.add_argument("--height", type=int, default=None, help="requested camera height, px")
    p.add_argument("--max-frames", type=int, default=None, help="stop after this many frames")
    p.add_argument("--rgbd", choices=("realsense", "openni"), default=None,
                   help="a depth camera instead of a webcam: an Intel RealSense (pyrealsense2, pip install "
                   "'capture[rgbd]') or an OpenNI2 device (--camera picks it; needs OpenCV built with OpenNI2); "
                   "its depth refines every fit")
    p.add_argument("--record-rgbd", type=Path, default=None, metavar="DIR",
                   help="with --rgbd: also record the colour and registered depth as an RGB-D take in DIR "
                   "(`capture video DIR` fits it again)")
    p.add_argument("--save-pointclouds", action="store_true",
                   help="with --rgbd and --out: also write pointclouds/NNNNNN.ply, each frame's registered depth "
                   "in camera space (cm, coloured)")
    _stream_options(p, "--stream", required=False)
    _common(p)
    p.set_defaults(mesh_format="none")

    p = sub.add_parser("stream", help="replay a recorded take to avatar applications",
                       epilog=STREAM_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Send a take recorded by `capture video` or `capture live --out` "
                       "(its track.npz) to the streams at the take's own frame rate, as if it were live. "
                       "Frames without a face are sent as tracking lost.")
    p.add_argument("take", type=Path, help="a take folder (with track.npz) or a track.npz file")
    _stream_options(p, "--to", required=True)
    p.add_argument("--speed", type=float, default=1.0, help="playback speed (default: 1, real time)")
    p.add_argument("--loop", action="store_true",
                   help="replay until Ctrl-C, each pass after the last on one steady clock")
    _swap_mouth_option(p)
    _actor_option(p, "auto (default): send the blendshapes as recorded; FILE: re-calibrate them from the "
                  "take's stored expression weights with an actor profile; off: re-make them uncalibrated")
    p.add_argument("--face-model", type=Path, default=None, help="face model .npz (for --actor FILE|off)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("calibrate", help="measure an actor profile (neutral face, extremes) for --actor",
                       epilog=CALIBRATE_HELP + "\n" + MODEL_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Measure one performer's calibration on a video or live on a camera: "
                       "their identity, the expression weights of their neutral face and how far their "
                       "extremes reach. Writes a TOML profile for `--actor FILE`.")
    p.add_argument("input", type=Path, nargs="?", default=None, help="a video of the performer (or --camera)")
    p.add_argument("--camera", type=int, default=None, metavar="N", help="calibrate live on camera N, with prompts")
    p.add_argument("--out", type=Path, required=True, help="the profile to write (.toml)")
    p.add_argument("--name", default=None, help="the performer's name in the profile (default: the video's name)")
    p.add_argument("--neutral-s", type=float, default=3.0,
                   help="seconds of neutral face: live, the neutral step; on a video, with "
                   "--neutral-from-start (default: 3)")
    p.add_argument("--neutral-from-start", action="store_true",
                   help="video: take the neutral from its first --neutral-s seconds, not the whole video")
    p.add_argument("--extremes", action=argparse.BooleanOptionalAction, default=None,
                   help="measure how far each shape goes (default: on live, off on a video)")
    p.add_argument("--step-s", type=float, default=2.0, help="live: seconds per extreme (default: 2)")
    p.add_argument("--max-frames", type=int, default=None, help="video: use only its first frames")
    p.add_argument("--preview", action="store_true", help="live: show the picture and the prompts in a window")
    p.add_argument("--width", type=int, default=None, help="requested camera width, px")
    p.add_argument("--height", type=int, default=None, help="requested camera height, px")
    _engine_options(p)

    p = sub.add_parser("export", help="export a recorded take for animation tools",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=MODEL_HELP,
                       description="Write a take recorded by `capture video` or `capture live --out` as one "
                       "binary glTF 2.0 file (.glb): the take's face mesh (metres, y up), the 52 ARKit "
                       "shapes as morph targets, and the take as morph-weight and head-rotation "
                       "animation. Blender, Unreal, Maya (with a glTF importer) and three.js read it.")
    p.add_argument("take", type=Path, help="a take folder (with track.npz) or a track.npz file")
    p.add_argument("--format", choices=("gltf",), default="gltf", help="export format (default: gltf, as .glb)")
    p.add_argument("--out", type=Path, default=None, help="output file (default: TAKE/take.glb)")
    p.add_argument("--face-model", type=Path, default=None, help="face model .npz (the one the take was made with)")
    p.add_argument("--detail", action="store_true",
                   help="include the skin detail of a take recorded with --detail as the face's normal texture "
                   "(the median of the take's displacement maps; glTF has no per-frame textures)")
    p.add_argument("--detail-frame", type=int, default=None, metavar="N",
                   help="with --detail: frame N's map instead of the take's median")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("train", help="train the networks (CoarseNet, FineNet)")
    tsub = p.add_subparsers(dest="train_command", required=True, metavar="NETWORK")
    tsub.add_parser("coarse", help="train CoarseNet (see `capture train coarse --help`)", add_help=False)
    tsub.add_parser("fine", help="train FineNet, the skin detail (see `capture train fine --help`)", add_help=False)

    p = sub.add_parser("engine", help="TensorRT engines for the GPU")
    esub = p.add_subparsers(dest="engine_command", required=True, metavar="ACTION")
    q = esub.add_parser("build", help="build the networks' TensorRT engines for this GPU",
                        description="Builds TensorRT engines from the shipped ONNX files (or the ones given) "
                        "for this machine's GPU and caches them, so the first take does not wait for the build "
                        "(about a minute per network). The engines are FP16 (TensorRT 10; TensorRT 11 builds the "
                        "graphs' own float32) for batches of 1 to 64 crops, one per GPU model, TensorRT version "
                        "and weights; `--device auto|cuda` then runs on them. Needs an NVIDIA GPU, TensorRT "
                        "(pip install 'capture[gpu]') and a CUDA build of torch.")
    q.add_argument("--network", choices=("coarse", "fine", "all"), default="all",
                   help="which network (default all: CoarseNet and FineNet)")
    q.add_argument("--coarse-weights", type=Path, default=None, metavar="PATH.onnx",
                   help="CoarseNet ONNX file (default: the shipped one)")
    q.add_argument("--detail-weights", type=Path, default=None, metavar="PATH.onnx",
                   help="FineNet ONNX file (default: the shipped one)")
    q.add_argument("--rebuild", action="store_true", help="build again even when the cache has the engine")
    q.add_argument("--cache", type=Path, default=None, metavar="DIR",
                   help="engine cache (default: $CAPTURE_ENGINE_CACHE or ~/.cache/capture/engines)")

    p = sub.add_parser("model", help="face model tools")
    msub = p.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    q = msub.add_parser("import", help="build the face model .npz from ICT-FaceKit's FaceXModel folder",
                        description="Reads generic_neutral_mesh.obj, identityNNN.obj, the 53 expression OBJs "
                        "and vertex_indices.json from the upstream ICT-FaceKit FaceXModel folder and "
                        "writes the single .npz file capture uses.")
    q.add_argument("folder", type=Path, help="the FaceXModel folder")
    q.add_argument("--out", type=Path, default=None,
                   help="output .npz (default: $CAPTURE_FACE_MODEL or ../shared/facemodel/ict_face_model_light.npz)")
    return parser


def _is_dir(path: Path) -> bool:
    """Path.is_dir, False for a name the file system cannot even look up (too long)."""
    try:
        return path.is_dir()
    except OSError:
        return False


def _default_out(input_path: Path) -> Path:
    return Path("takes") / input_path.stem


def _load_actor(actor: str, model):
    """--actor FILE|auto|off -> an ActorProfile for model, or None (auto and off)."""
    from engine.calibration import ActorProfile

    if actor in ("auto", "off"):
        return None
    return ActorProfile.load(actor, model.expression_names)


def _load_capture(args, static: bool, raw: bool = False):
    """FaceCapture as the options ask; raw: no filtering and no calibration (what calibrate measures).
    Once it is built, one line says where its networks run (engine.device)."""
    from capture.pipeline import CaptureSettings, FaceCapture
    from engine.coarse_fitting import runtime_for
    from engine.correspondence import LandmarkCorrespondence
    from engine.device import choose_device
    from engine.facemodel import FaceModel

    model = FaceModel.load(args.face_model)
    device = choose_device(args.device)
    actor = "off" if raw else args.actor
    weights = args.coarse_weights
    settings = CaptureSettings(engine=args.engine, coarse_weights=weights, coarse_runtime=runtime_for(weights),
                               device_backend=device.backend, focal_px=args.focal_px,
                               filtering=not (raw or args.no_filter), small_faces=not args.no_small_faces,
                               static=static, blink=args.blink, expression=args.expression,
                               actor=_load_actor(actor, model), auto_neutral=actor == "auto")
    capture = FaceCapture(model, LandmarkCorrespondence.load(), settings)
    print(f"capture: {device.line()}", file=sys.stderr)
    return capture


def _report(summary, out: Path | None) -> None:
    fps = summary.frames / summary.wall_s if summary.wall_s > 0 else 0.0
    line = f"{summary.frames} frames, {summary.faces} with a face, {fps:.1f} frames/s"
    if summary.skipped:
        line += f", {summary.skipped} undecodable frames skipped (decoded=False in track.npz)"
    if summary.dropped:
        line += f", {summary.dropped} stale frames dropped"
    if out is not None:
        line += f" -> {out}"
    print(line, file=sys.stderr)


def _take_folder(out: Path, overwrite: bool) -> TakeLock:
    """The take folder, locked, and cleared of an earlier take with --overwrite (else one holding
    one is refused); before the engine loads."""
    lock = TakeLock(out)
    try:
        cleared = make_room(out, overwrite)
    except BaseException:
        lock.release()
        raise
    if cleared:
        print(f"capture: {cleared}", file=sys.stderr)
    return lock


def _load_detail(args, capture):
    """FineNet's runtime for --detail (None without it); unusable weights are a CaptureError."""
    if not args.detail:
        return None
    from engine.device import onnx_provider
    from engine.fine_runtime import FineNetError, FineRuntime

    try:
        return FineRuntime(capture.model, args.detail_weights, provider=onnx_provider(capture.settings.device_backend))
    except FineNetError as exc:
        raise CaptureError(str(exc)) from None


def cmd_video(args) -> int:
    from capture.pipeline import run_take
    from capture.sources import RGBDFolderSource, VideoSource, is_rgbd_folder

    rgbd = _is_dir(args.input) and is_rgbd_folder(args.input)
    if args.save_pointclouds and not rgbd:
        raise CaptureError(f"--save-pointclouds needs an RGB-D take (a folder with rgb/ and depth/): {args.input}")
    source = RGBDFolderSource(args.input, denoise=args.smooth_depth) if rgbd else VideoSource(args.input)
    if args.batch < 1:
        raise CaptureError(f"--batch must be at least 1, got {args.batch}")
    out = args.out or _default_out(args.input)
    try:
        with _take_folder(out, args.overwrite):  # the output place is checked before the engine loads
            capture = _load_capture(args, static=False)
            try:
                summary = run_take(source, capture, out, args.mesh_format, progress=not args.quiet,
                                   max_frames=args.max_frames, swap_mouth_lr=args.swap_mouth_lr,
                                   pointclouds=args.save_pointclouds, detail=_load_detail(args, capture),
                                   batch=args.batch)
            finally:
                capture.close()
    finally:
        source.close()
    _report(summary, out)
    return 0


def cmd_image(args) -> int:
    from capture.pipeline import run_take
    from capture.sources import ImageSource

    source = ImageSource(args.input)
    out = args.out or _default_out(args.input[0])
    with _take_folder(out, args.overwrite):
        capture = _load_capture(args, static=True)
        try:
            summary = run_take(source, capture, out, args.mesh_format, progress=not args.quiet,
                               swap_mouth_lr=args.swap_mouth_lr, detail=_load_detail(args, capture))
        finally:
            capture.close()
    _report(summary, out)
    if summary.frames_without_face:
        missing = summary.frames_without_face
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CaptureError(f"no face found in {missing[0]}{more}")
    return 0


def _open_streams(args):
    """The --stream/--to URLs as a StreamHub, or None; every URL is checked before any opens."""
    from capture.streams import StreamHub, open_stream

    if not args.stream:
        return None
    streams = []
    try:
        for url in args.stream:
            streams.append(open_stream(url))
        hub = StreamHub(streams, args.stream_fps)
    except BaseException:
        for stream in streams:
            stream.close()
        raise
    for stream in streams:
        if args.swap_mouth_lr and hasattr(stream, "swap_mouth_lr"):
            stream.swap_mouth_lr = True
        page = getattr(stream, "page_url", None)
        print(f"streaming to {stream.url}" + (f" (page: {page})" if page else ""), file=sys.stderr)
    return hub


def _live_source(args):
    """The camera `capture live` reads: a webcam, or with --rgbd a depth camera (its depth registered
    to the colour image, not smoothed: the fit does not need it)."""
    from capture.sources import CameraSource, OpenNISource, RealSenseSource

    if args.rgbd == "realsense":
        return RealSenseSource(args.width or 640, args.height or 480, denoise=False)
    if args.rgbd == "openni":
        return OpenNISource(args.camera, denoise=False)
    return CameraSource(args.camera, args.width, args.height)


def _rgbd_recorder(folder: Path, source):
    """An RGB-D take writer in folder (an empty or new one) for a depth camera's frames, the depth
    stored as registered to the colour camera."""
    from capture.sources import RGBDTakeWriter
    from engine.depth import DepthCalibration

    if _is_dir(folder) and any(folder.iterdir()):
        raise CaptureError(f"--record-rgbd folder is not empty: {folder}")
    try:
        return RGBDTakeWriter(folder, DepthCalibration.registered(source.camera_matrix), source.fps or 30.0)
    except OSError as exc:
        raise CaptureError(f"cannot record in {folder}: {reason(exc)}") from None


def cmd_live(args) -> int:
    from capture.pipeline import run_take
    from capture.preview import Preview, check_display

    if args.record_rgbd is not None and args.rgbd is None:
        raise CaptureError("--record-rgbd needs a depth camera (--rgbd realsense|openni)")
    if args.save_pointclouds and args.rgbd is None:
        raise CaptureError("--save-pointclouds needs a depth camera (--rgbd realsense|openni)")
    if args.detail and args.out is None:
        raise CaptureError("--detail writes detail maps and meshes: it needs --out DIR")
    if args.preview:
        check_display()
    lock = _take_folder(args.out, args.overwrite) if args.out is not None else None
    hub = source = recorder = None
    try:
        hub = _open_streams(args)
        source = _live_source(args)
        capture = _load_capture(args, static=False)
        detail = _load_detail(args, capture)
        if args.record_rgbd is not None:
            recorder = _rgbd_recorder(args.record_rgbd, source)
    except BaseException:
        if source is not None:
            source.close()
        if hub is not None:
            hub.close()
        if lock is not None:
            lock.release()
        raise
    preview = Preview(capture, f"capture: {args.rgbd or 'camera'} {args.camera}") if args.preview else None

    def on_result(frame, result):
        if recorder is not None and frame.depth_mm is not None:
            try:
                recorder.write(frame.image, frame.depth_mm)
            except OSError as exc:  # the take's files are finished as the error passes run_take
                raise CaptureError(f"cannot record in {args.record_rgbd}: {reason(exc)}; "
                                   f"{recorder.count} RGB-D frames recorded") from None
        return preview.show(frame, result) if preview is not None else None

    try:
        summary = run_take(source, capture, args.out, args.mesh_format, progress=not args.quiet,
                           max_frames=args.max_frames, on_result=on_result,
                           queue_size=1, streams=hub, swap_mouth_lr=args.swap_mouth_lr,
                           pointclouds=args.save_pointclouds, detail=detail)
    except KeyboardInterrupt:
        summary = None
    finally:
        if preview is not None:
            preview.close()
        if hub is not None:
            hub.close()
        capture.close()
        source.close()
        if recorder is not None:
            recorder.close()
            print(f"capture: recorded {recorder.count} RGB-D frames -> {args.record_rgbd}", file=sys.stderr)
        if lock is not None:
            lock.release()
    if summary is not None:
        _report(summary, args.out)
    if hub is not None:
        print(f"streams: {hub.summary()}", file=sys.stderr)
    return 0


def _load_take(path: Path) -> tuple[dict, Path]:
    """A take folder or its track.npz -> (arrays, folder), read safely and validated
    (capture.takes: a TakeError is one line)."""
    from capture.takes import load_take

    track_path = path / "track.npz" if path.is_dir() else path
    if not track_path.is_file():
        raise CaptureError(f"no track.npz in {path}" if path.is_dir() else f"no such take: {path}")
    return load_take(track_path), track_path.parent


def cmd_stream(args) -> int:
    from tqdm import tqdm

    from capture.streams import looped, replay, track_frames

    if not args.speed > 0:
        raise CaptureError(f"--speed must be > 0, got {args.speed}")
    track, _ = _load_take(args.take)
    n = len(track["frame_index"])
    if n == 0:
        raise CaptureError(f"{args.take} has no frames")
    if args.actor != "auto":  # re-made from the stored, uncalibrated weights
        from capture.calibrate import recalibrate_track
        from engine.facemodel import FaceModel

        model = FaceModel.load(args.face_model)
        track = recalibrate_track(track, model.arkit_mapping(), _load_actor(args.actor, model))
    hub = _open_streams(args)
    replayed = 0
    interrupted = False
    try:
        with tqdm(total=n, unit="frame", disable=args.quiet, dynamic_ncols=True) as bar:
            def advance(_frame):
                nonlocal replayed
                replayed += 1
                if bar.n >= n:  # the next pass of --loop
                    bar.reset()
                bar.update(1)

            replay(looped(lambda: track_frames(track), None if args.loop else 1), hub, args.speed,
                   on_frame=advance)
    except KeyboardInterrupt:  # how --loop ends
        interrupted = True
    finally:
        hub.close()
    if hub.nothing_went_out():
        raise CaptureError(f"nothing was sent: {hub.summary()}")
    print(f"{replayed} frames replayed; {hub.summary()}", file=sys.stderr)
    if interrupted and not args.loop:
        raise KeyboardInterrupt
    return 0


def cmd_calibrate(args) -> int:
    from capture.calibrate import calibrate_video

    if (args.input is None) == (args.camera is None):
        raise CaptureError("give a VIDEO or --camera N to calibrate on (one of them)")
    if _is_dir(args.out):
        raise CaptureError(f"--out {args.out} is a folder; give the profile's file name, e.g. actor.toml")
    if not _is_dir(args.out.parent):
        raise CaptureError(f"no such folder for --out: {args.out.parent}")
    check_file_place(args.out)  # a read-only folder or a name too long fails now, not after the work
    if args.input is not None:
        if args.preview:
            raise CaptureError("--preview is for --camera")
        from capture.sources import VideoSource

        VideoSource(args.input).close()  # a bad video fails here, before the engine loads
        capture = _load_capture(args, static=False, raw=True)
        try:
            result = calibrate_video(args.input, capture, args.neutral_s if args.neutral_from_start else None,
                                     bool(args.extremes), args.max_frames, progress=not args.quiet,
                                     name=args.name or "")
        finally:
            capture.close()
    else:
        result = _calibrate_live(args)
    try:
        result.profile.save(args.out)
    except OSError as exc:
        raise CaptureError(f"cannot write {args.out}: {reason(exc)}") from None
    _report_calibration(result, args.out)
    return 0


def _calibrate_live(args):
    """The guided session on camera args.camera -> Calibration."""
    from capture.calibrate import GuidedSession, guided_steps
    from capture.pipeline import run_take
    from capture.preview import Preview, check_display
    from capture.sources import CameraSource

    if args.preview:
        check_display()
    source = CameraSource(args.camera, args.width, args.height)
    try:
        capture = _load_capture(args, static=False, raw=True)
    except BaseException:
        source.close()
        raise
    session = GuidedSession(guided_steps(args.neutral_s, args.extremes is not False, args.step_s),
                            capture.model.expression_names, ready=lambda: capture.fitter.identity_locked)
    preview = Preview(capture, f"capture: calibrating on camera {args.camera}") if args.preview else None

    def on_result(frame, result):
        going = session(frame, result)
        if preview is not None and not preview.show(frame, result, session.caption):
            raise KeyboardInterrupt
        return going

    try:
        run_take(source, capture, None, progress=False, on_result=on_result, queue_size=1)
    finally:
        if preview is not None:
            preview.close()
        capture.close()
        source.close()
    if not session.done:
        raise CaptureError(f"camera {args.camera} stopped before the calibration was done")
    return session.calibration(capture.fitter.identity, args.name or f"camera {args.camera}",
                               f"camera {args.camera}")


def _report_calibration(result, out: Path) -> None:
    import numpy as np

    p = result.profile
    offsets = np.argsort(-p.neutral)[:5]
    print(f"calibrated {p.name or 'the performer'} on {result.frames} frames with a face "
          f"(neutral: median of {result.neutral_frames}) -> {out}", file=sys.stderr)
    print("largest neutral offsets: " + ", ".join(f"{p.shape_names[i]} {p.neutral[i]:.2f}" for i in offsets),
          file=sys.stderr)
    measured = np.flatnonzero(p.peak < 1.0)
    print("peaks: " + (", ".join(f"{p.shape_names[i]} {p.peak[i]:.2f}" for i in measured) if len(measured)
                       else "none measured (1.0)"), file=sys.stderr)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)


def cmd_export(args) -> int:
    from tqdm import tqdm

    from capture.gltf_export import GltfExportError, export_gltf, take_detail_mm
    from engine.facemodel import FaceModel

    if args.detail_frame is not None and not args.detail:
        raise CaptureError("--detail-frame needs --detail")
    track, folder = _load_take(args.take)
    if not track["face_found"].any():
        raise CaptureError(f"{args.take} has no frame with a face: nothing to export")
    try:
        detail_mm = take_detail_mm(folder, track, args.detail_frame) if args.detail else None
    except GltfExportError as exc:
        raise CaptureError(f"{args.take}: {exc}") from None
    out = args.out or folder / "take.glb"
    if _is_dir(out):
        raise CaptureError(f"--out {out} is a folder: give the .glb file's name")
    check_file_place(out)
    model = FaceModel.load(args.face_model)
    with tqdm(unit="step", desc="exporting", disable=args.quiet, dynamic_ncols=True) as bar:
        def progress(done, total):
            bar.total = total
            bar.n = done
            bar.refresh()
        try:
            path = export_gltf(track, model, out, progress=progress, detail_mm=detail_mm)
        except GltfExportError as exc:
            raise CaptureError(str(exc)) from None
        except OSError as exc:  # the .glb is written whole or not at all
            raise CaptureError(f"cannot write {out}: {reason(exc)}") from None
    print(f"wrote {path} ({Path(path).stat().st_size / 1e6:.1f} MB)", file=sys.stderr)
    return 0


def cmd_train(args) -> int:
    """Hands the rest of the command line to the trainer, which owns its options."""
    from trainers.train_coarse import ConfigError

    if args.train_command == "fine":
        from trainers.train_fine import main as trainer
    else:
        from trainers.train_coarse import main as trainer
    try:
        return trainer(args.trainer_argv, prog=f"capture train {args.train_command}")
    except ConfigError as exc:
        raise CaptureError(str(exc)) from None


def cmd_engine_build(args) -> int:
    import time

    from engine.coarse_fitting import DEFAULT_WEIGHTS as COARSE_WEIGHTS
    from engine.device import backend_problem
    from engine.fine_runtime import DEFAULT_WEIGHTS as FINE_WEIGHTS
    from engine.trt_engine import TensorRTError, build_engine

    files = {"coarse": args.coarse_weights or COARSE_WEIGHTS["onnx"], "fine": args.detail_weights or FINE_WEIGHTS}
    files = {name: path for name, path in files.items() if args.network in (name, "all")}
    for path in files.values():
        if not Path(path).is_file():
            raise CaptureError(f"ONNX file not found: {path}")
    problem = backend_problem("tensorrt")
    if problem is not None:
        raise CaptureError(f"engine build: {problem}")
    for name, path in files.items():
        t0 = time.perf_counter()
        try:
            engine, built = build_engine(Path(path), args.cache, rebuild=args.rebuild,
                                         say=lambda line: print(f"capture: {line}", file=sys.stderr))
        except TensorRTError as exc:
            raise CaptureError(str(exc)) from None
        what = f"built in {time.perf_counter() - t0:.0f} s" if built else "already cached"
        print(f"{name}: {engine} ({what})", file=sys.stderr)
    return 0


def cmd_model_import(args) -> int:
    from tqdm import tqdm

    from engine.facemodel import DEFAULT_FACE_MODEL, ENV_FACE_MODEL
    from engine.model_import import import_facexmodel

    out = args.out or Path(os.environ.get(ENV_FACE_MODEL) or DEFAULT_FACE_MODEL)
    if not args.folder.is_dir():
        raise CaptureError(f"not a folder: {args.folder}")
    with tqdm(unit="file", desc="importing") as bar:
        def progress(done, total):
            bar.total = total
            bar.n = done
            bar.refresh()
        path = import_facexmodel(args.folder, out, progress=progress)
    print(f"wrote {path}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    reopen_closed_std_streams()
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "train":
        args.trainer_argv = rest  # the trainer parses its own options
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    from capture.sources import SourceError
    from engine.facemodel import FaceModelError
    from capture.preview import PreviewError
    from engine.model_import import ModelImportError
    from capture.streams import StreamError
    from engine.coarse_fitting import CoarseWeightsError
    from engine.calibration import CalibrationError
    from engine.landmark_expression import LandmarkExpressionError

    from capture.take_folder import OutputError
    from capture.takes import TakeError

    handlers = {"video": cmd_video, "image": cmd_image, "live": cmd_live, "stream": cmd_stream,
                "calibrate": cmd_calibrate, "export": cmd_export, "train": cmd_train}
    handlers.update({"model": cmd_model_import, "engine": cmd_engine_build})
    handler = handlers[args.command]
    sigterm_handled, previous_sigterm = _stop_on_sigterm()
    try:
        try:
            _check_numbers(args)
            _check_choices(args)
            with NativeStderrFilter():
                return handler(args)
        except (CaptureError, SourceError, FaceModelError, ModelImportError, PreviewError, StreamError,
                CoarseWeightsError, LandmarkExpressionError, CalibrationError, OutputError, TakeError,
                FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as exc:
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            print(f"capture: error: {message}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: outputs are finished on the way out
            if sigterm_handled and signal.getsignal(signal.SIGTERM) == signal.SIG_IGN:
                print("capture: terminated", file=sys.stderr)
                return 128 + signal.SIGTERM
            print("capture: interrupted", file=sys.stderr)
            return 130
    except BrokenPipeError:  # the reader of stdout/stderr left (`| head`): files are finished; end quietly
        silence_std_streams()
        return 128 + signal.SIGPIPE
    finally:
        if sigterm_handled:
            signal.signal(signal.SIGTERM, previous_sigterm)


def _stop_on_sigterm() -> tuple[bool, object]:
    """Makes SIGTERM stop the command as Ctrl-C does (KeyboardInterrupt in the main thread,
    so every take is finished and saved). Once: further SIGTERMs, while the files are being
    finished, are ignored (SIGKILL still ends at once), which also tells main which signal
    it was. Returns (installed, the previous handler); not installed outside the main thread
    or where SIGTERM was ignored when capture started (the parent's choice stands)."""
    import threading

    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or previous == signal.SIG_IGN:
        return False, previous

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGTERM, stop)
    return True, previous


#: Numeric options that must be finite and > 0 (flag, dest); whole numbers come typed as int.
POSITIVE_OPTIONS = (("--max-frames", "max_frames"), ("--focal-px", "focal_px"), ("--stream-fps", "stream_fps"),
                    ("--speed", "speed"), ("--neutral-s", "neutral_s"), ("--step-s", "step_s"),
                    ("--width", "width"), ("--height", "height"))


def _check_numbers(args) -> None:
    """One line for a count, size, rate or length that is 0, negative, NaN or infinite."""
    for flag, dest in POSITIVE_OPTIONS:
        value = getattr(args, dest, None)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise CaptureError(f"{flag} must be > 0 and finite, got {value}")
    if getattr(args, "camera", None) is not None and args.camera < 0:
        raise CaptureError(f"--camera must be 0 or more, got {args.camera}")


def _check_choices(args) -> None:
    """One line for options that each exist but do not go together."""
    from capture.pipeline import expression_needs

    needs = expression_needs(args.engine, args.expression) if hasattr(args, "expression") else None
    if needs:
        raise CaptureError(f"--expression {args.expression} needs --engine {needs} (got --engine {args.engine})")


if __name__ == "__main__":
    raise SystemExit(main())
