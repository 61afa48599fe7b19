"""The .deb and the .rpm: what they install, what their scripts do, lintian.

Each package is built once per session, as a distribution builds it: from an unpacked
sdist (a release tarball, no git; packaging/build-deb, packaging/build-rpm). The system
test tests/system/test_deb_system.py builds from the git checkout. Missing tools fail the
tests (tests/support/requirements.py).
"""

from __future__ import annotations

import gzip
import os
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from qemu_unit.config import settings, unitfile
from tests.support.requirements import require_tools

ROOT = Path(__file__).resolve().parent.parent
PACKAGING = ROOT / "packaging"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]

MAN_PAGES = (
    "usr/share/man/man1/qemu-unit.1",
    "usr/share/man/man5/qemu-run.vm.5",
    "usr/share/man/man8/qemu-run@.service.8",
)
INSTALLED = (
    "usr/bin/qemu-unit",
    "usr/lib/systemd/system/qemu-run@.service",
    "usr/lib/systemd/system/qemu-unit-caps.service",
    # The template wants it: without it no VM would be registered with machined.
    "usr/lib/systemd/system/qemu-run-register@.service",
    "usr/lib/systemd/system-generators/qemu-unit-generator",
    # Rootless VMs: the template and generator of users' managers (systemctl --user).
    "usr/lib/systemd/user/qemu-run@.service",
    "usr/lib/systemd/user-generators/qemu-unit-user-generator",
    "usr/lib/sysusers.d/qemu-unit.conf",
    "usr/lib/tmpfiles.d/qemu-unit.conf",
    "usr/share/doc/qemu-unit/examples/tiny.vm",
    "usr/share/doc/qemu-unit/examples/web.vm",
    "usr/share/doc/qemu-unit/examples/uefi.vm",
    # The JSON Schema of `qemu-unit list/status --json`, for the tools that read them.
    "usr/share/doc/qemu-unit/qemu-unit.schema.json",
)
DEPENDS = (
    "python3-libvirt", "python3-systemd", "python3-sdnotify", "qemu-system-x86",
    "libvirt-daemon-driver-qemu", "libvirt-daemon", "systemd", "python3-pycdlib", "qemu-utils",
)


def need(*tools: str) -> None:
    require_tools(*tools, fix="apt-get install debhelper dh-python pybuild-plugin-pyproject "
                  "lintian rpm")


def run(*cmd: str | Path, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)


@dataclass(frozen=True)
class Built:
    path: Path
    output: str  # everything the build script printed, lintian included
    returncode: int
    tree: Path  # the package's files, unpacked


@pytest.fixture(scope="session")
def sdist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The unpacked sdist of the working tree, built by Debian's setuptools (PEP 517)."""
    out = tmp_path_factory.mktemp("sdist")
    build = "import sys, setuptools.build_meta as b; print(b.build_sdist(sys.argv[1]))"
    done = run("/usr/bin/python3", "-c", build, out, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    tarball = out / done.stdout.split()[-1]
    run("tar", "-C", out, "-xzf", tarball, check=True)
    tree = out / f"qemu-unit-{VERSION}"
    # What a distribution gets: no repository to ask for files or dates.
    assert not (tree / ".git").exists() and run("git", "-C", tree, "rev-parse").returncode != 0
    return tree


def test_sdist_carries_what_the_packages_are_built_from(sdist: Path) -> None:
    for needed in ("packaging/build-deb", "packaging/build-rpm", "packaging/copy-tree",
                   "packaging/source-date", "packaging/debian/rules",
                   "packaging/rpm/qemu-unit.spec", "packaging/examples/web.vm",
                   "units/qemu-run@.service", "units/qemu-unit-generator", "LICENSE",
                   "README.md", "docs/DESIGN.md", "tests/conftest.py", "setup.sh"):
        assert (sdist / needed).is_file(), needed
    assert os.access(sdist / "packaging/build-deb", os.X_OK)


@pytest.fixture(scope="session")
def deb(tmp_path_factory: pytest.TempPathFactory, sdist: Path) -> Built:
    need("dpkg-buildpackage", "dh", "pybuild", "lintian", "dpkg-deb")
    out = tmp_path_factory.mktemp("deb")
    done = run(sdist / "packaging/build-deb", out / "pkg", timeout=300)
    debs = list((out / "pkg").glob("*.deb"))
    assert len(debs) == 1, done.stdout + done.stderr
    tree = out / "tree"
    run("dpkg-deb", "-R", debs[0], tree, check=True)
    return Built(debs[0], done.stdout + done.stderr, done.returncode, tree)


@pytest.fixture(scope="session")
def rpm(tmp_path_factory: pytest.TempPathFactory, sdist: Path) -> Built:
    need("rpmbuild", "rpm", "rpm2cpio", "cpio")
    out = tmp_path_factory.mktemp("rpm")
    done = run(sdist / "packaging/build-rpm", out / "pkg", timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    rpms = list((out / "pkg").glob("*.rpm"))
    assert len(rpms) == 1, done.stdout
    tree = out / "tree"
    tree.mkdir()
    payload = subprocess.run(["rpm2cpio", rpms[0]], capture_output=True, check=True).stdout
    subprocess.run(["cpio", "--quiet", "-idm"], input=payload, cwd=tree, check=True)
    return Built(rpms[0], done.stdout + done.stderr, done.returncode, tree)


def deb_files(deb: Built) -> dict[str, str]:
    """path (no leading ./) -> mode string, from dpkg-deb -c."""
    listing = run("dpkg-deb", "-c", deb.path, check=True).stdout
    files = {}
    for line in listing.splitlines():
        fields = line.split(maxsplit=5)
        files[fields[5].removeprefix("./").split(" -> ")[0].rstrip("/")] = fields[0]
    return files


# .deb


def test_deb_builds_and_lintian_is_clean(deb: Built) -> None:
    assert deb.returncode == 0, deb.output
    assert deb.path.name == f"qemu-unit_{VERSION}_all.deb"
    tags = run("lintian", "--display-level", ">=warning", deb.path).stdout
    # Overridden tags do not show; every override in the package has a reason.
    assert not re.findall(r"^[EW]: .*", tags, re.M), tags


def test_deb_file_list(deb: Built) -> None:
    files = deb_files(deb)
    for path in (*INSTALLED, *(p + ".gz" for p in MAN_PAGES)):
        assert path in files, path
    assert files["usr/lib/systemd/system-generators/qemu-unit-generator"] == "-rwxr-xr-x"
    assert files["usr/lib/systemd/system/qemu-run@.service"] == "-rw-r--r--"
    site = "usr/lib/python3/dist-packages/qemu_unit"
    for module in ("cli/commands", "generator/main", "config/settings", "vm/runner",
                   "cli/manpages", "config/unitfile", "config/__init__"):
        assert f"{site}/{module}.py" in files, module
    # Nothing outside /usr: /etc/qemu-run comes from tmpfiles.d, /var from the unit.
    assert all(p == "" or p.startswith("usr") for p in files), sorted(files)
    unwanted = ("__pycache__", "/tests/", "usr/share/qemu-unit/")
    assert not [p for p in files if any(u in p + "/" for u in unwanted)]


def test_deb_control_fields(deb: Built) -> None:
    control = (deb.tree / "DEBIAN" / "control").read_text()
    fields = dict(re.findall(r"^(\S+): (.*)$", control, re.M))
    assert fields["Package"] == "qemu-unit"
    assert fields["Version"] == VERSION
    assert fields["Architecture"] == "all"
    depends = {d.strip().split()[0] for d in fields["Depends"].split(",")}
    assert set(DEPENDS) <= depends, depends


def test_deb_maintainer_scripts_start_no_vm(deb: Built) -> None:
    scripts = {p.name: p.read_text() for p in (deb.tree / "DEBIAN").iterdir()
               if p.name in ("preinst", "postinst", "prerm", "postrm")}
    postinst = scripts["postinst"]
    assert "systemd-sysusers" in postinst and "qemu-unit.conf" in postinst
    assert "systemd-tmpfiles" in postinst and "--create qemu-unit.conf" in postinst
    assert "systemctl --system daemon-reload" in postinst
    everything = "\n".join(scripts.values())
    # No enable, no start, no restart on install or upgrade.
    assert not re.search(r"deb-systemd-helper (enable|unmask)|deb-systemd-invoke (start|restart)"
                         r"|systemctl .*(start|enable|restart)", everything)
    # VMs are stopped on removal only, never on upgrade.
    assert re.search(r'\[ "\$1" = "remove" \].*\n\s*deb-systemd-invoke stop', scripts["prerm"])
    postrm = scripts["postrm"]
    assert "rm -rf /var/cache/qemu-run" in postrm
    for line in postrm.splitlines():
        if re.match(r"\s*(rm|rmdir)\b", line):
            assert "/var/lib/qemu-run" not in line
            assert "/etc/qemu-run/" not in line and "-rf /etc" not in line


def test_deb_unit_and_entry_points(deb: Built) -> None:
    unit = unitfile.read(deb.tree / "usr/lib/systemd/system/qemu-run@.service")
    service = [(e.key, e.value) for e in unit.entries if e.section == "Service"]
    assert [v for k, v in service if k == "ExecStart"] == ["/usr/bin/qemu-unit run %i"]
    assert [v for k, v in service if k == "DynamicUser"] == ["yes"]
    assert (deb.tree / "usr/lib/systemd/system/qemu-unit-caps.service").is_file()
    generator = (deb.tree / "usr/lib/systemd/system-generators/qemu-unit-generator").read_text()
    assert generator.startswith("#!/usr/bin/python3 -IB\n")
    assert (deb.tree / "usr/bin/qemu-unit").read_text().startswith("#!/usr/bin/python3\n")
    sysusers = (deb.tree / "usr/lib/sysusers.d/qemu-unit.conf").read_text()
    assert re.search(r"^u qemu-run ", sysusers, re.M)
    assert re.search(r"^m qemu-run kvm", sysusers, re.M)


def test_deb_man_pages_render(deb: Built) -> None:
    need("man")
    for page in MAN_PAGES:
        path = deb.tree / (page + ".gz")
        assert gzip.decompress(path.read_bytes()).startswith(b'.\\" Generated by')
        done = run("man", "--warnings", "-l", path, env={**os.environ, "MANPAGER": "cat"})
        assert done.returncode == 0 and done.stderr == "", (page, done.stderr)


def test_packaged_generator_converts_the_examples(deb: Built, tmp_path: Path) -> None:
    """The installed code (not the source tree) turns the installed examples into units."""
    site = deb.tree / "usr/lib/python3/dist-packages"
    examples = deb.tree / "usr/share/doc/qemu-unit/examples"
    env = {"PATH": "/usr/bin:/bin", "QEMU_RUN_PATH": str(examples),
           "SYSTEMD_LOG_TARGET": "console", "SYSTEMD_UNIT_PATH": str(tmp_path)}
    # Run the installed script with the installed package on sys.path.
    code = (f"import sys; sys.path.insert(0, {str(site)!r}); sys.argv = sys.argv[1:]; "
            "exec(open(sys.argv[0]).read())")
    generator = deb.tree / "usr/lib/systemd/system-generators/qemu-unit-generator"
    out = tmp_path / "normal"
    out.mkdir()
    done = run(sys.executable, "-I", "-c", code, generator, out, out, out, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for name in ("tiny", "web", "uefi"):
        dropin = out / f"qemu-run@{name}.service.d" / "50-qemu-unit.conf"
        assert f"SourcePath={examples}/{name}.vm" in dropin.read_text()
    link = out / "multi-user.target.wants" / "qemu-run@web.service"
    assert link.is_symlink()


# Sources of both packages


def test_versions_agree() -> None:
    changelog = (PACKAGING / "debian" / "changelog").read_text().split("\n", 1)[0]
    assert re.match(rf"qemu-unit \({re.escape(VERSION)}(-\d+)?\) ", changelog), changelog
    spec = (PACKAGING / "rpm" / "qemu-unit.spec").read_text()
    assert re.search(rf"^Version:\s+{re.escape(VERSION)}$", spec, re.M)


def test_examples_are_valid_and_cover_the_promised_cases() -> None:
    vms = {p.stem: settings.parse_vm(p.stem, unitfile.read(p))
           for p in sorted((PACKAGING / "examples").glob("*.vm"))}
    assert set(vms) == {"tiny", "web", "uefi"}
    assert vms["tiny"].kernel is not None and not vms["tiny"].disks
    assert vms["web"].disks and [n.kind for n in vms["web"].networks] == ["user"]
    assert vms["web"].wanted_by == ("multi-user.target",)
    assert vms["uefi"].firmware is settings.Firmware.UEFI


# .rpm


def test_rpm_file_list(rpm: Built) -> None:
    files = run("rpm", "-qlp", rpm.path, check=True).stdout.split()
    assert rpm.path.name == f"qemu-unit-{VERSION}-1.noarch.rpm"
    for path in (*INSTALLED, *MAN_PAGES):
        assert "/" + path in files, path
    assert "/etc/qemu-run" in files
    assert any(re.search(r"/qemu_unit/generator/main\.py$", f) for f in files)
    assert not [f for f in files if f.startswith(("/var", "/usr/share/qemu-unit"))]
    mode = run("rpm", "-qp", "--qf", "[%{FILEMODES:perms} %{FILENAMES}\n]", rpm.path).stdout
    assert "-rwxr-xr-x /usr/lib/systemd/system-generators/qemu-unit-generator" in mode


def test_rpm_metadata_and_scripts(rpm: Built) -> None:
    arch = run("rpm", "-qp", "--qf", "%{ARCH}", rpm.path, check=True).stdout
    assert arch == "noarch"
    requires = run("rpm", "-qp", "--requires", rpm.path, check=True).stdout.split("\n")
    names = {r.split()[0] for r in requires if r}
    assert {"python3-libvirt", "python3-systemd", "python3-sdnotify", "libvirt-daemon",
            "libvirt-daemon-driver-qemu", "systemd", "python3-pycdlib", "qemu-img"} <= names
    scripts = run("rpm", "-qp", "--scripts", rpm.path, check=True).stdout
    # Upgrades never restart (reboot) running VMs.
    assert "restart" not in scripts
    assert "systemd-sysusers" in scripts or "useradd" in scripts
    unit = (rpm.tree / "usr/lib/systemd/system/qemu-run@.service").read_text()
    assert "ExecStart=/usr/bin/qemu-unit run %i" in unit
