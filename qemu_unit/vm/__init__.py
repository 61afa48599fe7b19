"""What runs inside the unit: the host plan (`host`), the final domain (`domain`), the
runner that acquires and supervises it (`runner`), the guest console (`console`), disk
images (`image`), the cloud-init seed (`seed`), credentials (`credentials`), sd_notify
(`notify`), the status file (`status`) and machined registration (`machine`). The only
package that touches libvirt or QEMU. Imports `config`, never `cli`.
"""
