"""qemu_unit/records.py: a record is made like typing.NamedTuple's, without typing."""

from __future__ import annotations

import typing
from typing import Any

import pytest

from qemu_unit import records


def _made_by(base: Any) -> Any:
    """The same class body, made by BASE (records.NamedTuple or typing.NamedTuple)."""

    class Port(base):  # type: ignore[misc]
        """A port."""

        host: str
        port: int = 0
        tags: tuple[str, ...] = ()

        def label(self) -> str:
            return f"{self.host}:{self.port}"

        @property
        def local(self) -> bool:
            return self.host == "127.0.0.1"

    return Port


def test_a_record_has_what_typing_would_give_it() -> None:
    ours, theirs = _made_by(records.NamedTuple), _made_by(typing.NamedTuple)
    for attribute in ("_fields", "_field_defaults", "__doc__", "__module__"):
        assert getattr(ours, attribute) == getattr(theirs, attribute), attribute
    assert ours.__qualname__ == theirs.__qualname__
    assert list(ours.__annotations__) == list(theirs.__annotations__)
    a, b = ours("127.0.0.1", 22), theirs("127.0.0.1", 22)
    assert a == b and a == ("127.0.0.1", 22, ()) and hash(a) == hash(b)
    assert (a.label(), a.local, a.tags) == (b.label(), b.local, b.tags)
    assert a._replace(port=80).port == 80 and a._asdict() == b._asdict()
    assert repr(a) == repr(b)
    with pytest.raises(AttributeError):
        a.port = 1
    assert issubclass(ours, tuple) and not issubclass(ours, records.NamedTuple)


def test_a_field_without_a_default_after_one_with_is_refused() -> None:
    with pytest.raises(TypeError, match="Bad"):
        class Bad(records.NamedTuple):
            port: int = 0
            host: str  # type: ignore[misc]

