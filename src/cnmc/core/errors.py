"""User-facing errors: the CLI prints these as one line, without a traceback."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from pydantic import BaseModel

Model = TypeVar("Model", bound="BaseModel")


class CnmcError(Exception):
    """A problem the user can fix (bad input, bad configuration, missing file).

    The message must name the file or setting and the problem in one line.
    """


def validated(model: type[Model], raw: Any, source: str, not_a_mapping: str) -> Model:
    """``raw`` validated into ``model``; a non-mapping or the first pydantic error is one
    :class:`CnmcError` line naming ``source`` and the offending key."""
    from pydantic import ValidationError

    if not isinstance(raw, dict):
        raise CnmcError(f"{source}: {not_a_mapping}")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        raise CnmcError(f"{source}: {key}: {first['msg']}") from exc
