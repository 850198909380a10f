"""Optional coverage-guided fuzzing of the wire decoders with atheris (not run in CI).

The Hypothesis harness in tests/fuzz/ runs a bounded, deterministic set of mutations in
the normal suite; this script runs libFuzzer's coverage-guided loop for as long as you
like, seeded with the real QEMU captures. Any exception other than WireError (and any
input slower than the harness' time limit, via -timeout) is a finding; libFuzzer saves it
as crash-<sha1> in the working directory.

    pip install atheris              # CPython 3.11 wheels on Linux x86-64
    python fuzz/atheris_wire.py -seed_corpus       # write fuzz/corpus/ from ../shared
    python fuzz/atheris_wire.py fuzz/corpus -max_total_time=3600 -timeout=5 \\
        -rss_limit_mb=2048 -max_len=600000
    python fuzz/atheris_wire.py crash-<sha1>       # replay one finding

The first input byte picks the target (main stream, multifd channel, RAM records,
packet headers, mapped-ram header, vmdesc, inspect), the rest is the stream.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for tests.fuzz._harness (seeds, drivers)

TARGETS = ("main", "channel", "ram", "packets", "mapped-ram", "vmdesc", "inspect")


def _one(data: bytes) -> None:
    from tests.fuzz.test_fuzz_wire import (
        PacketLayout,
        _drain_channel,
        _drain_main,
        _drain_ram_records,
    )

    from multifd.qemu.inspect import InspectError, inspect_streams
    from multifd.wire.errors import WireError
    from multifd.wire.mapped_ram import MappedRamHeader
    from multifd.wire.packet import decode_device_state_packet, decode_ram_packet
    from multifd.wire.vmdesc import find_vmdesc, split_device_tail

    if not data:
        return
    target, body = TARGETS[data[0] % len(TARGETS)], data[1:]
    try:
        if target == "main":
            _drain_main(body, 4096)
        elif target == "channel":
            _drain_channel(body, 65536, None, {"pc.ram": 64 << 20})
        elif target == "ram":
            _drain_ram_records(body)
        elif target == "packets":
            for layout in (PacketLayout.V7_2, PacketLayout.HEAD):
                try:
                    decode_ram_packet(body[:5184], layout=layout)
                except WireError:
                    pass
            decode_device_state_packet(body[:276])
        elif target == "mapped-ram":
            MappedRamHeader.decode(body)
        elif target == "vmdesc":
            found = find_vmdesc(body, limit=1 << 20)
            split_device_tail(body, found[1] if found else None)
        else:
            inspect_streams(("main.bin", body))
    except (WireError, InspectError):
        pass


def _seed_corpus() -> None:
    from tests.fuzz._harness import channel_seeds, main_seeds, mapped_ram_seed

    out = ROOT / "fuzz" / "corpus"
    out.mkdir(parents=True, exist_ok=True)
    for i, target in enumerate(TARGETS):
        seeds = {"channel": channel_seeds(), "packets": channel_seeds(),
                 "mapped-ram": (mapped_ram_seed(),)}.get(target, main_seeds())
        for s in seeds:
            data = s.data if target != "packets" else s.data[64:64 + 5184]
            (out / f"{target}-{s.name}").write_bytes(bytes([i]) + data)
    print(f"wrote {len(list(out.iterdir()))} seeds to {out}")


def main() -> None:
    if "-seed_corpus" in sys.argv:
        _seed_corpus()
        return
    import atheris  # optional: pip install atheris

    with atheris.instrument_imports():
        import multifd.qemu.inspect
        import multifd.wire  # noqa: F401
    atheris.Setup(sys.argv, _one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
