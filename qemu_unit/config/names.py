"""VM names: what may become a unit instance, a libvirt domain name and a path."""

from __future__ import annotations

from qemu_unit.errors import ConfigError

# The embed root is /run/qemu-run/NAME and libvirt puts QEMU's monitor socket at
# ROOT/lib/qemu/domain-ID-SHORTNAME/monitor.sock (SHORTNAME is cut to 20
# characters): 66 characters plus the name must stay below the 108 of sun_path.
MAX_LENGTH = 40

# Valid in a systemd instance string and a libvirt domain name, never special in
# a path, a shell word or a unit specifier (checked with str.strip()).
_ALLOWED = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.@:-"
_SUFFIXES = (".vm", ".xml", ".vm.d")


def check_name(name: str) -> str:
    """Return NAME if it is safe to use as a VM name, else raise ConfigError."""
    if not name:
        raise ConfigError("VM name is empty")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise ConfigError(f"VM name {name!r} contains a control character")
    if any(c.isspace() for c in name):
        raise ConfigError(f"VM name {name!r} contains whitespace")
    if "/" in name:
        raise ConfigError(f"VM name {name!r} contains '/'")
    if ".." in name:
        raise ConfigError(f"VM name {name!r} contains '..'")
    if name[0] in ".-@":
        raise ConfigError(f"VM name {name!r} starts with {name[0]!r}")
    if name.strip(_ALLOWED):
        bad = sorted({c for c in name if c not in _ALLOWED})
        raise ConfigError(
            f"VM name {name!r} contains {''.join(bad)!r}:"
            " only letters, digits and _.@:- are allowed"
        )
    if len(name) > MAX_LENGTH:
        raise ConfigError(
            f"VM name {name!r} is {len(name)} characters long, the limit is {MAX_LENGTH}"
            " (UNIX socket paths under the VM's runtime directory)"
        )
    # NAME.vm.d is the drop-in directory of NAME: /run/qemu-run is both a search
    # directory and the parent of every VM's runtime directory.
    if name.endswith(_SUFFIXES):
        raise ConfigError(f"VM name {name!r} ends in a suffix qemu-unit uses for its files")
    return name


def split_template(name: str) -> tuple[str, str] | None:
    """'base@inst' -> ('base', 'inst'); None when NAME is not a template instance."""
    base, at, instance = name.partition("@")
    if not at:
        return None
    return base, instance
