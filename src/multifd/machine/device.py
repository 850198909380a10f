"""Non-RAM state: the Device interface a user implements (the migration wraps each device
in a save handler, migration/sections.py or migration/device_state.py).

How the migration drives a device (source side):

* every device: ``save_state()`` goes out as a main-stream section at switchover (QEMU's
  vmstate) and is loaded with ``load_state(data, version_id)``;
* a live device (``is_live()``): ``save_setup()`` at setup, ``save_iterate(False)`` while
  it has ``pending()`` bytes, then ``save_iterate(True)`` after the pause until it says done
  (destination: ``load_setup`` / ``load_iterate`` in stream order);
* a device with ``uses_multifd_state()`` (and a profile that allows it) sends its bulk state
  through the multifd channels instead of ``save_iterate``: a save job on the WorkerPool
  iterates ``save_state_buffers(final)``; the caller numbers the buffers 0, 1, 2... across
  the whole migration and flags the very last buffer of the ``final=True`` call as
  CONFIG_STATE. The destination calls ``load_state_buffer(idx, data, config)`` from
  channel threads (any order), runs ``load_state_job(abort)`` on a load worker (applies in
  index order) and ``finish_load()`` before the machine resumes.

``save_state()`` of a live or multifd-state device must carry only what its other path does
not. :class:`StateBufferQueue` is the reusable destination-side reassembler.

Before anything is accepted, the destination calls every device's
``check_incoming(secure=...)`` (secure: the channel authenticates the source, i.e. TLS), so
a device that must not load from an unauthenticated peer refuses up front:
:class:`PickleDevice` does (see its trust model).
"""

from __future__ import annotations

import abc
import hashlib
import pickle
import threading
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["BytesDevice", "Device", "DeviceStateError", "PickleDevice", "StateBufferQueue"]

# Fixed, not HIGHEST_PROTOCOL: source and destination may run different Pythons.
PICKLE_PROTOCOL = 5


class DeviceStateError(Exception):
    """Device state could not be saved or loaded (bad buffer index, size, version...)."""


class Device(abc.ABC):
    """Base class for anything besides RAM that migrates. Override what you use."""

    idstr: str
    instance_id: int = 0
    version_id: int = 1

    # -- main-stream (small) state ---------------------------------------------------------

    @abc.abstractmethod
    def save_state(self) -> bytes:
        """Small state sent as a main-stream section at switchover."""

    @abc.abstractmethod
    def load_state(self, data: bytes, version_id: int) -> None:
        """Apply a main-stream section written by ``save_state`` of ``version_id``."""

    # -- live iteration on the main stream -------------------------------------------------

    def is_live(self) -> bool:
        """True if the device takes part in setup/iterate (like RAM)."""
        return False

    def pending(self) -> int:
        """Bytes still to send in the live phase (estimate; exact when paused)."""
        return 0

    def save_setup(self) -> bytes:
        """Setup-section payload; a live device also starts its dirty tracking here."""
        return b""

    def save_iterate(self, final: bool) -> tuple[bytes, bool]:
        """Payload for one PART (``final=False``) or END section, and whether done."""
        return b"", True

    def load_setup(self, data: bytes) -> None:
        """Destination side of ``save_setup``."""
        return None

    def load_iterate(self, data: bytes) -> None:
        """Destination side of ``save_iterate`` (called in stream order)."""
        return None

    # -- device state over multifd (issue 4) -----------------------------------------------

    def uses_multifd_state(self) -> bool:
        """True if the bulk state should travel as multifd device-state packets."""
        return False

    def save_state_buffers(self, final: bool) -> Iterator[Any]:
        """Cut (dirty) state into non-empty buffers; runs on a pool worker.

        A buffer is bytes-like, or a tuple of bytes-like parts that travel as one buffer
        (gathered by the channel, never joined: hand out views of your memory, no copy).
        With ``final=True`` (machine paused) it yields everything left and at least one
        buffer; the last one is sent flagged CONFIG_STATE.
        """
        return iter(())

    def load_state_buffer(self, idx: int, data: bytes, config: bool) -> None:
        """Accept buffer ``idx`` (any order, any channel thread); may block for memory."""
        raise DeviceStateError(f"device {self.idstr!r} does not accept multifd state buffers")

    def load_state_job(self, abort: threading.Event) -> None:
        """Runs on a load worker: apply received buffers in index order until CONFIG_STATE."""
        return None

    def finish_load(self) -> None:
        """Called before the destination resumes; raise if state is incomplete."""
        return None

    def abort_load(self) -> None:
        """The migration failed: wake anything blocked in load_state_buffer / the load job."""
        return None

    def load_progress(self) -> str | None:
        """What has not arrived, for an error message (None: nothing known missing; the
        destination then waits for the load job instead of failing)."""
        return None

    def check_incoming(self, *, secure: bool) -> None:
        """Called on the destination before the migration is accepted; ``secure``: the
        channel authenticates the source (TLS). Raise to refuse the migration."""
        return None

    # -- verification ----------------------------------------------------------------------

    def checksum(self) -> str:
        """Digest of the device's whole state (defaults to ``save_state()``)."""
        return hashlib.sha256(self.save_state()).hexdigest()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.idstr!r}/{self.instance_id} v{self.version_id}>"


def join_buffer(buf: Any) -> bytes:
    """One device-state buffer as contiguous bytes (parts joined), for in-process users;
    the migration engine sends the parts by gather instead."""
    if isinstance(buf, tuple | list):
        return b"".join(bytes(p) for p in buf)
    return bytes(buf)


def _check_version(device: Device, version_id: int) -> None:
    if version_id > device.version_id:
        raise DeviceStateError(
            f"device {device.idstr!r}: state version {version_id} newer than "
            f"supported {device.version_id}")


class BytesDevice(Device):
    """A non-live device whose whole state is one bytes object (tests, small devices)."""

    def __init__(
        self, idstr: str, data: bytes = b"", *, instance_id: int = 0, version_id: int = 1
    ) -> None:
        self.idstr = idstr
        self.instance_id = instance_id
        self.version_id = version_id
        self.data = bytes(data)

    def save_state(self) -> bytes:
        return self.data

    def load_state(self, data: bytes, version_id: int) -> None:
        _check_version(self, version_id)
        self.data = bytes(data)


class PickleDevice(Device):
    """A plain Python object, pickled at switchover (a main-stream section) and handed to
    ``set`` on the destination; ``get`` returns the object to send.

    Trust model: unpickling runs whatever code the bytes ask for, so the state must come
    from a trusted source over a channel that proves it. The destination refuses to load
    (before accepting the migration, and again at load) unless the migration uses TLS
    (``tls-creds``, which authenticates the source) or ``allow_pickle=True`` says the
    network path is trusted anyway (same host, private link). The source side needs no
    opt-in. Keep the object small: it is sent while the machine is paused (downtime).
    """

    def __init__(
        self,
        idstr: str,
        get: Callable[[], Any],
        set: Callable[[Any], None],
        *,
        allow_pickle: bool = False,
        instance_id: int = 0,
        version_id: int = 1,
    ) -> None:
        self.idstr = idstr
        self.instance_id = instance_id
        self.version_id = version_id
        self.allow_pickle = allow_pickle
        self._get = get
        self._set = set
        self._secure = False

    def save_state(self) -> bytes:
        return pickle.dumps(self._get(), protocol=PICKLE_PROTOCOL)

    def check_incoming(self, *, secure: bool) -> None:
        self._secure = secure
        self._refuse_untrusted()

    def _refuse_untrusted(self) -> None:
        if not (self._secure or self.allow_pickle):
            raise DeviceStateError(
                f"PickleDevice {self.idstr!r}: refusing to unpickle state from a migration "
                f"without TLS (unpickling runs code chosen by the sender); use TLS "
                f"(tls-creds), or PickleDevice(..., allow_pickle=True) if the source and "
                f"the path to it are trusted")

    def load_state(self, data: bytes, version_id: int) -> None:
        self._refuse_untrusted()
        _check_version(self, version_id)
        try:
            obj = pickle.loads(data)
        except Exception as exc:
            raise DeviceStateError(
                f"PickleDevice {self.idstr!r}: state does not unpickle: {exc}") from exc
        self._set(obj)


class StateBufferQueue:
    """Destination-side reassembly of one device's multifd state buffers.

    ``put`` is called from channel threads in any order; ``drain`` yields the buffers in
    index order on the load worker. Errors: duplicate index, index past the CONFIG_STATE
    buffer, a second CONFIG_STATE. Back-pressure: while more than ``max_pending_bytes`` are
    queued out of order, ``put`` blocks, except for the next index to apply (which always
    gets in, so the load job can always progress).
    """

    def __init__(self, owner: str, *, max_pending_bytes: int = 64 << 20) -> None:
        self.owner = owner
        self.max_pending_bytes = max_pending_bytes
        self._cond = threading.Condition()
        self._pending: dict[int, tuple[bytes, bool]] = {}
        self._pending_bytes = 0
        self._next = 0
        self._config_idx: int | None = None
        self._aborted = False
        self.peak_pending_bytes = 0

    @property
    def next_index(self) -> int:
        """Index of the next buffer ``drain`` will yield."""
        return self._next

    @property
    def complete(self) -> bool:
        """True once the CONFIG_STATE buffer has been yielded by ``drain``."""
        return self._config_idx is not None and self._next > self._config_idx

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    def put(self, idx: int, data: bytes, config: bool) -> None:
        """Store buffer ``idx``; raises DeviceStateError on a duplicate or late index."""
        if idx < 0:
            raise DeviceStateError(f"device {self.owner!r}: negative buffer index {idx}")
        with self._cond:
            self._validate(idx, config)
            while (
                idx != self._next
                and self._pending_bytes + len(data) > self.max_pending_bytes
                and self._pending
                and not self._aborted
            ):
                self._cond.wait()
                self._validate(idx, config)
            if self._aborted:
                raise DeviceStateError(f"device {self.owner!r}: load aborted")
            if config:
                if any(i > idx for i in self._pending):
                    raise DeviceStateError(
                        f"device {self.owner!r}: CONFIG_STATE buffer {idx} is not the last "
                        f"(buffer {max(self._pending)} already received)"
                    )
                self._config_idx = idx
            self._pending[idx] = (data, config)
            self._pending_bytes += len(data)
            self.peak_pending_bytes = max(self.peak_pending_bytes, self._pending_bytes)
            self._cond.notify_all()

    def _validate(self, idx: int, config: bool) -> None:
        if idx < self._next or idx in self._pending:
            raise DeviceStateError(f"device {self.owner!r}: duplicate state buffer idx={idx}")
        if self._config_idx is not None:
            if config:
                raise DeviceStateError(
                    f"device {self.owner!r}: second CONFIG_STATE buffer idx={idx} "
                    f"(first was idx={self._config_idx})"
                )
            if idx > self._config_idx:
                raise DeviceStateError(
                    f"device {self.owner!r}: state buffer idx={idx} past the final "
                    f"CONFIG_STATE idx={self._config_idx}"
                )

    def drain(
        self, abort: threading.Event | None = None, *, block: bool = True
    ) -> Iterator[tuple[int, bytes, bool]]:
        """Yield ``(idx, data, config)`` in index order until the CONFIG_STATE buffer.

        With ``block=False`` it stops at the first gap instead of waiting. Raises
        DeviceStateError if ``abort`` is set (or :meth:`abort` was called) while waiting.
        """
        while not self.complete:
            with self._cond:
                while self._next not in self._pending:
                    if self._aborted or (abort is not None and abort.is_set()):
                        raise DeviceStateError(f"device {self.owner!r}: load aborted")
                    if not block:
                        return
                    self._cond.wait(0.05 if abort is not None else None)
                data, config = self._pending.pop(self._next)
                idx = self._next
                self._next += 1
                self._pending_bytes -= len(data)
                self._cond.notify_all()
            yield idx, data, config

    def abort(self) -> None:
        """Wake every waiter; puts and drains then raise DeviceStateError."""
        with self._cond:
            self._aborted = True
            self._pending.clear()
            self._pending_bytes = 0
            self._cond.notify_all()

    def reset(self) -> None:
        """Forget everything (a new incoming migration)."""
        with self._cond:
            self._pending.clear()
            self._pending_bytes = 0
            self._next = 0
            self._config_idx = None
            self._aborted = False
            self.peak_pending_bytes = 0
            self._cond.notify_all()

    def missing(self) -> str | None:
        """The first buffer that has not arrived (None: every one up to CONFIG_STATE is
        applied or held, so the load job only has work left, nothing to wait for)."""
        with self._cond:
            if self._aborted:
                return "load aborted"
            if self._config_idx is None:
                return (f"CONFIG_STATE buffer never arrived ({self._next} applied, "
                        f"{len(self._pending)} held)")
            for i in range(self._next, self._config_idx + 1):
                if i not in self._pending:
                    return f"buffer idx={i} never arrived (final idx={self._config_idx})"
        return None

    def check_complete(self) -> None:
        """Raise DeviceStateError unless every buffer up to CONFIG_STATE was applied."""
        if self._config_idx is None:
            raise DeviceStateError(
                f"device {self.owner!r}: CONFIG_STATE buffer never arrived "
                f"({self._next} buffer(s) applied)"
            )
        if not self.complete:
            raise DeviceStateError(
                f"device {self.owner!r}: missing state buffer idx={self._next} "
                f"(final idx={self._config_idx})"
            )
