"""qemu_unit/records.py: a record is made like typing.NamedTuple's, without typing."""

from __future__ import annotations

import typing

import pytest

from qemu_unit import records


def _pair() -> tuple[type, type]:
    """The same class body made by records.NamedTuple and by typing.NamedTuple."""

    class Ours(records.NamedTuple):
        """A port."""

        host: str
        port: int = 0
        tags: tuple[str, ...] = ()

        def label(self) -> str:
            return f"{self.host}:{self.port}"

        @property
        def local(self) -> bool:
            return self.host == "127.0.0.1"

    class Theirs(typing.NamedTuple):
        """A port."""

        host: str
        port: int = 0
        tags: tuple[str, ...] = ()

        def label(self) -> str:
            return f"{self.host}:{self.port}"

        @property
        def local(self) -> bool:
            return self.host == "127.0.0.1"

    return Ours, Theirs


def test_a_record_has_what_typing_would_give_it() -> None:
    ours, theirs = _pair()
    for attribute in ("_fields", "_field_defaults", "__doc__", "__module__"):
        assert getattr(ours, attribute) == getattr(theirs, attribute), attribute
    assert ours.__qualname__.replace("Ours", "X") == theirs.__qualname__.replace("Theirs", "X")
    assert list(ours.__annotations__) == list(theirs.__annotations__)
    a, b = ours("127.0.0.1", 22), theirs("127.0.0.1", 22)
    assert a == b and a == ("127.0.0.1", 22, ()) and hash(a) == hash(b)
    assert (a.label(), a.local, a.tags) == (b.label(), b.local, b.tags)
    assert a._replace(port=80).port == 80 and a._asdict() == b._asdict()
    assert repr(a) == repr(b).replace("Theirs", "Ours")
    with pytest.raises(AttributeError):
        a.port = 1  # type: ignore[misc]
    assert issubclass(ours, tuple) and not issubclass(ours, records.NamedTuple)


def test_a_field_without_a_default_after_one_with_is_refused() -> None:
    with pytest.raises(TypeError, match="Bad"):
        class Bad(records.NamedTuple):
            port: int = 0
            host: str  # type: ignore[misc]

