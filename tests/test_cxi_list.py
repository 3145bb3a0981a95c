"""``<prefix>.lst``: the file list ``indexamajig -i`` reads while data arrive (issue 11 part 5).

It must list exactly the closed chunks (never an ``.inprogress`` file), be replaced atomically (a
reader never sees half a list), keep its order across updates and restarts, and heal itself from a
rescan of the directory.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest

from peaknet_pva import cxi as cxi_mod
from peaknet_pva.cxi import CxiWriter, update_file_list
from peaknet_pva.frames import PeakTable

P, H, W = 2, 8, 16


def _add(writer: CxiWriter, n: int, start_id: int = 0) -> None:
    rng = np.random.default_rng(start_id)
    for i in range(n):
        k = 3
        peaks = PeakTable(panel=rng.integers(0, P, k), y=rng.uniform(0, H - 1, k), x=rng.uniform(0, W - 1, k),
                          intensity=rng.uniform(1, 100, k), npix=rng.integers(1, 9, k))
        writer.add(rng.random((P, H, W), dtype=np.float32), peaks, photon_energy_ev=9000.0,
                   unique_id=start_id + i, timestamp_ns=10**18 + start_id + i)


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_list_holds_exactly_the_closed_chunks(tmp_path: Path) -> None:
    w = CxiWriter(tmp_path, frames_per_file=2)
    lst = tmp_path / "peaknet.lst"
    _add(w, 5)  # 2 chunks closed, 1 frame buffered in the third (not on disk yet)
    assert _lines(lst) == [str(p.absolute()) for p in w.files]
    assert len(w.files) == 2
    w.close()
    assert _lines(lst) == [str(p.absolute()) for p in w.files]
    assert [Path(line).name for line in _lines(lst)] == [f"peaknet-c1-{i:05d}.cxi" for i in range(3)]
    assert all(Path(line).is_absolute() and Path(line).is_file() for line in _lines(lst))
    assert lst.read_text().endswith("\n")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_no_list_without_closed_chunk_and_opt_out(tmp_path: Path) -> None:
    w = CxiWriter(tmp_path / "a", frames_per_file=10)
    _add(w, 3)
    assert not (tmp_path / "a" / "peaknet.lst").exists()  # nothing closed yet
    w.close()
    assert len(_lines(tmp_path / "a" / "peaknet.lst")) == 1
    with CxiWriter(tmp_path / "b", frames_per_file=1, file_list=False) as w2:
        _add(w2, 2)
    assert not (tmp_path / "b" / "peaknet.lst").exists()


def test_restart_appends_and_rescans(tmp_path: Path) -> None:
    with CxiWriter(tmp_path, frames_per_file=2) as w1:
        _add(w1, 4)
    first = _lines(tmp_path / "peaknet.lst")
    assert len(first) == 2
    # a crash left an unfinished chunk; a restart must neither list it nor reuse its number
    stale = tmp_path / "peaknet-c1-00002.cxi.inprogress"
    stale.write_bytes(b"half")
    with CxiWriter(tmp_path, frames_per_file=2) as w2:
        _add(w2, 2, start_id=100)
    after = _lines(tmp_path / "peaknet.lst")
    assert after[:2] == first  # old lines keep their place, new ones are appended
    assert [Path(line).name for line in after[2:]] == ["peaknet-c1-00003.cxi"]
    # the list was lost (or never written: a crash right after a rename): the next writer rebuilds it
    (tmp_path / "peaknet.lst").unlink()
    w3 = CxiWriter(tmp_path, frames_per_file=2)
    assert sorted(_lines(tmp_path / "peaknet.lst")) == sorted(after)
    w3.close()


def test_list_merges_consumers_and_drops_removed_files(tmp_path: Path) -> None:
    with CxiWriter(tmp_path, consumer_id=1, frames_per_file=1) as w1, \
            CxiWriter(tmp_path, consumer_id=2, frames_per_file=1) as w2:
        _add(w1, 2)
        _add(w2, 1, start_id=50)
        _add(w1, 1, start_id=60)
    names = [Path(line).name for line in _lines(tmp_path / "peaknet.lst")]
    assert sorted(names) == ["peaknet-c1-00000.cxi", "peaknet-c1-00001.cxi", "peaknet-c1-00002.cxi",
                             "peaknet-c2-00000.cxi"]
    assert names[-1] == "peaknet-c1-00002.cxi"  # closing order
    # another prefix is not ours
    with CxiWriter(tmp_path, file_prefix="other", frames_per_file=1) as w3:
        _add(w3, 1)
    assert len(_lines(tmp_path / "peaknet.lst")) == 4
    assert len(_lines(tmp_path / "other.lst")) == 1
    (tmp_path / "peaknet-c1-00000.cxi").unlink()
    update_file_list(tmp_path, "peaknet")
    assert "peaknet-c1-00000.cxi" not in (tmp_path / "peaknet.lst").read_text()
    assert len(_lines(tmp_path / "peaknet.lst")) == 3


def test_failed_list_write_keeps_the_old_list_and_the_chunk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    w = CxiWriter(tmp_path, frames_per_file=1)
    _add(w, 1)
    lst = tmp_path / "peaknet.lst"
    good = lst.read_text()
    real_fsync = os.fsync

    def full_disk(fd: int) -> None:  # the temporary list is written, then the disk is full
        if os.fstat(fd).st_size and os.path.exists(tmp_path / f".peaknet.lst.{os.getpid()}.tmp"):
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(cxi_mod.os, "fsync", full_disk)
    with pytest.raises(OSError):
        update_file_list(tmp_path, "peaknet")
    assert lst.read_text() == good  # untouched
    _add(w, 1, start_id=1)  # a chunk still closes; the list failure is logged, not raised
    assert lst.read_text() == good
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()
    _add(w, 1, start_id=2)
    assert [Path(line).name for line in _lines(lst)] == [f"peaknet-c1-{i:05d}.cxi" for i in range(3)]
    w.close()


def test_reader_never_sees_a_partial_list(tmp_path: Path) -> None:
    """A reader polling the list while 60 chunks close sees, every time, a whole list: newline
    terminated, each line a closed file, each list a prefix-extension of the one before."""
    seen: list[str] = []
    stop = threading.Event()
    lst = tmp_path / "peaknet.lst"

    def read() -> None:
        while not stop.is_set():
            try:
                seen.append(lst.read_text())
            except FileNotFoundError:
                pass

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        with CxiWriter(tmp_path, frames_per_file=1) as w:
            _add(w, 60)
    finally:
        stop.set()
        reader.join(10)
    assert len(seen) > 10
    previous: list[str] = []
    for text in seen:
        assert text.endswith("\n")
        lines = text.splitlines()
        assert all(Path(line).name.endswith(".cxi") and Path(line).is_file() for line in lines)
        assert lines[: len(previous)] == previous  # append-only
        previous = lines
    assert len(_lines(lst)) == 60
