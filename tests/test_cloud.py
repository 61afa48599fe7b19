"""Image=, the cloud-init seed, credentials, published ports: the host side, without a guest."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from qemu_unit import paths
from qemu_unit.cli import commands as cli
from qemu_unit.config import files, settings
from qemu_unit.config.unitfile import parse
from qemu_unit.errors import ConfigError, QemuUnitError
from qemu_unit.generator import convert
from qemu_unit.vm import credentials, domain, host, image, seed
from qemu_unit.vm.host import check_ports
from tests.support.security import exposure
from tests.test_fixtures import FIXTURE_DIR, fixtures

NEW_KEYS = ("Image", "Ephemeral", "DiskSize", "UserData", "SSHAuthorizedKey", "Hostname",
            "NetworkConfig", "SetCredential", "LoadCredential", "PublishPort",
            "RestrictNetwork")


def vm_of(text: str, name: str = "web", path: str = "/etc/qemu-run/web.vm") -> settings.VMConfig:
    return settings.parse_vm(name, settings.UnitFile(path, tuple(parse(text, path))))


def plan_of(vm: settings.VMConfig, state: Path, runtime: Path) -> host.Plan:
    dirs = paths.Dirs(state=state, root=runtime, cache=runtime / "cache", logs=runtime / "logs")
    return host.plan(vm, dirs, accel=settings.Accel.TCG)


def overlay(vm: settings.VMConfig, state: Path, runtime: Path) -> host.ImagePlan:
    """Make VM's overlay as the runner does; its plan."""
    plan = plan_of(vm, state, runtime).image
    assert plan is not None
    image.prepare_overlay(vm, plan)
    return plan


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """A short temporary directory: a plan refuses an embed root too long for a socket path."""
    path = Path(tempfile.mkdtemp(prefix="qu-"))
    yield path
    shutil.rmtree(path)


def state_and_runtime(top: Path) -> tuple[Path, Path]:
    (top / "state").mkdir()
    (top / "run").mkdir()
    return top / "state", top / "run"


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


# The seed.


def read_iso(path: Path) -> dict[str, bytes]:
    import pycdlib

    iso = pycdlib.PyCdlib()
    iso.open(str(path))
    try:
        assert iso.pvd.volume_identifier.rstrip(b" ") == b"cidata"
        out = {}
        for name in ("meta-data", "user-data", "network-config"):
            buf = io.BytesIO()
            try:
                iso.get_file_from_iso_fp(buf, rr_path=f"/{name}")
            except pycdlib.pycdlibexception.PyCdlibInvalidInput:
                continue
            out[name] = buf.getvalue()
        return out
    finally:
        iso.close()


def test_seed_iso_round_trip(tmp_path: Path) -> None:
    keys = tmp_path / "keys.pub"
    keys.write_text("# admins\nssh-ed25519 AAAAC3Nza one@x\n\nssh-rsa AAAAB3Nz two@y\n")
    user_data = tmp_path / "user-data"
    user_data.write_text("#cloud-config\npackages: [nginx]\n")
    vm = vm_of(f"[VM]\nSSHAuthorizedKey=ssh-ed25519 AAAAC3Nzb three@z\n"
               f"SSHAuthorizedKey={keys}\nUserData={user_data}\n", name="Web_1")
    path = tmp_path / "seed.iso"
    seed.write_iso(seed.from_vm(vm), path)
    assert path.stat().st_mode & 0o777 == 0o600
    files = read_iso(path)
    assert set(files) == {"meta-data", "user-data"}
    meta = json.loads(files["meta-data"])
    assert meta == {
        "instance-id": f"iid-{vm.domain_uuid()}",
        "local-hostname": "web-1",
        "public-keys": ["ssh-ed25519 AAAAC3Nzb three@z", "ssh-ed25519 AAAAC3Nza one@x",
                        "ssh-rsa AAAAB3Nz two@y"],
    }
    assert files["user-data"] == user_data.read_bytes()


def test_seed_defaults_and_network_config(tmp_path: Path) -> None:
    net = tmp_path / "net"
    net.write_text("version: 2\n")
    vm = vm_of(f"[VM]\nNetworkConfig={net}\n")
    files = seed.from_vm(vm).files()
    assert files["user-data"] == b"#cloud-config\n{}\n"
    assert files["network-config"] == b"version: 2\n"
    assert "public-keys" not in json.loads(files["meta-data"])


def test_unreadable_seed_file_names_the_key(tmp_path: Path) -> None:
    vm = vm_of(f"[VM]\nUserData={tmp_path}/gone\n")
    with pytest.raises(ConfigError, match=r"web.vm:2: UserData=: cannot read .*/gone"):
        seed.from_vm(vm)


# Credentials.


def test_set_credential_file_is_private_and_not_in_the_xml(tmp_path: Path) -> None:
    vm = vm_of("[VM]\nSetCredential=api.token:t0ps3cret\nLoadCredential=tls:/etc/hostname\n")
    assert "t0ps3cret" not in repr(vm.credentials)  # a traceback shows no value
    files = credentials.planned_files(vm, tmp_path)
    credentials.write_files(vm, files, tmp_path)
    written = tmp_path / "credentials" / "api.token"
    assert files == [("api.token", written), ("tls", Path("/etc/hostname"))]
    assert written.read_text() == "t0ps3cret"
    assert written.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "credentials").stat().st_mode & 0o777 == 0o700
    xml = domain.render(vm, plan_of(vm, tmp_path, tmp_path))
    assert "t0ps3cret" not in xml
    assert f"name=\"opt/io.systemd.credentials/api.token\" file=\"{written}\"" in xml
    credentials.remove(tmp_path)
    assert not (tmp_path / "credentials").exists()


def test_load_credential_needs_the_units_credential(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    vm = vm_of("[VM]\nLoadCredential=db\n")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(ConfigError, match="web.vm:2: LoadCredential=: the unit has no "
                                          "credential 'db'"):
        credentials.write_files(vm, credentials.planned_files(vm, tmp_path), tmp_path)
    unit_dir = tmp_path / "unit"
    unit_dir.mkdir()
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(unit_dir))
    with pytest.raises(ConfigError, match="does not exist"):
        credentials.write_files(vm, credentials.planned_files(vm, tmp_path), tmp_path)
    (unit_dir / "db").write_text("pw")
    files = credentials.planned_files(vm, tmp_path)
    assert files == [("db", unit_dir / "db")]
    credentials.write_files(vm, files, tmp_path)


# The overlay.


def test_overlay_made_once_base_never_written(tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "64M")
    before = base.read_bytes()
    state, runtime = state_and_runtime(tmp_path)
    vm = vm_of(f"[VM]\nImage={base}\nDiskSize=128M\n")
    made = overlay(vm, state, runtime)
    assert made.overlay == state / "image.qcow2" and made.base_format == "qcow2"
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(made.overlay)],
                                     check=True, capture_output=True, text=True).stdout)
    assert info["backing-filename"] == str(base)
    assert info["backing-filename-format"] == "qcow2"
    assert info["virtual-size"] == 128 * 1024**2
    inode = made.overlay.stat().st_ino
    # Kept across starts; DiskSize= only grows it.
    overlay(vm_of(f"[VM]\nImage={base}\nDiskSize=256M\n"), state, runtime)
    assert image.virtual_size(made.overlay) == 256 * 1024**2
    with caplog.at_level(logging.WARNING):
        overlay(vm_of(f"[VM]\nImage={base}\nDiskSize=128M\n"), state, runtime)
    assert "never shrinks" in caplog.text
    assert image.virtual_size(made.overlay) == 256 * 1024**2
    assert made.overlay.stat().st_ino == inode  # the same overlay, never made anew
    assert base.read_bytes() == before
    # A base that changed is reported, not rebased.
    caplog.clear()
    os.utime(base, ns=(1, 1))
    with caplog.at_level(logging.WARNING):
        overlay(vm, state, runtime)
    assert "has changed since the overlay was made" in caplog.text


def test_overlay_of_another_base_is_refused(tmp_path: Path) -> None:
    for name in ("a.img", "b.img"):
        (tmp_path / name).write_bytes(b"\0" * 1024 * 1024)
    vm = vm_of(f"[VM]\nImage={tmp_path}/a.img\n")
    overlay(vm, tmp_path, tmp_path)
    with pytest.raises(ConfigError, match=r"web.vm:2: Image=: the overlay .* was made from "
                                          r".*/a.img, not .*/b.img: run 'qemu-unit reset web'"):
        overlay(vm_of(f"[VM]\nImage={tmp_path}/b.img\n"), tmp_path, tmp_path)


def test_ephemeral_overlay_is_made_afresh_in_the_runtime_dir(tmp_path: Path) -> None:
    base = tmp_path / "base.img"
    base.write_bytes(b"\0" * 1024 * 1024)
    state, runtime = state_and_runtime(tmp_path)
    vm = vm_of(f"[VM]\nImage={base}\nEphemeral=yes\n")
    first = overlay(vm, state, runtime)
    assert first.overlay == runtime / "image.qcow2" and first.base_format == "raw"
    first.overlay.write_bytes(first.overlay.read_bytes() + b"guest writes")
    again = overlay(vm, state, runtime)
    assert not again.overlay.read_bytes().endswith(b"guest writes")
    assert list(state.iterdir()) == []


def test_reset_removes_overlay_and_nvram_and_refuses_while_running(tmp_path: Path) -> None:
    state, root = tmp_path / "state", tmp_path / "root"
    state.mkdir()
    root.mkdir()
    for name in ("image.qcow2", "image.base", "web_VARS.fd", "keep.me"):
        (state / name).write_text("x")
    (state / "saved").mkdir()  # a saved state belongs to the disk reset removes
    (state / "saved" / "memory").write_text("x")
    import fcntl

    with open(root / "qemu-unit.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with pytest.raises(QemuUnitError, match="VM web is running: stop it first"):
            image.reset("web", state, root)
    assert (state / "image.qcow2").exists()
    removed = image.reset("web", state, root)
    assert sorted(p.name for p in removed) == ["image.base", "image.qcow2", "saved",
                                               "web_VARS.fd"]
    assert [p.name for p in state.iterdir()] == ["keep.me"]


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_reset_opens_the_lock_without_following_links_or_blocking(
    tmp_path: Path, kind: str
) -> None:
    # `qemu-unit reset` runs as root; the lock file lies in the VM's own directory. The
    # review: a symlinked lock made root open (O_RDWR) a file of the VM user's choosing.
    state, root = tmp_path / "state", tmp_path / "root"
    state.mkdir()
    root.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("precious")
    if kind == "symlink":
        (root / "qemu-unit.lock").symlink_to(victim)
    else:
        os.mkfifo(root / "qemu-unit.lock")  # opened blocking, this would hang
    with pytest.raises(QemuUnitError, match="not the runner's lock file"):
        image.reset("web", state, root)
    assert victim.read_text() == "precious"


# Published ports.


def test_taken_port_is_one_clear_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        vm = vm_of(f"[VM]\nPublishPort=127.0.0.1:{port}:22\n")
        with pytest.raises(ConfigError) as info:
            check_ports(vm)
        assert str(info.value) == (f"/etc/qemu-run/web.vm:2: PublishPort=: host port "
                                   f"127.0.0.1:{port}/tcp is not available: "
                                   "Address already in use")
    check_ports(vm)  # free again


def test_generator_relaxes_only_what_published_ports_need() -> None:
    def service(text: str) -> dict[str, list[str]]:
        (_, dropin), = convert.convert(vm_of(text)).files
        out: dict[str, list[str]] = {}
        for e in parse(dropin, "x"):
            if e.section == "Service":
                out.setdefault(e.key, []).append(e.value)
        return out

    isolated = service("[VM]\nRestrictNetwork=yes\n")
    assert "PrivateNetwork" not in isolated and "IPAddressDeny" not in isolated
    loopback = service("[VM]\nRestrictNetwork=yes\nPublishPort=127.0.0.1:2222:22\n")
    assert loopback["PrivateNetwork"] == ["no"] and loopback["IPAddressAllow"] == ["localhost"]
    assert "IPAddressDeny" not in loopback  # the template's IPAddressDeny=any stays
    anywhere = service("[VM]\nRestrictNetwork=yes\nPublishPort=2222:22\n")
    assert anywhere["IPAddressDeny"] == [""]
    open_net = service("[VM]\nPublishPort=127.0.0.1:2222:22\n")
    assert open_net["IPAddressDeny"] == [""]  # an unrestricted guest reaches out


# Every new key: bad input is exit 78 with file, line and key, through the CLI.


def test_bad_input_for_every_new_key_exits_78(capsys: pytest.CaptureFixture[str]) -> None:
    covered = set()
    for fixture in fixtures():
        for d in fixture.get("assert-error") + fixture.get("assert-check-error"):
            where, key, text = d.args.split(None, 2)
            if key not in NEW_KEYS:
                continue
            covered.add(key)
            assert cli.main(["validate", str(fixture.file)]) == 78
            err = capsys.readouterr().err
            assert f"{FIXTURE_DIR}/{fixture.name}.vm:{where}: {key}=: " in err, err
            assert text in err
    assert covered == set(NEW_KEYS)


def test_exposure_of_a_vm_with_published_ports(tmp_path: Path) -> None:
    """systemd-analyze security of the generated unit: the goal is <= 2.0."""
    from tests.test_generator import _security, _unit_dir_with_template, run_generator, write_vm

    units = _unit_dir_with_template(tmp_path)
    src = tmp_path / "src"
    write_vm(src, "pub.vm", "[VM]\nImage=/srv/base.qcow2\nPublishPort=127.0.0.1:2222:22\n"
                            "RestrictNetwork=yes\nReady=agent\n")
    write_vm(src, "open.vm", "[VM]\nPublishPort=2222:22\n")
    assert run_generator(src, units, unit_path=units).returncode == 0

    def score(unit: str) -> float:
        return exposure(_security(units, unit), unit)

    isolated, open_net = score("qemu-run@pub.service"), score("qemu-run@open.service")
    print(f"exposure: isolated, loopback ports {isolated}; open user network {open_net}")
    assert isolated <= 2.0
    assert isolated < open_net  # IPAddressDeny=any kept counts


def test_seed_files_are_regular_files_of_bounded_size(tmp_path: Path) -> None:
    fifo = tmp_path / "user-data"
    os.mkfifo(fifo)  # read blocking, this would hang the runner
    vm = vm_of(f"[VM]\nImage=/dev/null\nUserData={fifo}\n")
    with pytest.raises(ConfigError, match="user-data: file is not a regular file") as info:
        seed.from_vm(vm)
    assert (info.value.line, info.value.key) == (3, "UserData")


SECRET = "hunter2-s3cr3t"


def test_a_secret_in_a_file_others_can_read_is_refused_without_echo(tmp_path: Path) -> None:
    # The review: /etc/qemu-run/*.vm is 0644 as usually written; `nobody` printed
    # SetCredential=dbpass:... from it.
    etc = tmp_path / "etc"
    etc.mkdir()
    vm_file = etc / "web.vm"
    vm_file.write_text(f"[VM]\nMemory=1G\nSetCredential=dbpass:{SECRET}\n")
    vm_file.chmod(0o644)
    src = settings.Source("web", "vm", vm_file)
    with pytest.raises(ConfigError) as info:
        settings.load_vm(src)
    message = str(info.value)
    assert message == (f"{vm_file}:3: SetCredential=: SetCredential= in a file other users "
                       "can read: chmod 0600 it (root only; the unit hands it to the VM as a "
                       "credential), or keep the value in a file of its own named by "
                       "LoadCredential=")
    vm_file.chmod(0o600)
    assert settings.load_vm(src).credentials[0].value == SECRET
    # A drop-in is a file of its own.
    dropin = etc / "web.vm.d" / "secret.conf"
    dropin.parent.mkdir()
    dropin.write_text(f"[VM]\nSetCredential=other:{SECRET}\n")
    dropin.chmod(0o604)
    with pytest.raises(ConfigError, match="other users can read") as info:
        settings.load_vm(settings.Source("web", "vm", vm_file, (dropin,)))
    assert info.value.path == str(dropin)
    # The generator refuses the VM as well, and says nothing of the value.
    vm_file.chmod(0o644)
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-I", "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
         "from qemu_unit.generator.main import main; sys.exit(main(sys.argv[2:]))",
         str(Path(__file__).parent.parent), str(out)],
        env={"QEMU_RUN_PATH": str(etc), "SYSTEMD_LOG_TARGET": "console", "PATH": "/usr/bin"},
        capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1 and "other users can read" in result.stderr
    assert SECRET not in result.stderr + result.stdout


@pytest.mark.parametrize("line", [
    f"SetCredential={SECRET} ok:x",       # the ID forgotten: the secret takes its place
    f"SetCredential={SECRET}/x:y",
    f"SetCredential={SECRET * 3}:y",      # too long for an ID
    f"SetCredential=db:{SECRET}\x1b[31m",  # a control character in the value
    f"SetCredential={SECRET}",            # no ':' at all
])  # fmt: skip
def test_credential_errors_never_show_the_value(line: str) -> None:
    with pytest.raises(ConfigError) as info:
        vm_of(f"[VM]\n{line}\n")
    assert SECRET not in str(info.value)
    assert info.value.key == "SetCredential"


def test_a_root_only_vm_file_reaches_the_runner_as_a_credential(tmp_path: Path) -> None:
    # Each VM runs as a user of its own, which cannot read a 0600 root file: the generator
    # hands it over with LoadCredential=, the runner reads that copy.
    etc = tmp_path / "etc"
    etc.mkdir(mode=0o755)
    vm_file = etc / "web.vm"
    vm_file.write_text(f"[VM]\nMemory=1G\nSetCredential=dbpass:{SECRET}\n")
    vm_file.chmod(0o600)
    vm = settings.load_vm(settings.Source("web", "vm", vm_file))
    cred_id = files.credential_id(vm_file)
    assert ("LoadCredential", f"{cred_id}:{vm_file}") in convert.implied_service(
        vm, convert.host_needs(vm))
    creds = tmp_path / "creds"
    creds.mkdir(mode=0o755)
    (creds / cred_id).write_text(vm_file.read_text())
    (creds / cred_id).chmod(0o644)
    tmp_path.chmod(0o755)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path; "
            "from qemu_unit.config import settings; "
            "vm = settings.load_vm(settings.Source('web', 'vm', Path(sys.argv[2]))); "
            "print(vm.memory)")
    repo = str(Path(__file__).parent.parent)
    run = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
           "/usr/bin/python3", "-I", "-c", code, repo, str(vm_file)]
    as_vm_user = subprocess.run(run, env={"CREDENTIALS_DIRECTORY": str(creds)},
                                capture_output=True, text=True, timeout=60, check=False)
    assert as_vm_user.stdout.strip() == str(1024**3), as_vm_user.stderr
    without = subprocess.run(run, env={}, capture_output=True, text=True, timeout=60,
                             check=False)
    assert "Permission denied" in without.stderr and SECRET not in without.stderr


def test_reset_forgets_backup_checkpoints(tmp_path: Path) -> None:
    # Their bitmaps were in the overlay reset removes: the next backup must be full.
    state, root = tmp_path / "state", tmp_path / "root"
    (state / paths.CHECKPOINTS_DIR).mkdir(parents=True)
    (state / paths.CHECKPOINTS_DIR / "cp1.xml").write_text("<domaincheckpoint/>")
    root.mkdir()
    assert image.reset("web", state, root) == [state / paths.CHECKPOINTS_DIR]
    assert list(state.iterdir()) == []
