"""What a VM is, as written: unit-file syntax exactly as systemd reads it (`unitfile`), VM
names (`names`), the search path and drop-ins (`source`), the key table and the frozen
`VMConfig` it builds (`settings`), and the host paths a DomainXML= file names
(`domainxml`). Standard library only and free of libvirt: this is what the generator loads
at every boot. Imports nothing from `generator`, `vm` or `cli`.
"""
