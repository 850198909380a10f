"""The main migration stream (QEMU `migration/savevm.c`, `savevm.h`; qemu-reference.md §1).

Byte layout (all integers big-endian)::

    header        be32 0x5145564D "QEVM", be32 version 3
    configuration 0x07, be32 len, machine name, then 0x05 subsections in QEMU's order:
                  counted "configuration/target-page-bits" be32 1, be32 bits
                  counted "configuration/capabilities"     be32 1, be32 n, n counted names
                  counted "configuration/uuid"             be32 1, 16 bytes
    START/FULL    0x01|0x04, be32 section_id, counted idstr, be32 instance_id, be32 version
    PART/END      0x02|0x03, be32 section_id
    (body)        ram: RAM records until EOS (wire/ram.py); registered framings (e.g.
                  LENGTH_PREFIXED: be32 len + bytes); other devices: no length at all
    footer        0x7E, be32 section_id (must match the header's)
    command       0x08, be16 cmd, be16 len, payload (PACKAGED: then be32-L raw bytes)
    EOF           0x00, then optionally 0x06 VMDESCRIPTION: be32 len + JSON

Real QEMU device sections cannot be delimited without their vmstate description, so the
first section that is neither `ram` nor has a registered body framing starts the opaque
device tail: every byte from its type byte to the end is handed out as DeviceTail chunks
(wire/vmdesc.py can split it afterwards with the VMDESCRIPTION JSON).

Decoding is incremental (h11 style): receive_data(), receive_eof(), next_record() ->
record | NEED_DATA. Errors are WireError subclasses whose .offset is an absolute offset.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

from multifd.wire.buffer import NEED_DATA, NeedData, ReceiveBuffer, _NeedDataType
from multifd.wire.constants import (
    COMMAND_LENGTHS,
    QEMU_VM_FILE_MAGIC,
    QEMU_VM_FILE_VERSION,
    QEMU_VM_FILE_VERSION_COMPAT,
    RAM_SECTION_IDSTR,
    Command,
    SectionType,
)
from multifd.wire.errors import (
    BadCount,
    BadLength,
    BadMagic,
    BadName,
    BadRecordType,
    Mismatch,
    Truncated,
    UnsupportedVersion,
    WireError,
)
from multifd.wire.ram import (
    RamEos,
    RamRecord,
    RamRecordReader,
    RamSettings,
    encode_ram_record,
)

__all__ = [
    "LENGTH_PREFIXED",
    "BodyParser",
    "CommandRecord",
    "Configuration",
    "DeviceTail",
    "EndOfStream",
    "FileHeader",
    "LengthPrefixed",
    "MainStreamDecoder",
    "PackagedData",
    "SectionBody",
    "SectionFooter",
    "SectionHeader",
    "StreamRecord",
    "VmDescription",
    "encode_record",
]

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_HDR = struct.Struct(">II")

SUB_TARGET_PAGE_BITS = "configuration/target-page-bits"
SUB_CAPABILITIES = "configuration/capabilities"
SUB_UUID = "configuration/uuid"
_SUB_ORDER = (SUB_TARGET_PAGE_BITS, SUB_CAPABILITIES, SUB_UUID)
MAX_MACHINE_NAME = 1024
MAX_CAPABILITIES = 256
DEFAULT_TAIL_CHUNK = 64 * 1024


# --------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class FileHeader:
    version: int = QEMU_VM_FILE_VERSION


@dataclass(frozen=True, slots=True)
class Configuration:
    machine: str
    target_page_bits: int | None = None
    capabilities: tuple[str, ...] | None = None
    uuid: bytes | None = None


@dataclass(frozen=True, slots=True)
class SectionHeader:
    type: SectionType
    section_id: int
    idstr: str = ""  # START/FULL only
    instance_id: int = 0
    version_id: int = 0


@dataclass(frozen=True, slots=True)
class SectionFooter:
    section_id: int


@dataclass(frozen=True, slots=True)
class SectionBody:
    """A section body delimited by a registered framing (payload without the framing)."""

    data: bytes
    framing: str = "length-prefixed"


@dataclass(frozen=True, slots=True)
class CommandRecord:
    cmd: int
    payload: bytes = b""


@dataclass(frozen=True, slots=True)
class PackagedData:
    """The L raw bytes that follow a PACKAGED command (a nested section stream)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class EndOfStream:
    pass


@dataclass(frozen=True, slots=True)
class VmDescription:
    json: bytes


@dataclass(frozen=True, slots=True)
class DeviceTail:
    """An opaque chunk of the device tail (from the first undelimitable section on)."""

    data: bytes


StreamRecord = (
    FileHeader
    | Configuration
    | SectionHeader
    | SectionFooter
    | SectionBody
    | CommandRecord
    | PackagedData
    | EndOfStream
    | VmDescription
    | DeviceTail
    | RamRecord
)


# --------------------------------------------------------------------------- body framings


class BodyParser(Protocol):
    """How to find the end of a section body whose device we know."""

    name: str

    def read(self, buf: ReceiveBuffer, limit: int) -> bytes:
        """Take one body from buf (raise NeedData if incomplete); return its payload."""
        ...

    def encode(self, data: bytes) -> bytes: ...


class LengthPrefixed:
    """be32 length then that many bytes: the framing our own Python devices use."""

    name = "length-prefixed"

    def read(self, buf: ReceiveBuffer, limit: int) -> bytes:
        at = buf.offset
        n = buf.take_u32()
        if n > limit:
            raise BadLength("section body above the limit", field="len", value=n, offset=at)
        return buf.take(n)

    def encode(self, data: bytes) -> bytes:
        return _U32.pack(len(data)) + data


LENGTH_PREFIXED = LengthPrefixed()
BODY_FRAMINGS: dict[str, BodyParser] = {LENGTH_PREFIXED.name: LENGTH_PREFIXED}


# --------------------------------------------------------------------------- encoding


def _counted(text: str, what: str) -> bytes:
    raw = text.encode()
    if not 0 < len(raw) <= 255:
        raise BadName(f"{what} must be 1..255 bytes", field=what, value=text)
    return bytes((len(raw),)) + raw


def _sub(name: str) -> bytes:
    return bytes((SectionType.SUBSECTION,)) + _counted(name, "subsection") + _U32.pack(1)


def encode_configuration(cfg: Configuration) -> bytes:
    name = cfg.machine.encode()
    out = bytes((SectionType.CONFIGURATION,)) + _U32.pack(len(name)) + name
    if cfg.target_page_bits is not None:
        out += _sub(SUB_TARGET_PAGE_BITS) + _U32.pack(cfg.target_page_bits)
    if cfg.capabilities is not None:
        out += _sub(SUB_CAPABILITIES) + _U32.pack(len(cfg.capabilities))
        out += b"".join(_counted(c, "capability") for c in cfg.capabilities)
    if cfg.uuid is not None:
        if len(cfg.uuid) != 16:
            raise BadLength("uuid must be 16 bytes", field="uuid", value=len(cfg.uuid))
        out += _sub(SUB_UUID) + cfg.uuid
    return out


def encode_record(
    rec: StreamRecord,
    *,
    ram: RamSettings = RamSettings(),
    framings: Mapping[str, BodyParser] | None = None,
) -> bytes:
    """Bytes of one record, exactly as the decoder read them (RAM records via ram.py)."""
    if isinstance(rec, FileHeader):
        return _HDR.pack(QEMU_VM_FILE_MAGIC, rec.version)
    if isinstance(rec, Configuration):
        return encode_configuration(rec)
    if isinstance(rec, SectionHeader):
        t = SectionType(rec.type)
        if t in (SectionType.START, SectionType.FULL):
            return (
                bytes((t,)) + _U32.pack(rec.section_id) + _counted(rec.idstr, "idstr")
                + _HDR.pack(rec.instance_id, rec.version_id)
            )
        if t in (SectionType.PART, SectionType.END):
            return bytes((t,)) + _U32.pack(rec.section_id)
        raise BadRecordType("not a section header type", field="type", value=int(t))
    if isinstance(rec, SectionFooter):
        return bytes((SectionType.FOOTER,)) + _U32.pack(rec.section_id)
    if isinstance(rec, SectionBody):
        table = {**BODY_FRAMINGS, **(framings or {})}
        return table[rec.framing].encode(rec.data)
    if isinstance(rec, CommandRecord):
        head = _U16.pack(rec.cmd) + _U16.pack(len(rec.payload))
        return bytes((SectionType.COMMAND,)) + head + rec.payload
    if isinstance(rec, PackagedData | DeviceTail):
        return rec.data
    if isinstance(rec, EndOfStream):
        return bytes((SectionType.EOF,))
    if isinstance(rec, VmDescription):
        return bytes((SectionType.VMDESCRIPTION,)) + _U32.pack(len(rec.json)) + rec.json
    return encode_ram_record(rec, ram)


# --------------------------------------------------------------------------- decoding


class _S(enum.Enum):
    HEADER = "file header"
    CONFIG = "configuration"
    MAIN = "section"
    RAM = "ram section"
    BODY = "section body"
    FOOTER = "section footer"
    PACKAGED = "packaged data"
    AFTER_EOF = "vmdescription"
    DONE = "end"
    TAIL = "device tail"


class MainStreamDecoder:
    """Incremental decoder of a main migration stream.

    States: HEADER -> [CONFIG] -> MAIN; MAIN dispatches START/FULL/PART/END (ram -> RAM
    records until EOS, registered framings -> SectionBody; each followed by FOOTER),
    COMMAND, EOF -> AFTER_EOF (optional VMDESCRIPTION) -> DONE; an undelimitable device
    section switches to TAIL for good.
    """

    def __init__(
        self,
        *,
        ram: RamSettings = RamSettings(),
        blocks: Mapping[str, int] | None = None,
        body_parsers: Mapping[str, BodyParser] | None = None,
        opaque_tail: bool = True,
        max_vmdesc: int = 64 * 1024 * 1024,
        max_record: int = 16 * 1024 * 1024,
        allow_switchover_start: bool = True,
        expect_configuration: bool = True,
        section_footers: bool = True,
        tail_chunk: int = DEFAULT_TAIL_CHUNK,
        base_offset: int = 0,
    ) -> None:
        self._buf = ReceiveBuffer(base_offset)
        self._given_ram = ram
        self.ram_settings = ram
        self._blocks = blocks
        self.ram_reader = RamRecordReader(ram, blocks)
        self._parsers = dict(body_parsers or {})
        self._opaque_tail = opaque_tail
        self._max_vmdesc = max_vmdesc
        self._max_record = max_record
        self._allow_cmd11 = allow_switchover_start
        self._expect_config = expect_configuration
        self._footers = section_footers
        self._tail_chunk = max(1, tail_chunk)
        self._state = _S.HEADER
        self._section: SectionHeader | None = None  # the open section
        self._sections: dict[int, SectionHeader] = {}  # START headers by section id
        self._packaged_left = 0
        self._error: WireError | None = None
        self.configuration: Configuration | None = None
        self.tail_offset: int | None = None  # absolute offset where the device tail starts

    # -- feeding
    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self._buf.closed:
            raise RuntimeError("receive_data after receive_eof")
        if data:
            self._buf.feed(data)

    def receive_eof(self) -> None:
        self._buf.close()

    @property
    def offset(self) -> int:
        """Absolute offset of the next byte to decode."""
        return self._buf.offset

    @property
    def finished(self) -> bool:
        """The stream ended where a stream may end (after EOF [+vmdesc], or in the tail)."""
        return self._buf.closed and self._buf.available == 0 and self._state in (
            _S.AFTER_EOF, _S.DONE, _S.TAIL)

    def seek_past_region(self) -> int:
        """Seekable input (a mapped-ram file), after NEED_DATA: the bytes of a pending
        block-region skip that were not fed. The caller reads on that much further; the
        decoder's offsets stay file offsets. 0 when no skip is pending."""
        n = self.ram_reader.take_skip()
        if not n:
            return 0
        buf = self._buf
        fed = min(n, buf.available)
        buf.skip(fed)
        buf.commit()
        buf.jump(n - fed)
        return n - fed

    @property
    def in_tail(self) -> bool:
        return self._state is _S.TAIL

    # -- decoding
    def next_record(self) -> StreamRecord | _NeedDataType:
        if self._error is not None:
            raise self._error
        buf = self._buf
        while True:
            try:
                rec = self._step(buf)
            except NeedData:
                buf.rollback()
                if buf.closed and not self._may_end():
                    err = self._truncated()
                    self._error = err
                    raise err from None
                return NEED_DATA
            except WireError as e:
                self._error = e.at(buf.record_offset)
                raise
            buf.commit()
            if rec is not None:
                return rec

    def __iter__(self) -> Iterator[StreamRecord]:
        """The records decodable now (until NEED_DATA)."""
        while True:
            rec = self.next_record()
            if rec is NEED_DATA:
                return
            yield rec

    def _may_end(self) -> bool:
        return self._buf.available == 0 and self._state in (_S.AFTER_EOF, _S.DONE, _S.TAIL)

    def _truncated(self) -> Truncated:
        buf = self._buf
        if buf.available == 0 and self._state is _S.MAIN:
            return Truncated("stream ended before QEMU_VM_EOF", offset=buf.offset)
        what = self._state.value
        if self._state is _S.RAM and self.ram_reader.in_mem_size:
            what = "RAM block list"
        return Truncated(f"stream ended inside the {what}", offset=buf.record_offset)

    def _step(self, buf: ReceiveBuffer) -> StreamRecord | None:
        st = self._state
        if st is _S.RAM:
            rec = self.ram_reader.read(buf)
            if isinstance(rec, RamEos):
                self._state = _S.FOOTER if self._footers else _S.MAIN
            return rec
        if st is _S.MAIN:
            return self._main(buf)
        if st is _S.FOOTER:
            return self._footer(buf)
        if st is _S.TAIL:
            if buf.available == 0:
                raise NeedData
            return DeviceTail(buf.take_upto(self._tail_chunk))
        if st is _S.BODY:
            assert self._section is not None
            parser = self._parsers[self._sections[self._section.section_id].idstr]
            data = parser.read(buf, self._max_record)
            self._state = _S.FOOTER if self._footers else _S.MAIN
            return SectionBody(data, parser.name)
        if st is _S.PACKAGED:
            data = buf.take(self._packaged_left)
            self._state = _S.MAIN
            return PackagedData(data)
        if st is _S.HEADER:
            return self._header(buf)
        if st is _S.CONFIG:
            return self._configuration(buf)
        if st is _S.AFTER_EOF:
            at = buf.offset
            t = buf.take_u8()
            if t != SectionType.VMDESCRIPTION:
                raise BadRecordType("unexpected record after QEMU_VM_EOF", field="type",
                                    value=t, offset=at)
            n = buf.take_u32()
            if n > self._max_vmdesc:
                raise BadLength("VMDESCRIPTION above the limit", field="len", value=n,
                                offset=at + 1)
            data = buf.take(n)
            self._state = _S.DONE
            return VmDescription(data)
        # DONE
        at = buf.offset
        t = buf.take_u8()
        raise BadRecordType("data after the VMDESCRIPTION", field="type", value=t, offset=at)

    def _header(self, buf: ReceiveBuffer) -> FileHeader:
        magic = buf.take_u32()
        if magic != QEMU_VM_FILE_MAGIC:
            raise BadMagic("not a QEMU migration stream", field="magic", value=magic,
                           offset=buf.record_offset)
        version = buf.take_u32()
        if version == QEMU_VM_FILE_VERSION_COMPAT:
            raise UnsupportedVersion("obsolete stream version", field="version",
                                     value=version, offset=buf.record_offset + 4)
        if version != QEMU_VM_FILE_VERSION:
            raise UnsupportedVersion("unsupported stream version", field="version",
                                     value=version, offset=buf.record_offset + 4)
        self._state = _S.CONFIG
        return FileHeader(version)

    def _configuration(self, buf: ReceiveBuffer) -> Configuration | None:
        at = buf.offset
        if buf.peek_u8() != SectionType.CONFIGURATION:
            if self._expect_config:
                raise BadRecordType("expected the configuration section", field="type",
                                    value=buf.peek_u8(), offset=at)
            self._state = _S.MAIN
            return None
        buf.take_u8()
        n = buf.take_u32()
        if n > MAX_MACHINE_NAME:
            raise BadLength("machine name too long", field="len", value=n, offset=at + 1)
        raw = buf.take(n)
        try:
            machine = raw.decode()
        except UnicodeDecodeError:
            raise BadName("machine name is not UTF-8", field="machine", value=raw,
                          offset=at + 5) from None
        found: dict[str, object] = {}
        last = -1
        while True:
            try:
                t = buf.peek_u8()
            except NeedData:
                if buf.closed:
                    break  # a complete configuration; what follows is missing
                raise
            if t != SectionType.SUBSECTION:
                break
            sat = buf.offset
            buf.take_u8()
            sraw = buf.take_counted()
            name = sraw.decode(errors="replace")
            if name not in _SUB_ORDER:
                raise BadName("unknown configuration subsection", field="subsection",
                              value=name, offset=sat)
            idx = _SUB_ORDER.index(name)
            if idx <= last:
                raise BadRecordType("configuration subsection out of order or repeated",
                                    field="subsection", value=name, offset=sat)
            last = idx
            ver = buf.take_u32()
            if ver != 1:
                raise UnsupportedVersion("configuration subsection version",
                                         field="version", value=ver, offset=sat)
            if name == SUB_TARGET_PAGE_BITS:
                found[name] = buf.take_u32()
            elif name == SUB_UUID:
                found[name] = buf.take(16)
            else:
                cat = buf.offset
                count = buf.take_u32()
                if count > MAX_CAPABILITIES:
                    raise BadCount("too many capabilities", field="caps_count", value=count,
                                   offset=cat)
                caps = []
                for _ in range(count):
                    nat = buf.offset
                    craw = buf.take_counted()
                    try:
                        caps.append(craw.decode())
                    except UnicodeDecodeError:
                        raise BadName("capability name is not UTF-8", field="capability",
                                      value=craw, offset=nat) from None
                found[name] = tuple(caps)
        cfg = Configuration(
            machine,
            found.get(SUB_TARGET_PAGE_BITS),  # type: ignore[arg-type]
            found.get(SUB_CAPABILITIES),  # type: ignore[arg-type]
            found.get(SUB_UUID),  # type: ignore[arg-type]
        )
        self.configuration = cfg
        self._apply_capabilities(cfg)
        self._state = _S.MAIN
        return cfg

    def _apply_capabilities(self, cfg: Configuration) -> None:
        """Validated capabilities in the stream switch the RAM block-list extras on."""
        caps = set(cfg.capabilities or ())
        s = self._given_ram
        mapped = s.mapped_ram or "mapped-ram" in caps
        shared = s.ignore_shared or "x-ignore-shared" in caps
        if (mapped, shared) != (s.mapped_ram, s.ignore_shared):
            from dataclasses import replace

            self.ram_settings = replace(s, mapped_ram=mapped, ignore_shared=shared)
            self.ram_reader.settings = self.ram_settings

    def _main(self, buf: ReceiveBuffer) -> StreamRecord | None:
        at = buf.offset
        t = buf.take_u8()
        if t in (SectionType.START, SectionType.FULL):
            sid = buf.take_u32()
            nat = buf.offset
            raw = buf.take_counted()
            instance, version = buf.take_u32(), buf.take_u32()
            if not raw:
                raise BadName("empty section idstr", field="idstr", value=raw, offset=nat)
            try:
                idstr = raw.decode()
            except UnicodeDecodeError:
                raise BadName("section idstr is not UTF-8", field="idstr", value=raw,
                              offset=nat) from None
            hdr = SectionHeader(SectionType(t), sid, idstr, instance, version)
            if idstr == RAM_SECTION_IDSTR:
                self._state = _S.RAM
            elif idstr in self._parsers:
                self._state = _S.BODY
            elif self._opaque_tail:
                buf.rollback()  # the tail starts at this section's type byte
                self._state = _S.TAIL
                self.tail_offset = at
                return None
            else:
                raise BadName("no parser for section", field="idstr", value=idstr, offset=nat)
            self._sections[sid] = hdr
            self._section = hdr
            return hdr
        if t in (SectionType.PART, SectionType.END):
            sid = buf.take_u32()
            start = self._sections.get(sid)
            if start is None:
                raise Mismatch("PART/END for a section that was never started",
                               field="section_id", value=sid, offset=at + 1)
            hdr = SectionHeader(SectionType(t), sid)
            self._section = hdr
            self._state = _S.RAM if start.idstr == RAM_SECTION_IDSTR else _S.BODY
            return hdr
        if t == SectionType.COMMAND:
            return self._command(buf, at)
        if t == SectionType.EOF:
            self._state = _S.AFTER_EOF
            return EndOfStream()
        what = {
            SectionType.CONFIGURATION: "configuration section after the first section",
            SectionType.VMDESCRIPTION: "VMDESCRIPTION before QEMU_VM_EOF",
            SectionType.FOOTER: "section footer outside a section",
            SectionType.SUBSECTION: "subsection marker outside a section",
        }.get(t, "unknown section type")  # type: ignore[call-overload]
        raise BadRecordType(what, field="type", value=t, offset=at)

    def _command(self, buf: ReceiveBuffer, at: int) -> CommandRecord:
        cmd = buf.take_u16()
        n = buf.take_u16()
        if not Command.OPEN_RETURN_PATH <= cmd <= Command.SWITCHOVER_START:
            raise BadRecordType("unknown command", field="cmd", value=cmd, offset=at + 1)
        if cmd == Command.SWITCHOVER_START and not self._allow_cmd11:
            raise BadRecordType("SWITCHOVER_START is not spoken by this peer (7.2)",
                                field="cmd", value=cmd, offset=at + 1)
        fixed = COMMAND_LENGTHS.get(cmd, -1)
        ok = n == fixed if fixed >= 0 else (n in (0, 16) if cmd == Command.POSTCOPY_ADVISE
                                            else True)
        if not ok:
            raise BadLength(f"bad length for command {Command(cmd).name}", field="len",
                            value=n, offset=at + 3)
        payload = buf.take(n)
        if cmd == Command.PACKAGED:
            size = _U32.unpack(payload)[0]
            if size > self._max_record:
                raise BadLength("PACKAGED length above the limit", field="len", value=size,
                                offset=at + 5)
            self._packaged_left = size
            self._state = _S.PACKAGED
        return CommandRecord(cmd, payload)

    def _footer(self, buf: ReceiveBuffer) -> SectionFooter:
        at = buf.offset
        t = buf.take_u8()
        if t != SectionType.FOOTER:
            raise BadRecordType("expected a section footer", field="type", value=t, offset=at)
        sid = buf.take_u32()
        assert self._section is not None
        if sid != self._section.section_id:
            raise Mismatch("Mismatched section id in footer", field="section_id", value=sid,
                           offset=at + 1)
        self._state = _S.MAIN
        self._section = None
        return SectionFooter(sid)
