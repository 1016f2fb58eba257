"""Where runs live and what they came from: the project's tracking store
(``sqlite:///<root>/mlflow.db``), one experiment per split protocol, the commit and the data hash.
Promotion needs these and nothing of how runs are started (:mod:`cnmc.tracking.runs`).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import yaml

DB_NAME = "mlflow.db"


def project_root() -> Path:
    """The project folder: DVC's ``DVC_ROOT`` inside a stage, else the working directory."""
    return Path(os.environ.get("DVC_ROOT", ".")).resolve()


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the project's SQLite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / DB_NAME}"


def shown_uri(uri: str) -> str:
    """A store's URI as we print or write it: any password replaced by ``***``."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


_PASSWORD_IN_URI = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]+:)[^@\s/]+@")


def without_passwords(text: str) -> str:
    """``text`` with the password of every URI in it replaced by ``***`` (messages we print)."""
    return _PASSWORD_IN_URI.sub(r"\1***@", text)


def experiment_name(protocol: str) -> str:
    return f"cnmc-{protocol}"


def tuning_experiment_name(protocol: str) -> str:
    """Tuning's parent and trial runs live apart from the training runs that promotion ranks."""
    return f"cnmc-{protocol}-tuning"


def git_commit(root: Path | None = None) -> str:
    """The checked-out commit (with ``-dirty`` if the tree has changes), or ``unknown``."""
    cwd = root or project_root()
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def data_hash(root: Path | None = None) -> str:
    """The md5 that ``data.dvc`` records for ``data/``, or ``untracked`` without one."""
    path = (root or project_root()) / "data.dvc"
    try:
        outs = yaml.safe_load(path.read_text())["outs"]
        return str(outs[0]["md5"]).removesuffix(".dir")
    except (OSError, KeyError, IndexError, TypeError, yaml.YAMLError):
        return "untracked"
