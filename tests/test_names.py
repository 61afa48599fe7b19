"""names.py: what may be a VM name."""

from __future__ import annotations

import pytest

from qemu_unit.config.names import MAX_LENGTH, check_name, split_template
from qemu_unit.errors import ConfigError


@pytest.mark.parametrize(
    "name", ["web", "web-1", "db_2", "a.b", "tmpl@blue", "host:8080", "A", "x" * MAX_LENGTH]
)
def test_valid_names_are_returned(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("", "empty"),
        ("a/b", "'/'"),
        ("/", "'/'"),
        ("a..b", "'..'"),
        ("..", "'..'"),
        (".hidden", "starts with '.'"),
        ("-rf", "starts with '-'"),
        ("@inst", "starts with '@'"),
        ("a\nb", "control character"),
        ("a\x7fb", "control character"),
        ("a b", "whitespace"),
        ("a\u00a0b", "whitespace"),
        ("web$", "'$'"),
        ("100%", "'%'"),
        ("caf\u00e9", "'\u00e9'"),
        ("a\\b", "'\\\\'"),
        ("x" * (MAX_LENGTH + 1), f"the limit is {MAX_LENGTH}"),
        ("web.vm", "suffix"),
        ("web.vm.d", "suffix"),
        ("web.xml", "suffix"),
    ],
)
def test_unsafe_names_are_refused_with_the_problem(name: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_name(name)
    assert problem in str(info.value)


def test_limit_keeps_the_monitor_socket_path_short() -> None:
    # Measured: libvirt's embed driver refused to start a domain whose root was
    # /run/qemu-run/NAME with a 42-character NAME (monitor.sock path too long).
    root = "/run/qemu-run/" + "x" * MAX_LENGTH
    monitor = root + "/lib/qemu/domain-99-" + "x" * 20 + "/monitor.sock"
    assert len(monitor) < 108


def test_split_template() -> None:
    assert split_template("web") is None
    assert split_template("tmpl@blue") == ("tmpl", "blue")
    assert split_template("tmpl@a@b") == ("tmpl", "a@b")
    assert split_template("tmpl@") == ("tmpl", "")
