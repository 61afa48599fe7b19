#!/bin/bash
# Sets up a fresh Debian 12 machine for qemu-unit and runs the demo VM:
#   sudo ./setup.sh            (SETUP_DEMO=0 skips the demo VM)
# Installs Debian's packages, qemu-unit into a venv made from /usr/bin/python3 (a
# non-root service user must be able to run the interpreter), the unit, generator and
# qemu-run user (`qemu-unit install`), then boots the demo guest.
set -euo pipefail
cd "$(dirname "$0")"

VENV=${QEMU_UNIT_VENV:-/usr/local/lib/qemu-unit/venv}
export DEBIAN_FRONTEND=noninteractive

if [ "$(id -u)" != 0 ]; then
    echo "setup.sh: run as root (sudo ./setup.sh)" >&2
    exit 1
fi

echo "==> Debian packages"
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
    qemu-system-x86 qemu-utils ovmf libxml2-utils \
    libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients \
    python3 python3-venv python3-libvirt python3-systemd python3-sdnotify python3-setuptools \
    python3-pycdlib python3-yaml python3-requests python3-tqdm python3-zstandard gpgv \
    systemd systemd-container busybox-static cpio gzip xz-utils kmod \
    debhelper dh-python pybuild-plugin-pyproject python3-all lintian rpm groff-base \
    mmdebstrap e2fsprogs dosfstools mtools fdisk systemd-boot openssh-client \
    swtpm swtpm-tools nftables \
    >/dev/null
# Tests only: `qemu-unit list/status --json` is checked against docs/qemu-unit.schema.json
# with a real JSON Schema validator (the venv sees Debian's packages).
# Image pull tests make a throwaway OpenPGP key with gpg.
apt-get install -y -qq --no-install-recommends python3-jsonschema gpg >/dev/null

echo "==> qemu-unit into $VENV"
if [ ! -x "$VENV/bin/python" ]; then
    /usr/bin/python3 -m venv --system-site-packages "$VENV"
fi
"$VENV/bin/pip" install -q --disable-pip-version-check --no-build-isolation --force-reinstall --no-deps .
"$VENV/bin/pip" install -q --disable-pip-version-check "pytest>=7" "hypothesis>=6" ruff mypy
chmod -R a+rX "$(dirname "$VENV")"
ln -sf "$VENV/bin/qemu-unit" /usr/local/bin/qemu-unit

echo "==> qemu-unit install"
qemu-unit install

if [ "${SETUP_DEMO:-1}" = 1 ]; then
    echo "==> demo VM"
    if [ -d /run/systemd/system ]; then
        qemu-unit demo
        systemctl start qemu-run@demo
        systemctl --no-pager status qemu-run@demo
        echo "Guest console: journalctl -u qemu-run@demo -t qemu-unit-console"
    else
        # systemd is not PID 1 here: run the runner in the foreground; the guest powers
        # itself off after 10 s (Ctrl-C shuts it down gracefully before that).
        qemu-unit demo --run-for 10
    fi
fi
