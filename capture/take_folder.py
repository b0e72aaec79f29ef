"""The folder a take is written into: checked and locked before the first frame,
cleared of an earlier take only when asked, and put back in agreement with
itself when a write fails midway.

A take folder is locked by ``.capture.lock``, a file holding the writer's
process id and held with ``flock``: the kernel drops the lock when the
process dies, however it dies, so a lock left by a dead capture is simply
taken over, while a second capture into a folder in use is refused. On file
systems without ``flock`` the process id alone decides (a lock whose process
is gone is stale).
"""
from __future__ import annotations

import errno
import fcntl
import os
import re
import tempfile
from pathlib import Path

import numpy as np

LOCK_NAME = ".capture.lock"
#: The files a take writes into its folder, under their own and their temporary names, and the
#: .glb `capture export` puts beside them by default: an earlier take is any of these.
TAKE_FILES = ("blendshapes.csv", "track.npz", ".track.npz.tmp", "take.glb", "take.glb.tmp")
MESH_FOLDER = "meshes"
#: A mesh file in MESH_FOLDER (capture.sinks.MeshSequenceWriter: frame number, 6 digits or more),
#: or one being written (sinks._write_atomic's temporary name).
MESH_FILE = re.compile(r"\.?\d{6,}\.(obj|ply)(\.tmp)?")
#: An RGB-D take's point clouds (--save-pointclouds): POINTCLOUD_FOLDER/NNNNNN.ply, as the meshes.
POINTCLOUD_FOLDER = "pointclouds"
#: --detail: DETAIL_FOLDER/NNNNNN.png 16-bit displacement maps, DETAIL_NORMAL_FOLDER/NNNNNN.png normal maps.
DETAIL_FOLDER = "detail"
DETAIL_NORMAL_FOLDER = "detail_normals"
PNG_FILE = re.compile(r"\.?\d{6,}\.png(\.tmp)?")
#: The per-frame folders of a take: name -> the files in it that are the take's.
FRAME_FOLDERS = {MESH_FOLDER: MESH_FILE, POINTCLOUD_FOLDER: re.compile(r"\.?\d{6,}\.ply(\.tmp)?"),
                 DETAIL_FOLDER: PNG_FILE, DETAIL_NORMAL_FOLDER: PNG_FILE}

#: What a user should read for the errors an output place gives (else the system's wording).
_REASONS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENAMETOOLONG: "name too long for the file system",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EEXIST: "a file is in the way",
}


class OutputError(Exception):
    """The output place cannot be used, or a write failed midway: one line for the user."""


def reason(exc: OSError) -> str:
    """A short, lower-case account of why a file operation failed."""
    return _REASONS.get(exc.errno, (exc.strerror or type(exc).__name__).lower())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


class TakeLock:
    """The take folder `path`, created if needed and locked for this process.

    Raises OutputError with one line when `path` is a file, cannot be created
    or written (read-only, no permission, a name too long, a full disk), or is
    being written by another capture. Use as a context manager, or call
    `release` (removes the lock file, and the folders it created if nothing was
    written into them: a take that never started leaves nothing behind;
    harmless twice).
    """

    def __init__(self, path):
        self.path = Path(path)
        self.lock_path = self.path / LOCK_NAME
        self.taken_over_pid: int | None = None  # a dead capture whose lock this took over
        self._fd: int | None = None
        self._created: list[Path] = []  # folders this made, deepest first
        try:
            if self.path.exists() and not self.path.is_dir():
                raise OutputError(f"--out {self.path} is a file, not a folder: give a folder for the take")
            missing = self.path
            while not missing.exists() and missing != missing.parent:
                self._created.append(missing)
                missing = missing.parent
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create the take folder {self.path}: {reason(exc)}") from None
        try:
            self._acquire()
        except BaseException as exc:
            self._remove_created()
            if isinstance(exc, OSError):
                raise OutputError(f"cannot write in the take folder {self.path}: {reason(exc)}") from None
            raise

    def _acquire(self) -> None:
        while True:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                owner = self._lock(fd)
                if owner is not None:
                    raise OutputError(f"{self.path} is in use by another capture (process {owner}): "
                                      "wait for it to end or choose another --out")
                # the file may have been removed (released) between open and lock: lock the one in place
                if os.fstat(fd).st_ino != os.stat(self.lock_path).st_ino:
                    os.close(fd)
                    continue
                previous = _read_pid(fd)
                if previous is not None and previous != os.getpid():
                    self.taken_over_pid = previous
                os.ftruncate(fd, 0)
                data = f"{os.getpid()}\n".encode("ascii")
                if os.pwrite(fd, data, 0) != len(data):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            except FileNotFoundError:  # removed by its owner between our open and stat: try again
                os.close(fd)
                continue
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            return

    def _lock(self, fd: int) -> int | str | None:
        """Locks fd; returns None when locked, else who holds it (a pid, or 'unknown')."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return None
        except BlockingIOError:
            return _read_pid(fd) or "unknown"
        except OSError as exc:  # no flock here (some network file systems): the pid decides
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            pid = _read_pid(fd)
            return pid if pid is not None and pid != os.getpid() and _pid_alive(pid) else None

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.remove(self.lock_path)  # before unlocking: a waiting capture then re-opens a fresh file
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None
        self._remove_created()

    def _remove_created(self) -> None:
        for folder in self._created:
            try:
                folder.rmdir()
            except OSError:  # not empty (the take's files), or gone: keep the rest
                break
        self._created = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def earlier_take(folder) -> tuple[list[str], int]:
    """The files of an earlier take in a take folder, relative to it, and how many other entries
    (not capture's, not the lock) it holds. Only capture's own names count: a folder holding
    nothing else, or only other programs' files, holds no take."""
    folder = Path(folder)
    take, others = [], 0
    for entry in _entries(folder):
        if entry.name == LOCK_NAME:
            continue
        if entry.name in FRAME_FOLDERS and entry.is_dir(follow_symlinks=False):
            for item in _entries(folder / entry.name):
                if FRAME_FOLDERS[entry.name].fullmatch(item.name) and not item.is_dir(follow_symlinks=False):
                    take.append(f"{entry.name}/{item.name}")
                else:
                    others += 1
        elif entry.name in TAKE_FILES and not entry.is_dir(follow_symlinks=False):
            take.append(entry.name)
        else:
            others += 1
    return sorted(take), others


def _entries(folder: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as it:
            return list(it)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise OutputError(f"cannot read the take folder {folder}: {reason(exc)}") from None


def make_room(folder, overwrite: bool) -> str | None:
    """Refuses a take folder that holds an earlier take (OutputError, one line), or with overwrite
    removes that take's files (TAKE_FILES, the meshes and point clouds; nothing else: other files and folders
    stay) and returns one line saying what went; None when there was no earlier take.

    Writing a new take over an old one would mix the two (the old meshes beside the new track),
    so this runs once the folder is locked, before the first frame."""
    folder = Path(folder)
    take, others = earlier_take(folder)
    if not take:
        return None
    per_frame = {d: sum(name.startswith(d + "/") for name in take) for d in FRAME_FOLDERS}
    what = [name for name in take if "/" not in name]
    for d, n in per_frame.items():
        if n:
            what.append(f"{n} {'mesh' if d == MESH_FOLDER else 'point cloud'} file{'s' if n != 1 else ''} in {d}/")
    what = ", ".join(what)
    if not overwrite:
        raise OutputError(f"{folder} holds an earlier take ({what}): give --overwrite to replace it, "
                          "or choose another --out")
    for name in sorted(take, key=lambda n: "/" not in n):  # per-frame files first, track last
        try:
            os.remove(folder / name)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise OutputError(f"cannot remove the earlier take's {folder / name}: {reason(exc)}") from None
    for d, n in per_frame.items():
        if n:
            try:
                (folder / d).rmdir()
            except OSError:  # other files in it: they stay
                pass
    kept = (f"; {others} other entries left as they were" if others > 1 else
            "; 1 other entry left as it was" if others else "")
    return f"--overwrite: removed the earlier take in {folder} ({what}){kept}"


def check_file_place(path) -> None:
    """Raises OutputError (one line) unless a file can be written at path: its folder exists
    and takes new files, and the name (with a temporary name's few more characters) fits the
    file system. For single-file outputs (a profile, a .glb), checked before the work."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.remove(tmp)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {reason(exc)}") from None


def truncate_lines(path, n_lines: int) -> None:
    """Cuts the text file at path after its first n_lines lines (no-op if it has no more)."""
    seen = 0
    offset = 0
    with open(path, "r+b") as f:
        while seen < n_lines:
            chunk = f.read(1 << 20)
            if not chunk:
                return
            start = 0
            while seen < n_lines:
                at = chunk.find(b"\n", start)
                if at < 0:
                    break
                seen += 1
                start = at + 1
            offset += start if seen == n_lines else len(chunk)
        f.truncate(offset)


#: Errors that mean the device has no room: worth freeing some to save track.npz.
SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def cut_back(track, csv_path, meshes=None, writing_index: int | None = None) -> int:
    """Puts a take that stopped midway back in agreement with itself; returns the frames it keeps.

    After a failed write or an interrupt (possibly inside a frame's writes),
    the take keeps the longest run of frames from the first that every file
    holds: each is in the track (its last write) and, with a face, has its
    mesh file (its CSV row is written first of all). track.npz is saved for
    them; if the device has no room for it, the newest frames are given up
    until it fits: their meshes one at a time (a mesh frees more than a track
    needs), then half of the frames since the track's last checkpoint at a
    time, down to that checkpoint, which is on disk already. On other errors
    the checkpoint is what stays. CSV rows and meshes past the kept frames are
    removed, so every file then tells the same take.

    track: the take's TrackWriter; csv_path: its Live Link CSV (a header line,
    then a row per frame with a face); meshes: its MeshSequenceWriter or None;
    writing_index: the frame whose writes were cut off, if one was.
    """
    arrays = track.arrays()
    index, found = arrays["frame_index"], arrays["face_found"]
    kept = len(index)
    if meshes is not None:
        for i in np.flatnonzero(found):
            if not os.path.exists(meshes.path_of(index[i])):
                kept = int(i)
                break
    # whatever is saved below, nothing past these frames stays
    _drop_after(max(kept, track.saved_frames), index, found, csv_path, meshes, writing_index)
    while kept != track.saved_frames or not os.path.exists(track.path):
        try:
            track.save(kept)
            break
        except OSError as exc:
            saved = track.saved_frames
            if exc.errno in SPACE_ERRNOS:  # make room by giving up the newest frames, then try again
                with_mesh = np.flatnonzero(found[:kept]) if meshes is not None else np.zeros(0, int)
                if kept < saved and len(with_mesh):  # the checkpoint holds more frames than the meshes
                    kept = int(with_mesh[-1])
                    _remove(meshes.path_of(index[kept]))
                    continue
                if kept > saved:  # the newest mesh frees most; without one, half the CSV rows since
                    later = with_mesh[with_mesh >= saved]
                    kept = int(later[-1]) if len(later) else saved + (kept - saved) // 2
                    _drop_after(kept, index, found, csv_path, meshes, writing_index)
                    continue
            kept = saved  # the checkpoint on disk is what stays
            break
    _drop_after(kept, index, found, csv_path, meshes, writing_index)
    return kept


def _drop_after(n: int, index, found, csv_path, meshes, writing_index) -> None:
    """Removes the CSV rows and meshes of the frames from the n-th on."""
    truncate_lines(csv_path, 1 + int(found[:n].sum()))
    if meshes is not None:
        later = [int(i) for i in index[n:][found[n:]]]
        if writing_index is not None and not np.any(index[:n] == writing_index):
            later.append(writing_index)
        for i in later:
            _remove(meshes.path_of(i))


def _remove(path) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
