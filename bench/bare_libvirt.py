"""The reference: bare libvirt-python on an embed root, no qemu-unit.

Started by bench/runner.py as the qemu-run user. Prints `CREATED` once createXML
returned; on `stop` from stdin asks for an ACPI shutdown, prints `STOPPED` on the
lifecycle event. As a systemd service (NOTIFY_SOCKET set: `Type=notify`, the floor under
qemu-unit's `systemctl start`/`stop`), it sends READY=1 after createXML and takes SIGTERM
as its stop. Listens on the same console socket the runner uses and prints the console, so
both start the same domain and wait for the same guest line.
"""

import os
import queue
import signal
import socket
import sys
import threading

import libvirt
import sdnotify

SERVICE = bool(os.environ.get("NOTIFY_SOCKET"))
if SERVICE:
    # Before any thread starts, so that only sigwait() below receives it.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

root, xml_path, sock_path = sys.argv[1:4]
os.makedirs(f"{root}/etc", exist_ok=True)
with open(f"{root}/etc/qemu.conf", "w") as f:
    f.write('stdio_handler = "file"\n')
libvirt.registerErrorHandler(lambda *_: None, None)
libvirt.virEventRegisterDefaultImpl()
threading.Thread(target=lambda: [libvirt.virEventRunDefaultImpl() for _ in iter(int, 1)],
                 daemon=True).start()
if os.path.exists(sock_path):
    os.unlink(sock_path)
listener = socket.socket(socket.AF_UNIX)
listener.bind(sock_path)
listener.listen(1)


def drain() -> None:
    conn, _ = listener.accept()
    while data := conn.recv(65536):
        sys.stdout.write(data.decode(errors="replace"))
        sys.stdout.flush()


threading.Thread(target=drain, daemon=True).start()
events: queue.SimpleQueue = queue.SimpleQueue()
conn = libvirt.open(f"qemu:///embed?root={root}")
conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                            lambda c, d, e, det, o: events.put(e), None)
dom = conn.createXML(open(xml_path).read(), 0)
print("CREATED", flush=True)
if SERVICE:
    sdnotify.SystemdNotifier().notify("READY=1")
    signal.sigwait({signal.SIGTERM})
else:
    sys.stdin.readline()
dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
while events.get() != libvirt.VIR_DOMAIN_EVENT_STOPPED:
    pass
print("STOPPED", flush=True)
