"""`qemu-unit kube generate|play`: KubeVirt's own schema, what is named, the round trip.

The VirtualMachine is validated against KubeVirt's published OpenAPI schema
(tests/fixtures/kubevirt/, see its README) with jsonschema, stricter than the
file itself: a property the schema does not define is an error, so a misspelt
field fails here instead of being dropped by the API server.
"""

from __future__ import annotations

import functools
import gzip
import json
import string
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qemu_unit.cli import commands, kube
from qemu_unit.config import settings as vmsettings
from qemu_unit.config import source
from qemu_unit.config.settings import VMConfig
from qemu_unit.config.unitfile import parse
from qemu_unit.errors import ConfigError
from tests.test_fixtures import FIXTURE_DIR

SCHEMA = Path(__file__).parent / "fixtures" / "kubevirt" / "swagger.json.gz"


def _strict(node: Any) -> Any:
    """Every object schema with properties refuses the properties it does not define."""
    if isinstance(node, dict):
        out = {k: _strict(v) for k, v in node.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


@functools.cache
def validator() -> jsonschema.Draft4Validator:
    spec = json.loads(gzip.decompress(SCHEMA.read_bytes()))
    # Swagger 2's definitions are Draft 4 schemas; "#/definitions/X" resolves inside.
    schema = {"$ref": "#/definitions/v1.VirtualMachine",
              "definitions": _strict(spec["definitions"])}
    return jsonschema.Draft4Validator(schema)


def check_documents(documents: list[dict[str, Any]]) -> None:
    """The VirtualMachine against KubeVirt's schema; Secrets and Services by shape."""
    vms = [d for d in documents if d["kind"] == "VirtualMachine"]
    assert len(vms) == 1
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
              for e in validator().iter_errors(vms[0])]
    assert not errors, errors
    assert vms[0]["apiVersion"] == "kubevirt.io/v1"
    for doc in documents:
        assert doc["apiVersion"] in ("v1", "kubevirt.io/v1")
        assert set(doc) <= {"apiVersion", "kind", "metadata", "spec", "type", "stringData"}
        if doc["kind"] == "Service":
            for port in doc["spec"]["ports"]:
                assert port["protocol"] in ("TCP", "UDP")
                assert 1 <= port["port"] <= 65535 and 1 <= port["targetPort"] <= 65535
        if doc["kind"] == "Secret":
            assert all(isinstance(v, str) for v in doc["stringData"].values())
    # What is printed is what is validated: YAML reads back the same documents.
    assert list(yaml.safe_load_all(yaml.safe_dump_all(documents))) == documents


def vm_from(text: str, tmp_path: Path, name: str = "web") -> VMConfig:
    path = tmp_path / f"{name}.vm"
    path.write_text(text)
    path.chmod(0o600)  # SetCredential= values: root's only, or refused
    return vmsettings.load_vm(source.from_file(path))


def meaning(vm: VMConfig) -> dict[str, Any]:
    """What a VM is, apart from where and how it was written: derived defaults
    resolved (UUID, MACs, host name), seed files by content, unit lines by value."""
    from qemu_unit.vm import seed

    skip = {"source_path", "dropins", "files", "origins", "unit", "service", "install",
            "uuid", "hostname", "user_data", "network_config", "ssh_authorized_keys",
            "networks"}
    out = {k: v for k, v in vm._asdict().items() if k not in skip}
    out["uuid"] = vm.domain_uuid()
    out["networks"] = [(n.kind, n.target, mac) for n, mac in zip(vm.networks, vm.macs(),
                                                                 strict=True)]
    out["seed"] = seed.from_vm(vm).files() if vm.has_seed else None
    out["disks"] = [(d.path, d.format, d.readonly, d.bus, d.cache or "default")
                    for d in vm.disks]
    out["description"] = [e.value for e in vm.unit if e.key == "Description"][-1:]
    out["enabled"] = (vm.wanted_by, vm.required_by)
    out["restart"] = kube._restart(vm)
    return out


def round_trip(vm: VMConfig, tmp_path: Path, image_ref: str | None = None
               ) -> tuple[kube.Conversion, kube.Conversion, VMConfig]:
    generated = kube.generate(vm, image_ref=image_ref)
    check_documents(generated.documents)
    text = yaml.safe_dump_all(generated.documents)
    out = tmp_path / "played"
    out.mkdir(exist_ok=True)
    name, played = kube.play(yaml.safe_load_all(text), out)
    for filename, data in played.files.items():
        (out / filename).unlink(missing_ok=True)
        commands.write_config(out / filename, data)  # as `qemu-unit kube play` writes them
    return generated, played, vmsettings.load_vm(source.from_file(out / f"{name}.vm"))


def test_schema_is_strict_enough_to_catch_a_misspelt_field() -> None:
    good = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": {"name": "a"},
            "spec": {"template": {"spec": {"domain": {"devices": {}}}}}}
    assert validator().is_valid(good)
    bad = json.loads(json.dumps(good))
    bad["spec"]["template"]["spec"]["domain"]["memroy"] = {"guest": "1Gi"}
    assert not validator().is_valid(bad)
    bad = json.loads(json.dumps(good))
    bad["spec"]["template"]["spec"]["domain"]["cpu"] = {"cores": "two"}
    assert not validator().is_valid(bad)


def _corpus() -> list[Path]:
    return sorted(FIXTURE_DIR.glob("*.vm"))


def test_every_valid_vm_of_the_corpus_generates_a_schema_valid_virtualmachine() -> None:
    checked = 0
    for path in _corpus():
        try:
            vm = vmsettings.load_vm(source.from_file(path))
        except ConfigError:
            continue
        if vm.domain_xml is not None:
            with pytest.raises(ConfigError, match="DomainXML"):
                kube.generate(vm)
            continue
        try:
            result = kube.generate(vm, image_ref="registry.example/img:1")
        except ConfigError as e:
            assert "cannot read" in str(e)  # a seed file this host does not have
            continue
        check_documents(result.documents)
        checked += 1
    assert checked >= 40


def test_every_key_is_expressed_or_named() -> None:
    """A key added to the table must be decided here: converted, or named when set."""
    assert set(kube.EXPRESSED) | set(kube.UNSUPPORTED) == set(vmsettings.BY_NAME)
    assert not set(kube.EXPRESSED) & set(kube.UNSUPPORTED)


def test_a_web_vm(tmp_path: Path) -> None:
    (tmp_path / "ud").write_text("#cloud-config\npackages: [nginx]\n")
    vm = vm_from(f"""[Unit]
Description=Web server
[VM]
Memory=1536M
CPUs=2
Firmware=uefi
Image={tmp_path}/ud
DiskSize=10G
UserData={tmp_path}/ud
SSHAuthorizedKey=ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA you@laptop
PublishPort=127.0.0.1:2222:22
Ready=agent
[Install]
WantedBy=multi-user.target
""", tmp_path)
    result = kube.generate(vm, image_ref="registry.example/debian:12")
    assert result.notes == []
    check_documents(result.documents)
    vmdoc, ssh, service = result.documents
    spec = vmdoc["spec"]["template"]["spec"]
    assert vmdoc["spec"]["runStrategy"] == "RerunOnFailure"
    assert spec["domain"]["memory"] == {"guest": "1536Mi"}
    assert spec["domain"]["cpu"]["sockets"] == 2
    assert spec["domain"]["firmware"]["bootloader"] == {"efi": {"secureBoot": False}}
    assert spec["domain"]["firmware"]["uuid"] == vm.domain_uuid()
    template = vmdoc["spec"]["dataVolumeTemplates"][0]
    assert template["spec"]["source"] == {"registry": {"url": "docker://registry.example/debian:12"}}
    assert template["spec"]["storage"]["resources"]["requests"]["storage"] == "10Gi"
    assert spec["volumes"][-1]["cloudInitNoCloud"]["userData"].startswith("#cloud-config")
    assert ssh["stringData"] == {"key0": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA you@laptop"}
    assert spec["accessCredentials"][0]["sshPublicKey"]["propagationMethod"] == {"noCloud": {}}
    assert service["spec"]["ports"] == [{"protocol": "TCP", "port": 2222, "targetPort": 22}]
    assert service["spec"]["selector"] == vmdoc["spec"]["template"]["metadata"]["labels"]
    assert spec["domain"]["devices"]["interfaces"][0]["macAddress"] \
        == vm.macs()[0]
    _, played, back = round_trip(vm, tmp_path, "registry.example/debian:12")
    assert played.notes == []
    assert meaning(back) == meaning(vm)


def test_an_ephemeral_image_is_a_containerdisk(tmp_path: Path) -> None:
    vm = vm_from("[VM]\nImage=/etc/hostname\nEphemeral=yes\n", tmp_path)
    result = kube.generate(vm, image_ref="quay.io/x/y:z")
    assert {"name": "image", "containerDisk": {"image": "quay.io/x/y:z"}} in \
        result.documents[0]["spec"]["template"]["spec"]["volumes"]
    assert "dataVolumeTemplates" not in result.documents[0]["spec"]


def test_what_cannot_be_expressed_is_named_one_line_each(tmp_path: Path) -> None:
    vm = vm_from("""[VM]
Kernel=/boot/vmlinuz
KernelCmdline=console=ttyS0
Network=tap:tap0
Network=user
Network=user
Disk=/srv/a.qcow2
Disk=/srv/b.img,format=raw,bus=ide,cache=unsafe
Machine=pc
Accel=tcg
Image=/etc/hostname
Ready=console:login
ShutdownMode=agent acpi
ShutdownTimeout=1.5s
ConsoleLog=no
RestrictNetwork=yes
SetCredential=a:b
LoadCredential=c
[Service]
Restart=always
Nice=5
""", tmp_path)
    result = kube.generate(vm)
    check_documents(result.documents)
    notes = "\n".join(result.notes)
    for key in ("Kernel=", "KernelCmdline=", "Network=: tap:tap0", "second user interface",
                "Disk=: /srv/a.qcow2", "Disk=: /srv/b.img: KubeVirt has no bus=ide",
                "Machine=", "Accel=", "Image=: a local file", "Ready=", "ShutdownMode=",
                "ShutdownTimeout=", "ConsoleLog=", "RestrictNetwork=", "SetCredential=: a",
                "LoadCredential=", "[Service] Nice=", "[Service] Restart="):
        assert key in notes, key
    # Each names the file and line it comes from.
    assert all(n.startswith(f"{tmp_path}/web.vm:") for n in result.notes), result.notes
    assert len(result.notes) == len(set(result.notes))


def test_defaults_assigned_explicitly_are_not_named(tmp_path: Path) -> None:
    vm = vm_from("[VM]\nConsoleLog=8M\nRestrictNetwork=no\nAccel=auto\n", tmp_path)
    assert kube.generate(vm).notes == []


def test_run_strategy_from_install_and_restart(tmp_path: Path) -> None:
    cases = {"": "Manual", "[Install]\nWantedBy=multi-user.target\n": "RerunOnFailure",
             "[Service]\nRestart=always\n[Install]\nWantedBy=multi-user.target\n": "Always",
             "[Service]\nRestart=no\n[Install]\nWantedBy=multi-user.target\n": "Once"}
    for text, strategy in cases.items():
        vm = vm_from("[VM]\n" + text, tmp_path)
        generated, played, back = round_trip(vm, tmp_path)
        assert generated.documents[0]["spec"]["runStrategy"] == strategy
        assert generated.notes == played.notes == []
        assert meaning(back) == meaning(vm)
        (tmp_path / "played" / "web.vm").unlink()


def test_a_name_that_is_no_dns_label_travels_in_an_annotation(tmp_path: Path) -> None:
    vm = vm_from("[VM]\nHostname=box\nNetwork=none\n", tmp_path, name="App_1@blue")
    generated, played, back = round_trip(vm, tmp_path)
    assert generated.documents[0]["metadata"] == {
        "name": "app-1-blue", "annotations": {kube.NAME_ANNOTATION: "App_1@blue"}}
    assert back.name == "App_1@blue"
    assert meaning(back) == meaning(vm)


def test_play_names_every_field_it_cannot_express(tmp_path: Path) -> None:
    documents = yaml.safe_load_all("""
apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata: {name: x}
spec:
  running: true
  template:
    spec:
      domain:
        cpu: {cores: 2}
        features: {acpi: {}}
        resources: {requests: {memory: 1Gi}}
        devices:
          gpus: [{name: g, deviceName: nvidia.com/GA102}]
          disks: [{name: v, disk: {bus: virtio}}]
      networks: [{name: m, multus: {networkName: blue}}]
      volumes: [{name: v, persistentVolumeClaim: {claimName: data}}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: c}
""")
    name, result = kube.play(documents, tmp_path)
    assert name == "x"
    notes = "\n".join(result.notes)
    for what in ("ConfigMap c", "domain.features.acpi", "gpus[0].deviceName",
                 "persistentVolumeClaim.claimName", "network m"):
        assert what in notes, what
    text = result.files["x.vm"].decode()
    assert "CPUs=2\n" in text and "Memory=1G\n" in text and "WantedBy=multi-user.target" in text
    vm = vmsettings.parse_vm("x", _unit(text))
    assert vm.cpus == 2 and vm.memory == 1024**3


def _unit(text: str) -> Any:
    from qemu_unit.config.unitfile import UnitFile

    return UnitFile("x.vm", tuple(parse(text, "x.vm")))


def test_quantities() -> None:
    assert kube.parse_quantity("1Gi") == 1024**3
    assert kube.parse_quantity("1.5Gi") == 1536 * 1024**2
    assert kube.parse_quantity("2G") == 2 * 10**9
    assert kube.parse_quantity("1e9") == 10**9
    assert kube.parse_quantity(4096) == 4096
    assert kube.parse_quantity("1500m") is None
    assert kube.parse_quantity("lots") is None
    assert kube.quantity(1536 * 1024**2) == "1536Mi"
    assert kube.quantity(1024**2 + 1) == str(1024**2 + 1)


def test_cli_strict_is_an_error_and_prints_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "web.vm").write_text("[VM]\nAccel=tcg\n")
    status = commands.main(["kube", "generate", "web", "--config-dir", str(tmp_path),
                            "--strict"])
    out, err = capsys.readouterr()
    assert status == kube.EX_INEXPRESSIBLE == 65
    assert out == "" and "Accel=" in err
    assert commands.main(["kube", "generate", "web", "--config-dir", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and "Accel=: KubeVirt runs on KVM" in err
    (tmp_path / "vm.yaml").write_text(out)
    target = tmp_path / "out"
    assert commands.main(["kube", "play", str(tmp_path / "vm.yaml"), "--dir", str(target)]) == 0
    assert (target / "web.vm").read_text() == \
        f"[VM]\nUUID={vmsettings.stable_uuid('web')}\nNetwork=user\n" \
        f"MAC={vmsettings.stable_mac('web', 0)}\n"
    # Never over a VM that exists.
    assert commands.main(["kube", "play", str(tmp_path / "vm.yaml"), "--dir", str(target)]) == 1


# The round trip: every .vm drawn from the expressible subset means the same VM after
# generate -> YAML -> play (nothing named on either way).
_ssh_key = st.builds("ssh-ed25519 AAAA{} k{}".format,
                     st.text(string.ascii_letters + string.digits, min_size=4, max_size=12),
                     st.integers(0, 99))


@st.composite
def expressible_vm(draw: st.DrawFn) -> tuple[str, dict[str, str]]:
    """A .vm text in the subset KubeVirt expresses, and the seed files it names."""
    lines = ["[VM]"]
    files: dict[str, str] = {}
    if draw(st.booleans()):
        lines.append(f"Memory={draw(st.integers(64, 65536))}M")
    if draw(st.booleans()):
        lines.append(f"CPUs={draw(st.integers(1, 64))}")
    lines += draw(st.sampled_from([[], ["Machine=q35"], ["Machine=pc-q35-7.2"]]))
    lines += draw(st.sampled_from([[], ["CPUModel=host-model"], ["CPUModel=Skylake-Server"]]))
    lines += draw(st.sampled_from([[], ["Firmware=uefi"], ["Firmware=bios"]]))
    if draw(st.booleans()):
        lines.append(f"UUID={draw(st.uuids())}")
    if draw(st.booleans()):
        lines.append("Image=/etc/hostname")
        lines += draw(st.sampled_from([[], ["Ephemeral=yes"], ["DiskSize=20G"]]))
    for i in range(draw(st.integers(0, 2))):
        options = [f"/srv/disk{i}.img", "format=raw"]
        bus = draw(st.sampled_from(["virtio", "sata", "scsi"]))
        options += [] if bus == "virtio" else [f"bus={bus}"]
        options += draw(st.sampled_from([[]] if bus == "sata" else [[], ["readonly"]]))
        options += draw(st.sampled_from([[], ["cache=none"], ["cache=writeback"]]))
        lines.append("Disk=" + ",".join(options))
    for i in range(draw(st.integers(0, 1))):
        lines.append(f"CDROM=/srv/cd{i}.iso")
    network = draw(st.sampled_from(["default", "user", "none"]))
    if network != "default":
        lines.append(f"Network={network}")
    if network != "none" and draw(st.booleans()):
        lines.append(f"MAC=52:54:00:{draw(st.integers(0, 0xFFFFFF)):06x}")
        lines[-1] = lines[-1][:-6] + ":".join(
            lines[-1][-6:][i:i + 2] for i in range(0, 6, 2))
    if network != "none":
        for port in draw(st.lists(st.integers(1024, 65535), max_size=2, unique=True)):
            lines.append(f"PublishPort=127.0.0.1:{port}:{draw(st.integers(1, 65535))}")
    if draw(st.booleans()):
        files["UserData"] = "#cloud-config\n" + draw(st.text(string.ascii_letters, max_size=20))
    if draw(st.booleans()):
        files["NetworkConfig"] = "version: 2\n"
    for key in draw(st.lists(_ssh_key, max_size=2)):
        lines.append(f"SSHAuthorizedKey={key}")
    if draw(st.booleans()):
        lines.append(f"Hostname={draw(st.from_regex(r'[a-z][a-z0-9]{0,10}', fullmatch=True))}")
    lines += draw(st.sampled_from([[], ["Console=none"], ["Console=journal"]]))
    lines += draw(st.sampled_from([[], ["Ready=agent"], ["Ready=started"]]))
    if draw(st.booleans()):
        lines.append(f"ShutdownTimeout={draw(st.integers(0, 600))}s")
    if draw(st.booleans()):
        lines.append(f"SetCredential=cred{draw(st.integers(0, 9))}:"
                     f"{draw(st.text(string.ascii_letters + ' =', max_size=10))}")
    restart = draw(st.sampled_from([None, "always", "no", "on-failure"]))
    enabled = draw(st.booleans()) or restart not in (None, "on-failure")
    if draw(st.booleans()):
        lines.insert(0, f"[Unit]\nDescription={draw(st.text(string.ascii_letters, min_size=1))}")
    if restart:
        lines.append(f"[Service]\nRestart={restart}")
    if enabled:
        lines.append("[Install]\nWantedBy=multi-user.target")
    return "\n".join(lines) + "\n", files


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(expressible_vm())
def test_round_trip_means_the_same_vm(tmp_path: Path, drawn: tuple[str, dict[str, str]]) -> None:
    text, files = drawn
    for stale in tmp_path.rglob("*"):
        if stale.is_file():
            stale.unlink()
    for key, content in files.items():
        (tmp_path / key).write_text(content)
        text = text.replace("[VM]\n", f"[VM]\n{key}={tmp_path / key}\n", 1)
    vm = vm_from(text, tmp_path)
    generated, played, back = round_trip(vm, tmp_path, image_ref="registry.example/img:1")
    notes = [n for n in generated.notes if "SetCredential=" not in n]
    assert notes == [] and played.notes == []
    assert meaning(back) == meaning(vm)
