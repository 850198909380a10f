"""Real QEMU as a peer: record a migration from QEMU (incoming), replay an image into QEMU.

    QEMU source --main + N channels--> receive_from_qemu --> VmImage (image.py)
    VmImage --> migrate_to_qemu --main + N channels--> QEMU destination (-incoming defer)

Incoming: connections are accepted per profile (7.2: the first is main; 10: peeked). The
multifd `Receiver` is built once the MEM_SIZE block list has been parsed (the RAM blocks
exist only then); that is in time because every channel starts with a SYNC packet that
the source pairs with the ram START's marker, so no page arrives before it. Every round
is applied in order: the barrier runs at each RAM EOS (qemu-7.2) or MULTIFD_FLUSH
(qemu-10). The configuration bytes and the device tail are kept opaque.

Migrate: main first, then the channels (each writes MultiFDInit_t), header and
configuration from the image, ram START (block list, setup SYNCs, [FLUSH] EOS), one PART
with every page (normal pages in 128-page packets; zero pages as QEMU's
zero-page-detection says: `legacy`, qemu-7.2's only way, as ZERO records on the main
stream; `multifd`, qemu-10's default, not at all, see `_send_block`; `none` as normal
pages; then SYNC + EOS, or SYNC + FLUSH + EOS for qemu-10), [SWITCHOVER_START], END, the
device tail verbatim; then wait for the destination to close the main channel (it does
once it has loaded everything).

UUID rule (QEMU compares the init packet's uuid with its own `-uuid`, zeros without one):
the explicit `uuid` argument, else the configuration's uuid subsection when the stream
carries one, else 16 zero bytes.

Every wait is bounded by `timeout`; failures raise PeerError with a one-line message.
"""

from __future__ import annotations

import contextlib
import socket
import time
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from multifd.machine.ramblock import RamBlock
from multifd.migration.mainstream import MainStreamWriter
from multifd.migration.params import PARAMETERS, zero_page_default
from multifd.migration.profile import Profile
from multifd.migration.stats import sum_channel_stats
from multifd.multifd import MultifdError, RamPayload, Receiver, Sender
from multifd.qemu.image import (
    SWITCHOVER_START,
    ImageError,
    StreamRecorder,
    VmImage,
    image_chunks,
    section_close,
    section_open,
    section_start,
    zero_mask,
)
from multifd.transport.channels import ChannelError, accept_channels, connect_channels
from multifd.transport.exec import open_stream
from multifd.transport.sockets import Listener, connect, sendmsg_all
from multifd.transport.tls import (
    TlsClosedError,
    TlsConfig,
    TlsError,
    accept_tls,
    accept_tls_channels,
    connect_tls,
    connect_tls_channels,
)
from multifd.transport.uri import TcpAddress, UnixAddress, parse_uri
from multifd.wire.constants import SectionType, page_count
from multifd.wire.errors import WireError
from multifd.wire.ram import RamEos, RamMultifdFlush, encode_ram_record
from multifd.wire.ram_batch import encode_zero_run
from multifd.wire.stream import FileHeader, encode_record

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "PeerError",
    "TransferStats",
    "migrate_to_qemu",
    "parse_uuid",
    "receive_from_qemu",
    "resolve_uuid",
]

DEFAULT_TIMEOUT_S = 60.0
RECV_CHUNK = 1 << 20
COMPRESSIONS = ("none", "zlib", "zstd")
ZERO_PAGE_DETECTION = PARAMETERS["zero-page-detection"].choices


class PeerError(Exception):
    """A migration with a QEMU peer failed; str() is a one-line explanation."""


@dataclass
class TransferStats:
    """What one transfer moved (the `--json` summary)."""

    machine: str = ""
    blocks: dict[str, int] = field(default_factory=dict)
    normal_pages: int = 0
    zero_pages: int = 0
    channels: int = 0
    compression: str = "none"
    main_bytes: int = 0
    channel_bytes: int = 0
    time_ms: float = 0.0
    # migrate: when the last byte was sent and the channels closed (the point where a QEMU
    # source's query-migrate total-time ends); time_ms runs on until the destination loaded
    sent_ms: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "machine": self.machine,
            "blocks": [{"name": n, "used_length": u} for n, u in self.blocks.items()],
            "pages": {"normal": self.normal_pages, "zero": self.zero_pages},
            "channels": self.channels,
            "compression": self.compression,
            "bytes": {"main": self.main_bytes, "channels": self.channel_bytes,
                      "total": self.main_bytes + self.channel_bytes},
            "time_ms": round(self.time_ms, 1),
            **({"sent_ms": round(self.sent_ms, 1)} if self.sent_ms is not None else {}),
        }


def parse_uuid(text: str) -> bytes:
    """16 raw bytes from a UUID string (any form `uuid.UUID` takes)."""
    try:
        return uuidlib.UUID(text).bytes
    except ValueError:
        raise PeerError(f"bad --uuid {text!r}: expected a UUID like "
                        "12345678-1234-1234-1234-123456789abc") from None


def resolve_uuid(explicit: bytes | None, configured: bytes | None) -> bytes:
    """The multifd init packets' uuid: explicit, else the configuration's, else zeros."""
    if explicit is not None:
        return explicit
    if configured is not None:
        return configured
    return bytes(16)


def _check_options(channels: int, compression: str) -> None:
    if not 0 <= channels <= 255:
        raise PeerError(f"--channels must be 0 (multifd off) .. 255, not {channels}")
    if compression not in COMPRESSIONS:
        raise PeerError(f"--compression must be one of {', '.join(COMPRESSIONS)}")
    if channels == 0 and compression != "none":
        raise PeerError("--compression needs multifd (--channels >= 1)")


def _zero_page_mode(profile: Profile, channels: int, mode: str | None) -> str:
    """QEMU's zero-page-detection for a migration to QEMU; None: the profile's default.

    It decides how the multifd path sends zero pages; with multifd off the image's own
    records go out as recorded, so an explicit mode there would do nothing: refused.
    """
    if mode is None:
        return zero_page_default(profile)
    if mode not in ZERO_PAGE_DETECTION:
        raise PeerError(f"zero-page-detection must be one of {', '.join(ZERO_PAGE_DETECTION)}"
                        f", not {mode!r}")
    if mode == "multifd" and not profile.zero_pages_in_multifd:
        raise PeerError(f"zero-page-detection multifd is not possible with profile "
                        f"{profile.name} (its packets carry no zero pages): use legacy or none")
    if not channels:
        raise PeerError("zero-page-detection needs multifd (--channels >= 1): with multifd "
                        "off the image's records are sent as recorded")
    return mode


def _uuid_text(u: bytes) -> str:
    return str(uuidlib.UUID(bytes=u))


# ----------------------------------------------------------------------------- incoming


class _Incoming:
    """One incoming migration from QEMU: sockets, recorder, lazily built Receiver."""

    def __init__(self, profile: Profile, channels: int, compression: str,
                 uuid: bytes | None, timeout: float) -> None:
        self.profile = profile
        self.n = channels
        self.compression = compression
        self.uuid = uuid
        self.timeout = timeout
        self.main: Any = None
        self.chan_socks: list[socket.socket] = []
        self.receiver: Receiver | None = None
        self.syncs = 0
        self.rec = StreamRecorder(
            allow_multifd_flush=not profile.sync_per_section,
            allow_switchover_start=profile.switchover_start,
            on_blocks=self._on_blocks,
            on_marker=self._on_marker,
        )

    def _on_blocks(self, blocks: dict[str, RamBlock]) -> None:
        if not self.n:
            return
        cfg = self.rec.configuration
        want = resolve_uuid(self.uuid, cfg.uuid if cfg else None)
        self.receiver = Receiver(channels=self.n, uuid=want, layout=self.profile.layout,
                                 compression=self.compression, blocks=blocks,
                                 fresh_ram=True, received=self.rec.received)
        socks, self.chan_socks = self.chan_socks, []
        for i, s in enumerate(socks):
            try:
                self.receiver.add_channel(s, timeout=self.timeout)
            except (WireError, MultifdError, OSError) as e:
                for rest in socks[i:]:
                    rest.close()
                raise PeerError(f"multifd channel rejected: {_describe(e)}") from None

    def _on_marker(self, rec: object) -> None:
        if self.receiver is None:
            if isinstance(rec, RamMultifdFlush):
                raise PeerError("MULTIFD_FLUSH on the main stream but multifd is off here "
                                "(the source uses multifd: pass --channels N)")
            return
        if isinstance(rec, RamEos) and not self.profile.sync_per_section:
            return
        try:
            self.receiver.sync_main(timeout=self.timeout)
        except MultifdError as e:
            raise PeerError(_channel_hint(str(e), self.compression)) from None
        self.syncs += 1

    def run(self, uri: str, on_listen: Callable[[str], None] | None) -> VmImage:
        addr = parse_uri(uri)
        if isinstance(addr, TcpAddress | UnixAddress):
            with Listener(addr) as listener:
                if on_listen is not None:
                    on_listen(str(listener.address))
                tls = getattr(self, "tls", None)  # TLS: channels by connection order
                if self.n and tls is not None:
                    self.main, self.chan_socks = accept_tls_channels(
                        listener, self.n, tls, self.timeout)
                elif self.n:
                    self.main, self.chan_socks = accept_channels(
                        listener, self.n, self.profile.name, self.timeout)
                elif tls is not None:
                    self.main = accept_tls(listener, tls, self.timeout)
                else:
                    self.main = listener.accept(self.timeout)
            self.main.settimeout(self.timeout)
        elif self.n:
            raise PeerError(f"multifd needs a tcp: or unix: URI, not {uri}")
        else:
            self.main = open_stream(addr, "r")
        buf = bytearray(RECV_CHUNK)
        view = memoryview(buf)
        while True:
            try:
                n = self.main.recv_into(view)
            except TimeoutError:
                raise PeerError(f"no data from the source for {self.timeout:g} s on the "
                                "main channel") from None
            if n == 0:
                break
            self.rec.feed(view[:n])
        img = self.rec.finish()
        if self.receiver is not None:
            if self.receiver.error is not None:
                raise PeerError(_channel_hint(str(self.receiver.error), self.compression))
            if self.syncs == 0:
                raise PeerError("the stream had no multifd sync marker (is multifd on at "
                                "the source?)")
        return img

    def close(self) -> None:
        if self.receiver is not None:
            self.receiver.close()
        for s in self.chan_socks:
            s.close()
        if self.main is not None:
            with contextlib.suppress(OSError):
                self.main.close()


def receive_from_qemu(
    uri: str,
    *,
    profile: Profile,
    channels: int = 0,
    compression: str = "none",
    uuid: bytes | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    on_listen: Callable[[str], None] | None = None,
    tls: TlsConfig | None = None,
    observe: Callable[[Any], None] | None = None,
) -> tuple[VmImage, TransferStats]:
    """Be the destination of a QEMU migration on `uri`; return the recorded image.

    `channels` 0 means multifd off; otherwise it, `compression` and the UUID (see the
    module docstring) must match the source's settings. Listens (tcp:/unix:; then calls
    `on_listen(bound address)`) or reads a stream (exec:/file:/fd:, multifd off).
    `observe(transfer)` gets the transfer object at once (a timeline samples it).
    Raises PeerError.
    """
    _check_options(channels, compression)
    t0 = time.monotonic()
    inc = _Incoming(profile, channels, compression, uuid, timeout)
    inc.tls = tls  # type: ignore[attr-defined]
    if observe is not None:
        observe(inc)
    try:
        img = inc.run(uri, on_listen)
    except WireError as e:
        inc.rec.close()
        rx_err = inc.receiver.error if inc.receiver is not None else None
        if rx_err is not None:  # a failed channel made the source give up: the root cause
            raise PeerError(_channel_hint(str(rx_err), compression)) from None
        at = f" at byte {e.offset} of the main stream" if e.offset is not None else ""
        raise PeerError(f"{e.describe()}{at}") from None
    except (ChannelError, TimeoutError) as e:
        inc.rec.close()
        raise PeerError(f"{e}{_count_hint(channels)}") from None
    except (PeerError, ImageError):
        inc.rec.close()
        raise
    except (OSError, MultifdError) as e:
        inc.rec.close()
        raise PeerError(_describe(e)) from None
    except BaseException:
        inc.rec.close()
        raise
    finally:
        inc.close()
    st = TransferStats(machine=img.machine, blocks=dict(img.block_lengths), channels=channels,
                       compression=compression, main_bytes=inc.rec.bytes_in)
    st.normal_pages, st.zero_pages = inc.rec.main_normal, inc.rec.main_zero
    if inc.receiver is not None:
        tot = sum_channel_stats(inc.receiver.channel_stats().values())
        st.normal_pages += tot.get("normal_pages", 0)
        st.zero_pages += tot.get("zero_pages", 0)
        st.channel_bytes = tot.get("wire_bytes_ram", 0) + 64 * channels
    img.normal_pages, img.zero_pages = st.normal_pages, st.zero_pages
    st.time_ms = (time.monotonic() - t0) * 1000
    return img, st


# ----------------------------------------------------------------------------- migrate


class _LoadTimeout(Exception):
    """The destination kept the main channel open after we sent everything."""


SCAN_WINDOW_PAGES = 16384  # 64 MiB of 4 KiB pages: ~2 ms of zero scan between sends


class _Outgoing:
    """One outgoing migration to QEMU (see migrate_to_qemu)."""

    def __init__(self, image: VmImage, profile: Profile, channels: int, compression: str,
                 uuid: bytes, timeout: float, zero_page_detection: str = "") -> None:
        self.image = image
        self.profile = profile
        self.n = channels
        self.compression = compression
        self.uuid = uuid
        self.timeout = timeout
        self.zero_mode = zero_page_detection or _zero_page_mode(profile, channels, None)
        self.sock: socket.socket | None = None
        self.stream: Any = None
        self.sender: Sender | None = None
        self.main: MainStreamWriter | None = None
        self.normal = 0
        self.zero = 0
        self.t_sent = 0.0

    def open(self, uri: str) -> None:
        addr = parse_uri(uri)
        if isinstance(addr, TcpAddress | UnixAddress):
            tls = getattr(self, "tls", None)
            if self.n:
                if tls is not None:
                    self.sock, chans = connect_tls_channels(addr, self.n, tls, self.timeout)
                else:
                    self.sock, chans = connect_channels(addr, self.n, self.profile.name,
                                                        self.timeout)
                # No zero-page detection in the channels: _send_block has scanned the
                # image (which does not change) and queues only pages to send with data.
                self.sender = Sender(chans, uuid=self.uuid, layout=self.profile.layout,
                                     compression=self.compression)
                self.sender.start()
            elif tls is not None:
                self.sock = connect_tls(addr, tls, self.timeout)
            else:
                self.sock = connect(addr, self.timeout)
            self.sock.settimeout(self.timeout)
            sock = self.sock
            self.main = MainStreamWriter(lambda bufs: sendmsg_all(sock, bufs))
        elif self.n:
            raise PeerError(f"multifd needs a tcp: or unix: URI, not {uri}")
        else:
            self.stream = open_stream(addr, "w")
            stream = self.stream
            self.main = MainStreamWriter(lambda bufs: sendmsg_all(stream, bufs))

    def send_all(self) -> None:
        img = self.image
        main = self.main
        assert main is not None
        if self.sender is None:
            for chunk in image_chunks(img):
                main.write(chunk)
            main.flush()
            for b in img.blocks.values():
                z = int(zero_mask(b).sum())
                self.zero += z
                self.normal += b.num_pages - z
            return
        main.write(encode_record(FileHeader()) + img.configuration)
        main.write(section_start(img))
        self._sync()
        main.write(section_close(img))
        main.flush()
        main.write(section_open(img, SectionType.PART))
        for name, block in img.blocks.items():
            self._send_block(block, img.block_lengths[name])
        self._sync()
        main.write(section_close(img))
        if img.switchover_start:
            main.write(SWITCHOVER_START)
        main.write(section_open(img, SectionType.END))
        if self.profile.sync_per_section:  # 7.2: every RAM EOS is a barrier
            self._sync()
        main.write(section_close(img))
        main.write(img.tail)
        main.flush()

    def _send_block(self, block: RamBlock, used: int) -> None:
        """Every page of `block` once: zero pages as ZERO records (legacy), not at all
        (multifd) or as normal pages (none), the others in packets. Scanned a window at a
        time, so the channels start at once and the scan overlaps their sending (a whole
        2 GiB block takes ~70 ms to scan)."""
        assert self.sender is not None and self.main is not None
        npages = used // block.page_size
        ps = np.uint64(block.page_size)
        batch = page_count(block.page_size)
        slot = self.sender.new_slot()
        named = False
        mode = self.zero_mode
        for start in range(0, npages, SCAN_WINDOW_PAGES):
            idx = np.arange(start, min(start + SCAN_WINDOW_PAGES, npages), dtype=np.int64)
            # none: no page is looked at, every one goes with its data
            zero = (np.zeros(idx.size, dtype=bool) if mode == "none"
                    else block.zero_pages(idx))
            nz = int(np.count_nonzero(zero))
            self.zero += nz
            # multifd: a QEMU >= 9.0 destination ignores a zero page it has never received
            # (multifd_recv_zero_page_process only marks it received), and an image goes
            # out in one pass: every zero page would be such a page, so none is sent.
            if nz and mode == "legacy":
                self.main.write(encode_zero_run(block.name, idx[zero].astype(np.uint64) * ps,
                                                first_continues=named))
                named = True
            pages = idx[~zero].astype(np.uint64) * ps
            self.normal += int(pages.size)
            for pos in range(0, pages.size, batch):
                slot.payload(RamPayload).fill(block, pages[pos : pos + batch])
                slot = self.sender.send(slot, timeout=self.timeout)

    def _sync(self) -> None:
        """One SYNC per channel, then the marker, flushed before any more pages."""
        assert self.sender is not None and self.main is not None
        self.sender.sync(timeout=self.timeout)
        if not self.profile.sync_per_section:
            self.main.write(encode_ram_record(RamMultifdFlush()))
            self.main.flush()

    def finish(self) -> None:
        """Close the channels, then wait until the destination closes the main channel."""
        if self.sender is not None:
            self.sender.close(timeout=self.timeout)
            err = self.sender.error
            if err is not None:
                raise err
        self.t_sent = time.monotonic()
        if self.stream is not None:
            self.stream.close()
            self.stream = None
            return
        sock = self.sock
        assert sock is not None
        sock.shutdown(socket.SHUT_WR)
        scratch = bytearray(4096)
        while True:
            try:
                n = sock.recv_into(scratch)
            except TimeoutError:
                raise _LoadTimeout from None
            if n == 0:
                return

    def channel_bytes(self) -> int:
        if self.sender is None:
            return 0
        return sum_channel_stats(self.sender.channel_stats()).get("wire_bytes", 0) + 64 * self.n

    def close(self) -> None:
        if self.sender is not None:
            self.sender.abort("closing")
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
        if self.stream is not None:
            with contextlib.suppress(OSError):
                self.stream.close()


def migrate_to_qemu(
    image: VmImage,
    uri: str,
    *,
    profile: Profile,
    channels: int = 0,
    compression: str = "none",
    uuid: bytes | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    tls: TlsConfig | None = None,
    zero_page_detection: str | None = None,
    observe: Callable[[Any], None] | None = None,
) -> TransferStats:
    """Be the source towards a QEMU destination listening on `uri`; send `image`.

    `channels`/`compression` must match the destination's multifd settings and the UUID
    (explicit, else the image's configuration uuid, else zeros) its `-uuid`.
    `zero_page_detection` is QEMU's parameter for the multifd path (None: the profile's
    default, multifd for qemu-10 and legacy for qemu-7.2, which refuses multifd).
    `observe(transfer)` gets the transfer object at once (a timeline samples it). Returns
    once the destination has closed the main channel. Raises PeerError.
    """
    _check_options(channels, compression)
    zero_mode = _zero_page_mode(profile, channels, zero_page_detection)
    want = resolve_uuid(uuid, image.uuid)
    t0 = time.monotonic()
    out = _Outgoing(image, profile, channels, compression, want, timeout, zero_mode)
    out.tls = tls  # type: ignore[attr-defined]
    if observe is not None:
        observe(out)
    hint = (f" (check the destination's multifd-channels = {channels}, "
            f"multifd-compression = {compression}, -uuid = {_uuid_text(want)}, "
            f"machine type = {image.machine})")
    try:
        out.open(uri)
        out.send_all()
        out.finish()
    except PeerError:
        raise
    except _LoadTimeout:
        raise PeerError(f"the destination did not finish loading within {timeout:g} s "
                        f"after everything was sent{hint}") from None
    except TimeoutError:
        raise PeerError(f"the destination stopped reading for {timeout:g} s{hint}") from None
    except TlsClosedError as e:  # maybe a certificate refusal: the other suspects stay
        raise PeerError(f"{e}{hint}") from None
    except TlsError as e:  # it names the channel and what TLS saw: no multifd hint
        raise PeerError(str(e)) from None
    except MultifdError as e:
        text = str(e)
        tls_text = _tls_failure(text, hint)
        if tls_text is not None:
            raise PeerError(tls_text) from None
        if "timed out" in text:
            raise PeerError(f"the destination stopped reading multifd data for "
                            f"{timeout:g} s{hint}") from None
        raise PeerError(f"{text}{hint}") from None
    except (BrokenPipeError, ConnectionResetError) as e:
        raise PeerError(f"the destination closed the connection ({e.strerror or e}){hint}"
                        ) from None
    except OSError as e:
        raise PeerError(f"cannot migrate to {uri}: {e.strerror or e}{hint}") from None
    finally:
        stats_bytes = out.channel_bytes()
        out.close()
    assert out.main is not None
    return TransferStats(
        machine=image.machine, blocks=dict(image.block_lengths), normal_pages=out.normal,
        zero_pages=out.zero, channels=channels, compression=compression,
        main_bytes=out.main.bytes_written, channel_bytes=stats_bytes,
        time_ms=(time.monotonic() - t0) * 1000,
        sent_ms=(out.t_sent - t0) * 1000 if out.t_sent else None)


# ----------------------------------------------------------------------------- helpers


def _describe(e: BaseException) -> str:
    if isinstance(e, WireError):
        return e.describe()
    return str(e) or type(e).__name__


def _tls_failure(text: str, hint: str) -> str | None:
    """A channel's TLS failure as the Sender words it ("multifd channel N failed:
    TlsError: ...") in the words of the main channel's: a close that may be a certificate
    refusal keeps ``hint`` (other causes look the same), a named TLS failure drops it."""
    for name, keep_hint in (("TlsClosedError", True), ("TlsError", False)):
        tag = f": {name}: "
        if tag in text:
            return text.replace(tag, ": ", 1) + (hint if keep_hint else "")
    return None


def _count_hint(channels: int) -> str:
    return (f" (we expect {'multifd off' if not channels else f'{channels} multifd channels'}"
            "; check the source's multifd capability and multifd-channels)")


def _channel_hint(text: str, compression: str) -> str:
    if "flags" in text or "compression" in text:
        return f"{text} (we expect multifd-compression {compression})"
    return text
