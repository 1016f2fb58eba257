"""File names as they can be shown: in a CSV cell, a JSON string or a one-line error.

A POSIX file name is bytes: it may not be UTF-8 (Python keeps such bytes as surrogates, which no
UTF-8 writer takes) and may hold a newline or another control character (which splits a CSV row
or an error line). :func:`shown` escapes both, as Python's ``repr`` would, and leaves every other
name as it is; :func:`name_problem` says why a name cannot travel through the pipeline's CSVs.
"""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path


def shown(path: Path | str) -> str:
    """``path`` as printable UTF-8 text: undecodable bytes as ``\\xNN``, control characters escaped."""
    text = os.fspath(path)
    return "".join(_escape(char) for char in text)


def name_problem(path: Path | str) -> str | None:
    """Why ``path`` cannot be written to a CSV and read back as the same file, or None."""
    text = os.fspath(path)
    if any(0xDC80 <= ord(char) <= 0xDCFF for char in text):
        return "the file name is not UTF-8 text"
    if any(_is_control(char) for char in text):
        return "the file name holds a control character (a newline, a tab, ...)"
    return None


def _escape(char: str) -> str:
    if 0xDC80 <= ord(char) <= 0xDCFF:  # os.fsdecode's surrogateescape of an undecodable byte
        return f"\\x{ord(char) - 0xDC00:02x}"
    if _is_control(char):
        return repr(char)[1:-1]
    return char


def _is_control(char: str) -> bool:
    return unicodedata.category(char) == "Cc"
