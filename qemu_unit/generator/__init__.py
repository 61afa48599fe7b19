"""The systemd generator: `.vm` files become `qemu-run@NAME.service` drop-ins and the
`.wants/` links of their `[Install]`. The conversion of a `VMConfig` is pure (it writes
nothing); `main` does the I/O (search path, output directories, kmsg). Imports `config`
only, never libvirt: it runs at very early boot.
"""
