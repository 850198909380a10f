"""Wire profiles: the behaviours QEMU ties to machine types (DESIGN.md, "two profiles").

`qemu-7.2` is what Debian 12's QEMU speaks; `qemu-10` is QEMU 10.x with a modern machine
type. Python-state migrations default to `qemu-10`.
"""

from __future__ import annotations

from dataclasses import dataclass

from multifd.wire.constants import PacketLayout


@dataclass(frozen=True)
class Profile:
    name: str
    layout: PacketLayout
    # 7.2: one SYNC per channel before every RAM EOS. 10: per scan round, with 0x200.
    sync_per_section: bool
    # 7.2: ZERO records on the main stream. 10: zero offsets inside multifd packets.
    zero_pages_in_multifd: bool
    switchover_start: bool
    device_state_packets: bool
    # 7.2 takes the first connection as main; 10 peeks each connection's magic.
    peek_channels: bool

    @property
    def allow_multifd_flush(self) -> bool:
        return not self.sync_per_section


QEMU_7_2 = Profile(
    name="qemu-7.2",
    layout=PacketLayout.V7_2,
    sync_per_section=True,
    zero_pages_in_multifd=False,
    switchover_start=False,
    device_state_packets=False,
    peek_channels=False,
)

QEMU_10 = Profile(
    name="qemu-10",
    layout=PacketLayout.HEAD,
    sync_per_section=False,
    zero_pages_in_multifd=True,
    switchover_start=True,
    device_state_packets=True,
    peek_channels=True,
)

PROFILES: dict[str, Profile] = {p.name: p for p in (QEMU_7_2, QEMU_10)}


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(
            f"unknown profile {name!r} (expected one of: {', '.join(PROFILES)})"
        ) from None
