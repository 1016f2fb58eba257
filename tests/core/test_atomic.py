"""Every output file goes through one writer: a bad output path is one line naming it, a link is
written through, and a failed write leaves the old file and no temporary file behind; a tracking
database locked by another process is one line too."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from cnmc.cli import main
from cnmc.core.atomic import atomic_write_text
from cnmc.core.errors import CnmcError

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_a_folder_is_no_file_name(tmp_path: Path) -> None:
    (tmp_path / "out.csv").mkdir()
    with pytest.raises(CnmcError, match=r"out.csv: is a folder; give a file name$"):
        atomic_write_text(tmp_path / "out.csv", "x")


def test_a_path_under_a_regular_file(tmp_path: Path) -> None:
    (tmp_path / "report").write_text("a file")
    with pytest.raises(CnmcError, match=r"report/deeper/out.csv: .*report is a file, not a folder$"):
        atomic_write_text(tmp_path / "report" / "deeper" / "out.csv", "x")
    assert (tmp_path / "report").read_text() == "a file"


def test_a_link_is_written_through_and_stays_a_link(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "out.csv").write_text("old")
    (tmp_path / "link.csv").symlink_to(tmp_path / "real" / "out.csv")
    atomic_write_text(tmp_path / "link.csv", "new")
    assert (tmp_path / "link.csv").is_symlink() and (tmp_path / "real" / "out.csv").read_text() == "new"
    assert not leftovers(tmp_path) and not leftovers(tmp_path / "real")


def test_a_full_disk_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """ENOSPC arrives at the rename here (the write path is what matters: one line, nothing left)."""
    (tmp_path / "out.csv").write_text("old")

    def full(*args: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(CnmcError, match=r"out.csv: cannot write \(No space left on device\)$"):
        atomic_write_text(tmp_path / "out.csv", "new")
    assert (tmp_path / "out.csv").read_text() == "old" and not leftovers(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder anyway")
def test_a_folder_without_write_permission(tmp_path: Path) -> None:
    (tmp_path / "locked").mkdir(mode=0o555)
    with pytest.raises(CnmcError, match=r"locked/out.csv: cannot write \(Permission denied\)$"):
        atomic_write_text(tmp_path / "locked" / "out.csv", "x")


def test_the_cli_says_so_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "params.yaml").mkdir()
    assert main(["profile", "demo", "-o", str(tmp_path / "params.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("params.yaml: is a folder; give a file name") and "\n" not in err


@pytest.mark.slow  # MLflow retries a locked store for seconds before it gives up
@pytest.mark.timeout(300)
def test_a_locked_tracking_database_is_one_line(tmp_path: Path) -> None:
    """Another process holds the SQLite store in a long write while `cnmc promote` runs."""
    import sqlite3
    import subprocess
    import sys

    store = tmp_path / "mlflow.db"
    holder = sqlite3.connect(store, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "cnmc", "promote", "--params", str(PARAMS), "--out-dir", str(tmp_path / "registry")],
            cwd=tmp_path,
            env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}"},
            capture_output=True,
            text=True,
            timeout=240,
        )
    finally:
        holder.close()
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr[-2000:]
    assert err[0].startswith("cnmc promote: error: database is locked: another process holds it")
    assert str(store) in err[0] and not (tmp_path / "registry").exists()
