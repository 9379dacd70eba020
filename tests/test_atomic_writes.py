"""Atomic writes: the umask's file mode, and the temporary files of a killed write removed by the next write."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from medjdt.data import atomic
from medjdt.data.atomic import atomic_write_text


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_finished_files_get_the_mode_the_umask_gives(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = atomic_write_text(tmp_path / "a.txt", "x")
        plain = tmp_path / "plain.txt"
        plain.write_text("x")  # what any other tool's output gets
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode == plain.stat().st_mode & 0o777


def test_the_temporary_file_of_a_killed_write_is_removed_by_the_next_write(tmp_path):
    # A process that dies in the middle of a write (here: it exits before the rename) leaves its temp file.
    script = (
        "import os, sys\n"
        "from medjdt.data.atomic import atomic_write\n"
        "def write(tmp):\n    tmp.write_text('half'); os._exit(9)\n"
        f"atomic_write({str(tmp_path / 'result.nii.gz')!r}, write, suffix='.nii.gz')\n"
    )
    assert subprocess.run([sys.executable, "-c", script]).returncode == 9
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".result.nii.gz.") and not (tmp_path / "result.nii.gz").exists()
    atomic._cleaned.discard(os.path.abspath(tmp_path))  # a new process would not have cleaned this folder yet
    atomic_write_text(tmp_path / "other.txt", "y")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.txt"]


def test_a_live_writers_temporary_file_is_left_alone(tmp_path):
    mine = tmp_path / f".x.{atomic._host()}.{os.getpid()}-abc.tmp"
    mine.write_text("in progress")
    atomic.clean_stale_temporaries(tmp_path)
    assert mine.exists()
