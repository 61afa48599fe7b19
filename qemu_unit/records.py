"""`NamedTuple` for the records: typing's to the type checker, a cheaper maker at run time.

`class Port(NamedTuple): host: str` is checked by mypy as typing.NamedTuple. At run
time the class is made by collections.namedtuple from the annotations' names, without
what typing.NamedTuple adds: it compiles every field's annotation (a string, under
`from __future__ import annotations`) into a ForwardRef nobody reads, ~0.07 ms per
record, and importing typing costs the generator ~2.4 ms at every boot. The classes are
the same: the fields, their defaults, the methods and the docstring of the class body.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NamedTuple as NamedTuple
else:
    from collections import namedtuple

    # What a class body holds that is not for the record: typing.NamedTuple leaves these too.
    _SPECIAL = frozenset({"__module__", "__qualname__", "__annotations__"})

    class _Maker(type):
        def __new__(mcls, name: str, bases: tuple[type, ...], namespace: dict) -> type:
            if not bases:  # NamedTuple itself
                return super().__new__(mcls, name, bases, namespace)
            annotations = namespace.get("__annotations__", {})
            fields = list(annotations)
            defaults = [namespace[f] for f in fields if f in namespace]
            if any(f not in namespace for f in fields[len(fields) - len(defaults):]):
                raise TypeError(f"{name}: a field without a default after one with a default")
            record = namedtuple(name, fields, defaults=defaults, module=namespace["__module__"])
            record.__qualname__ = namespace["__qualname__"]
            record.__annotations__ = annotations
            for key, value in namespace.items():
                if key not in _SPECIAL and key not in annotations:
                    setattr(record, key, value)
            return record

    class NamedTuple(metaclass=_Maker):
        """Base of a record: `class Name(NamedTuple):` and annotated fields."""
