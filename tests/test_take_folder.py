"""capture.take_folder: the output place checked and locked, and a take cut back to agree
after a failed write (a full disk, made by tests/fault_injection.py)."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from capture.sinks import MeshSequenceWriter, TrackWriter, load_track, read_livelink_csv, read_ply
from capture.take_folder import LOCK_NAME, OutputError, TakeLock, cut_back, earlier_take, make_room, truncate_lines
from fault_injection import FullDisk, read_only_folder

TRIANGLES = np.array([[0, 1, 2], [0, 2, 3]])
MESH_VERTICES = 2000  # 24 kB a mesh: more than the track of a few frames needs


def test_lock_holds_the_pid_and_is_removed_on_release(tmp_path):
    out = tmp_path / "a" / "take"
    with TakeLock(out) as lock:
        assert out.is_dir()
        assert (out / LOCK_NAME).read_text().strip() == str(os.getpid())
        assert lock.taken_over_pid is None
    assert not (tmp_path / "a").exists()  # nothing was written: the folders it made are gone too
    lock.release()  # twice is harmless
    with TakeLock(out):
        (out / "track.npz").write_bytes(b"")
    assert os.listdir(out) == ["track.npz"]  # a take's folder stays, without the lock


def _holder(out) -> subprocess.Popen:
    """Another process holding the take folder's lock until its stdin closes."""
    code = ("import sys; from capture.take_folder import TakeLock\n"
            f"lock = TakeLock({str(out)!r}); print('locked', flush=True); sys.stdin.read(); lock.release()")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_writer_is_refused_naming_the_first(tmp_path):
    out = tmp_path / "take"
    holder = _holder(out)
    try:
        with pytest.raises(OutputError, match=f"in use by another capture \\(process {holder.pid}\\)"):
            TakeLock(out)
    finally:
        holder.communicate("")
    with TakeLock(out):  # free again once the first has finished
        pass


def test_lock_of_a_dead_process_is_taken_over(tmp_path):
    out = tmp_path / "take"
    holder = _holder(out)
    holder.kill()  # dies holding it: the lock file stays, with its pid
    holder.wait()
    assert (out / LOCK_NAME).read_text().strip() == str(holder.pid)
    with TakeLock(out) as lock:
        assert lock.taken_over_pid == holder.pid
        assert (out / LOCK_NAME).read_text().strip() == str(os.getpid())
    assert not (out / LOCK_NAME).exists()


def test_file_in_the_way_and_too_long_names_are_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        TakeLock(tmp_path / "file")
    with pytest.raises(OutputError, match="a part of the path is a file"):
        TakeLock(tmp_path / "file" / "take")
    with pytest.raises(OutputError, match="name too long for the file system"):
        TakeLock(tmp_path / ("x" * 300))


def test_read_only_place_is_one_line(tmp_path):
    undo = read_only_folder(tmp_path / "ro")
    if undo is None:
        pytest.skip("cannot make a read-only folder here")
    try:
        with pytest.raises(OutputError, match="cannot create the take folder .*ro/take: permission denied"):
            TakeLock(tmp_path / "ro" / "take")
        with pytest.raises(OutputError, match="cannot write in the take folder .*ro: permission denied"):
            TakeLock(tmp_path / "ro")
    finally:
        undo()


def test_full_disk_before_the_first_frame_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "filler").write_bytes(b"x" * 100)
    FullDisk(tmp_path, 100).install(monkeypatch)
    with pytest.raises(OutputError, match="no space left on the device"):
        TakeLock(tmp_path / "take")


# ----------------------------------------------------------------------------- an earlier take


def _earlier_take(folder):
    """What a finished take, interrupted mesh and track writes and an export leave: capture's files."""
    (folder / "meshes").mkdir(parents=True, exist_ok=True)
    for name in ("000000.obj", "000001.obj", "000002.ply", ".000003.obj.tmp"):
        (folder / "meshes" / name).write_text("v 0 0 0\n")
    for name in ("blendshapes.csv", "track.npz", ".track.npz.tmp", "take.glb"):
        (folder / name).write_bytes(b"x")


def test_only_capture_files_make_an_earlier_take(tmp_path):
    assert earlier_take(tmp_path / "missing") == ([], 0)
    assert earlier_take(tmp_path) == ([], 0)  # empty
    (tmp_path / LOCK_NAME).write_text("12345\n")  # a stale lock is no take
    (tmp_path / "notes.txt").write_text("scene 4")
    (tmp_path / "meshes").mkdir()  # an empty meshes folder is none either
    assert earlier_take(tmp_path) == ([], 1)
    assert make_room(tmp_path, overwrite=False) is None
    (tmp_path / "meshes" / "rig.blend").write_text("")
    (tmp_path / "take.csv").write_text("")
    assert earlier_take(tmp_path) == ([], 3)
    _earlier_take(tmp_path)
    take, others = earlier_take(tmp_path)
    assert take == [".track.npz.tmp", "blendshapes.csv", "meshes/.000003.obj.tmp", "meshes/000000.obj",
                    "meshes/000001.obj", "meshes/000002.ply", "take.glb", "track.npz"]
    assert others == 3


def test_earlier_take_is_refused_naming_what_it_holds(tmp_path):
    _earlier_take(tmp_path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(OutputError) as refused:
        make_room(tmp_path, overwrite=False)
    assert str(refused.value) == (f"{tmp_path} holds an earlier take (.track.npz.tmp, blendshapes.csv, take.glb, "
                                  "track.npz, 4 mesh files in meshes/): give --overwrite to replace it, "
                                  "or choose another --out")
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing touched


def test_overwrite_removes_only_the_earlier_take(tmp_path):
    _earlier_take(tmp_path)
    (tmp_path / "notes.txt").write_text("scene 4")
    (tmp_path / "reference").mkdir()
    (tmp_path / "reference" / "track.npz").write_bytes(b"someone else's")
    line = make_room(tmp_path, overwrite=True)
    assert line == (f"--overwrite: removed the earlier take in {tmp_path} (.track.npz.tmp, blendshapes.csv, "
                    "take.glb, track.npz, 4 mesh files in meshes/); 2 other entries left as they were")
    assert sorted(os.listdir(tmp_path)) == ["notes.txt", "reference"]  # meshes/ went with its meshes
    assert (tmp_path / "notes.txt").read_text() == "scene 4"
    assert (tmp_path / "reference" / "track.npz").read_bytes() == b"someone else's"
    assert earlier_take(tmp_path) == ([], 2) and make_room(tmp_path, overwrite=False) is None

    _earlier_take(tmp_path)
    (tmp_path / "meshes" / "rig.blend").write_text("")  # a file of the user's among the meshes
    make_room(tmp_path, overwrite=True)
    assert os.listdir(tmp_path / "meshes") == ["rig.blend"]


def test_an_earlier_take_that_cannot_be_removed_is_one_line(tmp_path):
    _earlier_take(tmp_path)
    meshes = tmp_path / "meshes"
    if os.geteuid() != 0:
        meshes.chmod(0o555)
        undo = lambda: meshes.chmod(0o755)  # noqa: E731
    elif subprocess.run(["chattr", "+i", str(meshes)], capture_output=True).returncode == 0:
        undo = lambda: subprocess.run(["chattr", "-i", str(meshes)], check=True)  # noqa: E731
    else:
        pytest.skip("cannot make a folder read-only here")
    try:
        with pytest.raises(OutputError, match=r"cannot remove the earlier take's .*meshes/\.000003\.obj\.tmp: "
                                              "(permission denied|operation not permitted)"):
            make_room(tmp_path, overwrite=True)
    finally:
        undo()


def test_truncate_lines(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes(b"h\n1\n22\n333\n4444")
    truncate_lines(path, 5)
    assert path.read_bytes() == b"h\n1\n22\n333\n4444"  # fewer lines than asked: unchanged
    truncate_lines(path, 3)
    assert path.read_bytes() == b"h\n1\n22\n"
    truncate_lines(path, 0)
    assert path.read_bytes() == b""


# ----------------------------------------------------------------------------- cutting back


def _take(folder, frames: int, found_every: int = 1, checkpoint_every_s: float = 3600.0):
    """A small take written as TakeWriter does (CSV row, mesh, then track), by hand."""
    from capture.sinks import LiveLinkCsvWriter

    csv = LiveLinkCsvWriter(folder / "blendshapes.csv", 30.0)
    meshes = MeshSequenceWriter(folder / "meshes", TRIANGLES, "ply")
    track = TrackWriter(folder / "track.npz", np.eye(3), (64, 64), checkpoint_every_s=checkpoint_every_s)
    for i in range(frames):
        found = i % found_every == 0
        if found:
            csv.write(i / 30.0, np.full(52, i / 100.0), np.zeros(3), np.zeros(3), np.zeros(3))
            meshes.write(i, np.full((MESH_VERTICES, 3), float(i), np.float32))
        track.add(i, i / 30.0, found, blendshapes=np.full(52, i / 100.0), rotation=np.eye(3),
                  translation=np.zeros(3))
    csv.close()
    return track, meshes


def _assert_agree(folder, kept: int, meshes: bool = True):
    track = load_track(folder / "track.npz")
    assert len(track["frame_index"]) == kept
    faces = track["frame_index"][track["face_found"]]
    _, shapes, _ = read_livelink_csv(folder / "blendshapes.csv")
    np.testing.assert_allclose(shapes[:, 0], faces / 100.0, atol=1e-6)
    if not meshes:
        return
    assert sorted(os.listdir(folder / "meshes")) == [f"{i:06d}.ply" for i in faces]
    for i in faces:
        np.testing.assert_array_equal(read_ply(folder / "meshes" / f"{i:06d}.ply")[0], float(i))


def test_cut_back_to_the_first_missing_mesh(tmp_path):
    track, meshes = _take(tmp_path, 10, found_every=2)
    os.remove(meshes.path_of(6))  # its write failed on the mesh thread
    meshes.write(10, np.zeros((MESH_VERTICES, 3), np.float32))  # the frame being written when it stopped
    kept = cut_back(track, tmp_path / "blendshapes.csv", meshes, writing_index=10)
    assert kept == 6
    _assert_agree(tmp_path, 6)


def test_cut_back_after_an_interrupt_inside_a_frame(tmp_path):
    track, meshes = _take(tmp_path, 5)
    with open(tmp_path / "blendshapes.csv", "a") as f:  # frame 5's row went out, its track entry not
        f.write("00:00:00:05.000,61," + ",".join(["0.5"] * 61) + "\n")
    kept = cut_back(track, tmp_path / "blendshapes.csv", meshes, writing_index=5)
    assert kept == 5
    _assert_agree(tmp_path, 5)


def test_cut_back_on_a_full_disk_gives_up_the_newest_meshes_for_the_track(tmp_path, monkeypatch):
    track, meshes = _take(tmp_path, 12)
    assert track.saved_frames == 1  # the first add's checkpoint
    # no room for the new track (~20 kB) until a mesh (24 kB) goes
    disk = FullDisk(tmp_path, FullDisk(tmp_path, 0).used() + 250).install(monkeypatch)
    kept = cut_back(track, tmp_path / "blendshapes.csv", meshes)
    assert disk.failures >= 1 and 1 < kept < 12
    monkeypatch.undo()
    _assert_agree(tmp_path, kept)


def test_cut_back_without_meshes_gives_up_csv_rows_for_the_track(tmp_path, monkeypatch):
    track, _ = _take(tmp_path, 40)
    for name in os.listdir(tmp_path / "meshes"):
        os.remove(tmp_path / "meshes" / name)
    os.rmdir(tmp_path / "meshes")
    assert track.saved_frames == 1
    disk = FullDisk(tmp_path, FullDisk(tmp_path, 0).used()).install(monkeypatch)  # full: only cuts free room
    kept = cut_back(track, tmp_path / "blendshapes.csv", None)
    assert disk.failures >= 1 and 1 < kept < 40
    monkeypatch.undo()
    _assert_agree(tmp_path, kept, meshes=False)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temp file left


def test_cut_back_keeps_the_checkpoint_on_other_errors(tmp_path, monkeypatch):
    import errno

    track, meshes = _take(tmp_path, 12)

    def broken(frames=None):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(track, "save", broken)
    kept = cut_back(track, tmp_path / "blendshapes.csv", meshes)
    assert kept == track.saved_frames == 1
    _assert_agree(tmp_path, 1)
