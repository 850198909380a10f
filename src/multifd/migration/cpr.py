"""cpr-transfer: hand a Machine to a new process on the same host without copying its RAM.

QEMU's `mode` migration parameter `cpr-transfer` (docs/devel/migration/CPR.rst,
migration/cpr-transfer.c, migration/cpr.c). Every RAM block is memfd-backed
(`RamBlock(..., backing="memfd")`, QEMU's share=on memory backends); the source connects
to the destination's unix: socket and first sends the CPR state (wire/cpr.py) with the
blocks' fds attached (SCM_RIGHTS); the destination maps them over its own blocks
(machine/memfd.py `adopt`), so both processes see the same pages. Then the main stream
runs as in a precopy migration, minus RAM: device sections, globalstate, EOF. There is
no dirty tracking and no live round (QEMU: "CPR unconditionally stops VM execution before
memory is saved"): the source pauses once the fds are across, and its downtime is the
device state's, whatever the RAM size.

Differences from QEMU, and why: QEMU sends the CPR state on a second channel
(`-incoming cpr`), because its destination must create RAM from the fds before it
starts; our destination's blocks exist already (the application holds views of them),
so the state travels at the head of the one unix connection and the fds are mapped over
the existing ranges. multifd channels are not opened (no RAM goes over them) and TLS is
refused (fds cannot pass through TLS records; the socket is local).

After the destination confirms, the source machine is `postmigrate` (it never runs
again, as QEMU's) and its blocks are detached: their ranges become private copies, so a
stray write on the source can never reach the pages the destination runs on. A failure
before that leaves the source running on its memory, untouched (the destination never
runs on a stream it did not load completely).
"""

from __future__ import annotations

import os
import socket
from typing import Any

from multifd.machine import memfd
from multifd.machine.machine import Machine, RunState
from multifd.transport.fdpass import recv_with_fds, send_with_fds
from multifd.transport.uri import UnixAddress
from multifd.wire.cpr import (
    MAX_CPR_FDS,
    PREAMBLE_SIZE,
    CprFd,
    decode_body,
    decode_preamble,
    encode_state,
)
from multifd.wire.errors import Mismatch

__all__ = ["CPR_TRANSFER", "CprError", "check_destination", "check_source",
           "finish_source", "is_cpr_transfer", "receive_state", "send_state"]

CPR_TRANSFER = "cpr-transfer"


class CprError(ValueError):
    """A cpr-transfer handover cannot be done with this machine or URI."""


def is_cpr_transfer(params: Any) -> bool:
    """True when the `mode` parameter asks for a cpr-transfer handover."""
    return params.get("mode") == CPR_TRANSFER


def _check_channel(addr: Any, tls: bool) -> None:
    if not isinstance(addr, UnixAddress):
        raise CprError(f"mode cpr-transfer needs a unix: URI (file descriptors pass only "
                       f"over a unix socket), not {addr}")
    if tls:
        raise CprError("mode cpr-transfer cannot run under TLS (file descriptors cannot "
                       "pass through TLS records; the unix socket is local): unset tls-creds")


def check_source(machine: Machine, addr: Any, *, tls: bool) -> None:
    """Refuse, before anything starts, a handover this source cannot do."""
    _check_channel(addr, tls)
    anon = [b.name for b in machine.blocks.values() if memfd.fd_of(b) is None]
    if anon:
        raise CprError("mode cpr-transfer needs every RAM block memfd-backed "
                       "(RamBlock(..., backing='memfd')); not memfd-backed: "
                       + ", ".join(repr(n) for n in anon))
    if len(machine.blocks) > MAX_CPR_FDS:
        raise CprError(f"mode cpr-transfer passes at most {MAX_CPR_FDS} RAM blocks, "
                       f"the machine has {len(machine.blocks)}")


def check_destination(addr: Any, *, tls: bool) -> None:
    """Refuse, in listen(), a URI a handover cannot arrive on."""
    _check_channel(addr, tls)


def send_state(sock: socket.socket, machine: Machine) -> None:
    """The CPR state with every block's memfd, at the head of the main channel."""
    blocks = list(machine.blocks.values())
    fds = [memfd.fd_of(b) for b in blocks]
    if any(fd is None for fd in fds):  # check_source ran; a block was closed since
        raise CprError("a RAM block lost its memfd before the handover")
    data = encode_state([CprFd(b.name, b.used_length) for b in blocks])
    send_with_fds(sock, data, [fd for fd in fds if fd is not None])


def receive_state(sock: socket.socket, machine: Machine) -> None:
    """Read the CPR state and map each received memfd over the block it names.

    Every block of the machine must be named once, with its exact used_length: a block
    left out would run on zeroed memory, one of another size on someone else's layout.
    Nothing is mapped unless all of them match.
    """
    _, body, fds = recv_with_fds(sock, PREAMBLE_SIZE, MAX_CPR_FDS, decode_preamble)
    try:
        entries = decode_body(body)
        if len(entries) != len(fds):
            raise Mismatch("CPR state names a different number of RAM blocks than the fds "
                           "passed with it", field="fds", value=len(fds))
        blocks = machine.blocks
        named = [e.name for e in entries]
        unknown = [n for n in named if n not in blocks]
        missing = [n for n in blocks if n not in named]
        if unknown or missing or len(set(named)) != len(named):
            raise Mismatch(f"CPR state RAM blocks {named} do not match this machine's "
                           f"{list(blocks)}")
        for e, fd in zip(entries, fds, strict=True):
            if blocks[e.name].used_length != e.length:
                raise Mismatch(f"RAM block {e.name!r}: length {e.length:#x} in the CPR "
                               f"state, {blocks[e.name].used_length:#x} here")
            if not memfd.is_memfd(fd):
                raise Mismatch(f"RAM block {e.name!r}: the fd passed is not a memfd")
            if memfd.memfd_size(fd) < e.length:
                raise Mismatch(f"RAM block {e.name!r}: the memfd passed is shorter than "
                               f"its length {e.length:#x}")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    for i, e in enumerate(entries):
        try:
            memfd.adopt(blocks[e.name], fds[i])
        except BaseException:
            for fd in fds[i:]:
                os.close(fd)
            raise


def finish_source(machine: Machine) -> None:
    """The destination confirmed: the source is `postmigrate` and its blocks detached.

    Never raises: the destination runs on the pages now, so the migration has completed
    whatever happens here (a failure must not resume the source). A block that cannot be
    detached stays shared; the postmigrate machine does not write to it."""
    machine.set_state(RunState.POSTMIGRATE)
    for block in machine.blocks.values():
        try:
            memfd.detach(block)
        except Exception:
            continue
