"""The fixture corpus: tests/fixtures/vm/*.vm (and *.xml), each carrying its own assertions.

A fixture is a VM definition found in tests/fixtures/vm as in any search
directory (drop-ins in NAME.vm.d/ apply). Lines of the form `## VERB ARGS...`
anywhere in it (they are comments to the parser; inside `<!-- -->` in an .xml)
say what to expect. Verbs checked here:

  ## instance INST               load a template fixture `base@.vm` as `base@INST`
  ## accel kvm|tcg               render for this accelerator (default tcg)
  ## assert-error WHERE KEY TEXT loading fails; WHERE is LINE, FILE:LINE (a drop-in's
                                 file name) or '-' for no line; KEY is the key or '-';
                                 TEXT must occur in the message
  ## assert-check-error WHERE KEY TEXT   host.check_files() fails (loading succeeds)
  ## assert-check-ok             host.check_files() passes
  ## assert-render-error TEXT    domain.render() fails with TEXT in the message
  ## assert-field FIELD VALUE    str() of VMConfig.FIELD (a tuple: its items joined by
                                 spaces; a property works too; FIELD.ATTR for an attribute
                                 of a field) equals VALUE
  ## assert-xpath PATH VALUE     the first match of ElementTree PATH (relative to
                                 <domain>; a trailing /@ATTR selects an attribute) in
                                 the rendered XML has text/value VALUE
  ## assert-xpath-count PATH N   PATH matches N elements
  ## assert-golden               rendered XML equals NAME.xml.golden
                                 (QEMU_UNIT_REGENERATE=1 rewrites the golden files)

Verbs checked by other test modules are listed in FOREIGN_VERBS with the
module that checks them; any other verb fails the fixture, so a typo in a
verb cannot silently drop an assertion. Other modules can reuse
`fixtures()`, `read_directives()` and `load_fixture()`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import pytest

from qemu_unit import paths
from qemu_unit.config import settings, source, unitfile
from qemu_unit.errors import ConfigError, QemuUnitError
from qemu_unit.vm import domain, host

FIXTURE_DIR = Path(__file__).parent / "fixtures" / "vm"
REGENERATE = os.environ.get("QEMU_UNIT_REGENERATE") == "1"
NVRAM_DIR = Path("/var/lib/qemu-run")


def dirs_of(name: str) -> paths.Dirs:
    """The directories the runner uses for NAME as root or under the unit."""
    return paths.Dirs(state=NVRAM_DIR / name, root=Path("/run/qemu-run") / name,
                     cache=Path("/var/cache/qemu-run"), logs=Path("/var/log/qemu-run") / name)


def plan_of(vm: settings.VMConfig, accel: str = "tcg") -> host.Plan:
    """VM's plan for ACCEL without host.plan()'s file checks: fixtures name files this
    host does not have."""
    return host.plan_vm(vm, dirs_of(vm.name), accel=settings.Accel(accel))

# Verbs other test modules check: verb -> the module that does. Add yours here.
FOREIGN_VERBS: dict[str, str] = {
    "assert-key-is": "tests/test_generator.py",
    "assert-key-contains": "tests/test_generator.py",
    "assert-symlink": "tests/test_generator.py",
    "assert-failed": "tests/test_generator.py",
    "assert-stderr-contains": "tests/test_generator.py",
}

_DIRECTIVE = re.compile(r"^\s*## (\S+)(?:[ \t]+(.*?))?\s*$")


@dataclass(frozen=True)
class Directive:
    verb: str
    args: str  # the rest of the line, stripped
    line: int


def fixture_files() -> list[Path]:
    return sorted(
        p for p in FIXTURE_DIR.iterdir()
        if p.suffix in (".vm", ".xml") and not p.name.endswith(".golden")
    )


def read_directives(path: Path) -> list[Directive]:
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        match = _DIRECTIVE.match(line)
        if match:
            out.append(Directive(match.group(1), match.group(2) or "", number))
    return out


@dataclass(frozen=True)
class Fixture:
    file: Path
    name: str  # the VM name it is loaded as
    directives: tuple[Directive, ...]

    def get(self, verb: str) -> list[Directive]:
        return [d for d in self.directives if d.verb == verb]

    def option(self, verb: str, default: str) -> str:
        found = self.get(verb)
        return found[-1].args if found else default

    @property
    def expects_load_error(self) -> bool:
        return bool(self.get("assert-error"))


def fixtures() -> list[Fixture]:
    out = []
    for path in fixture_files():
        directives = tuple(read_directives(path))
        name = path.stem
        instances = [d.args for d in directives if d.verb == "instance"]
        if instances:
            name += instances[-1]
        out.append(Fixture(path, name, directives))
    return out


def load_fixture(fixture: Fixture) -> settings.VMConfig:
    src = source.find_source(fixture.name, [FIXTURE_DIR])
    assert src.path == fixture.file, f"{fixture.name} was found at {src.path}"
    return settings.load_vm(src)


def render_fixture(fixture: Fixture, vm: settings.VMConfig) -> str:
    accel = fixture.option("accel", "tcg")
    assert accel in ("kvm", "tcg")
    return domain.render(vm, plan_of(vm, accel))


def show(value: Any) -> str:
    """How assert-field spells a value."""
    if type(value) is tuple:  # a record (NamedTuple) has its own str()
        return " ".join(show(v) for v in value)
    if isinstance(value, Enum):
        return str(value.value)
    return str(value)


def _check_where(error: QemuUnitError, where: str, key: str, fixture: Fixture) -> None:
    expected_path, line = fixture.file, where
    if ":" in where:
        file_name, line = where.rsplit(":", 1)
        expected_path = next(FIXTURE_DIR.glob(f"*.vm.d/{file_name}"))
    assert error.path is not None and Path(error.path) == expected_path, str(error)
    assert (error.line is None) if line == "-" else (error.line == int(line)), str(error)
    assert error.key == (None if key == "-" else key), str(error)


def _split3(d: Directive) -> tuple[str, str, str]:
    parts = d.args.split(None, 2)
    assert len(parts) == 3, f"line {d.line}: {d.verb} needs WHERE KEY TEXT"
    return parts[0], parts[1], parts[2]


def _find(root: ET.Element, path: str) -> list[str]:
    """Texts (or attribute values, for a trailing /@ATTR) of PATH's matches."""
    attr = None
    if "/@" in path:
        path, attr = path.rsplit("/@", 1)
    elements = root.findall(path) if path not in ("", ".") else [root]
    if attr is None:
        return [(e.text or "").strip() for e in elements]
    return [e.attrib[attr] for e in elements if attr in e.attrib]


LOCAL_VERBS = {
    "instance", "accel", "assert-error", "assert-check-error", "assert-check-ok",
    "assert-render-error", "assert-field", "assert-xpath", "assert-xpath-count",
    "assert-golden",
}


def test_verbs_are_known() -> None:
    unknown = [
        f"{f.file.name}:{d.line}: {d.verb}"
        for f in fixtures()
        for d in f.directives
        if d.verb not in LOCAL_VERBS and d.verb not in FOREIGN_VERBS
    ]
    assert not unknown, "unknown fixture verbs (register them in FOREIGN_VERBS?)"


def test_corpus_size() -> None:
    assert len(fixtures()) >= 40


def _run(fixture: Fixture) -> None:
    errors = fixture.get("assert-error")
    if errors:
        with pytest.raises(ConfigError) as info:
            load_fixture(fixture)
        for d in errors:
            where, key, text = _split3(d)
            _check_where(info.value, where, key, fixture)
            assert text in str(info.value)
        return
    vm = load_fixture(fixture)

    for d in fixture.get("assert-field"):
        name, _, expected = d.args.partition(" ")
        value: Any = vm
        for part in name.split("."):  # image_source.url: a field of a field
            value = getattr(value, part)
        assert show(value) == expected, f"line {d.line}: {name}"

    for d in fixture.get("assert-check-error"):
        where, key, text = _split3(d)
        with pytest.raises(ConfigError) as info:
            host.check_files(vm)
        _check_where(info.value, where, key, fixture)
        assert text in str(info.value)
    if fixture.get("assert-check-ok"):
        host.check_files(vm)

    render_errors = fixture.get("assert-render-error")
    if render_errors:
        with pytest.raises(QemuUnitError) as rinfo:
            render_fixture(fixture, vm)
        for d in render_errors:
            assert d.args in str(rinfo.value)
        return
    xml = render_fixture(fixture, vm)
    root = ET.fromstring(xml)
    for d in fixture.get("assert-xpath"):
        path, _, expected = d.args.partition(" ")
        found = _find(root, path)
        assert found, f"line {d.line}: {path} matches nothing"
        assert found[0] == expected, f"line {d.line}: {path}"
    for d in fixture.get("assert-xpath-count"):
        path, _, count = d.args.rpartition(" ")
        assert len(_find(root, path)) == int(count), f"line {d.line}: {path}"
    if fixture.get("assert-golden"):
        golden = fixture.file.with_name(fixture.file.stem + ".xml.golden")
        if REGENERATE:
            golden.write_text(xml, encoding="utf-8")
        assert golden.read_text(encoding="utf-8") == xml


@pytest.mark.parametrize("fixture", fixtures(), ids=lambda f: f.file.name)
def test_fixture(fixture: Fixture) -> None:
    checked = [d for d in fixture.directives if d.verb.startswith("assert-")]
    local = [d for d in checked if d.verb in LOCAL_VERBS]
    assert local, "a fixture must assert something here"
    _run(fixture)


def renderable() -> list[tuple[Fixture, str]]:
    """(fixture, rendered XML) of every fixture that renders."""
    out = []
    for f in fixtures():
        if f.expects_load_error or f.get("assert-render-error"):
            continue
        out.append((f, render_fixture(f, load_fixture(f))))
    return out


def test_rendered_xml_is_valid_for_libvirt_schema(tmp_path: Path) -> None:
    validate = shutil.which("virt-xml-validate")
    assert validate, "virt-xml-validate missing: apt-get install libvirt-clients"
    failures = []
    for fixture, xml in renderable():
        path = tmp_path / f"{fixture.name}.xml"
        path.write_text(xml, encoding="utf-8")
        result = subprocess.run(
            [validate, str(path), "domain"], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            failures.append(f"{fixture.file.name}: {result.stderr.strip()}")
    assert not failures, "\n".join(failures)


def test_every_key_is_used_by_a_fixture() -> None:
    used: set[str] = set()
    for f in fixtures():
        if f.expects_load_error:
            continue
        src = source.find_source(f.name, [FIXTURE_DIR])
        if src.kind == "vm":
            entries = unitfile.read(src.path, src.dropins).entries
            used |= {e.key for e in entries if e.section == settings.VM_SECTION}
    missing = [s.name for s in settings.SETTINGS if s.name not in used]
    assert not missing, f"keys without a fixture that loads: {missing}"


def test_golden_files_belong_to_fixtures() -> None:
    golden = {p.name.removesuffix(".xml.golden") for p in FIXTURE_DIR.glob("*.xml.golden")}
    with_assert = {f.file.stem for f in fixtures() if f.get("assert-golden")}
    assert golden == with_assert
