"""Our engine's qemu-10 stream, recorded on the wire, decodes with the code that decodes
QEMU 10.0's captures (`multifd inspect`): the same records, the same channel protocol.

MigrationSource -> recording proxy -> MigrationDestination, a paused demo machine; the
recorded main connection and channel connections go through `inspect_streams`, which
must rebuild every RAM block exactly as the destination holds it.
"""

from __future__ import annotations

import numpy as np
import pytest

from multifd.machine.demo import build_demo_machine
from multifd.migration.destination import MigrationDestination
from multifd.migration.params import MigrationCapabilities, MigrationParameters
from multifd.migration.profile import get_profile
from multifd.migration.source import MigrationSource
from multifd.qemu.inspect import inspect_streams
from multifd.testing.faults import FaultProxy

RAM = 8 << 20


@pytest.mark.parametrize(("profile", "compression"),
                         [("qemu-10", "none"), ("qemu-10", "zstd"), ("qemu-7.2", "zlib")])
def test_recorded_engine_stream_decodes_like_qemu(profile: str, compression: str) -> None:
    params = MigrationParameters()
    params.set({"max-bandwidth": 0, "multifd-compression": compression})
    caps = MigrationCapabilities()
    caps.set([{"capability": "multifd", "state": True}])
    dst_machine = build_demo_machine(RAM, seed=4, populate=False)
    dst_machine.set_incoming()
    dst = MigrationDestination(dst_machine, params=params, caps=caps,
                               profile=get_profile(profile))
    uri = dst.listen("tcp:127.0.0.1:0")
    src_machine = build_demo_machine(RAM, seed=4, total_steps=1)
    with FaultProxy.for_uri(uri, record=True) as proxy:
        src = MigrationSource(src_machine, params=params, caps=caps,
                              profile=get_profile(profile))
        src.start(proxy.uri)
        assert str(src.wait(30)) == "completed", src.error
        assert str(dst.wait(30)) == "completed", dst.error
        conns = {c.name: bytes(c.recorded or b"") for c in proxy.conns}
    assert set(conns) == {"main", "multifd:0", "multifd:1"}
    result = inspect_streams(("main", conns["main"]),
                             [(n, conns[n]) for n in ("multifd:1", "multifd:0")])
    assert result.machine == "multifd-python"
    assert result.sync_mode == ("per-round" if profile == "qemu-10" else "per-section")
    assert {b["name"] for b in result.to_json()["ram_blocks"]} == {"pc.ram", "pc.bios"}
    for name, blk in dst_machine.blocks.items():
        rebuilt = result.block_content(name)
        assert np.array_equal(np.frombuffer(rebuilt, dtype=np.uint8), blk.array), name
    chans = result.to_json()["channels"]
    assert sorted(c["id"] for c in chans) == [0, 1]
    assert all(c["compression"] == compression for c in chans)
    assert dst_machine.checksum() == src_machine.checksum()
    src_machine.close()
    dst_machine.close()
