"""A blind TCP proxy for bench/relay.py's `--floor` path: the least any user-space relay
can cost on this host.

It knows nothing of migration: every accepted connection gets its own connection to the
target, opened in the same order (QEMU's destination takes the first as main), and the
bytes of each direction move through a pipe with os.splice, so they never enter the
process (what KubeVirt's migration proxy does, minus its copies). `multifd relay`
in passthrough does the same plus reading each packet header; the time this proxy adds
over a direct migration is the extra loopback TCP hop itself.

    python bench/blind_proxy.py LISTEN_PORT TARGET_PORT     (both on 127.0.0.1)

It prints `listening on PORT` on stderr once it accepts, and runs until killed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sys
import threading

PIPE_SIZE = 1 << 20


def pump(src: socket.socket, dst: socket.socket) -> None:
    """src -> dst until EOF, then half-close dst (as the peer did). Blocking splices, no
    SPLICE_F_MORE: a small record (a marker on main) must leave at once, not wait corked
    for bytes that may only come after the destination answered it."""
    r, w = os.pipe()
    with contextlib.suppress(OSError):  # the default 64 KiB pipe works, only slower
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    try:
        while got := os.splice(src.fileno(), w, PIPE_SIZE, flags=os.SPLICE_F_MOVE):
            while got:
                got -= os.splice(r, dst.fileno(), got, flags=os.SPLICE_F_MOVE)
    except OSError:
        pass  # a reset: the migration fails on its own
    finally:
        os.close(r)
        os.close(w)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def main() -> int:
    port, target = int(sys.argv[1]), int(sys.argv[2])
    listener = socket.create_server(("127.0.0.1", port))
    print(f"listening on {port}", file=sys.stderr, flush=True)
    while True:
        up, _ = listener.accept()
        down = socket.create_connection(("127.0.0.1", target))
        for s in (up, down):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for a, b in ((up, down), (down, up)):
            threading.Thread(target=pump, args=(a, b), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
