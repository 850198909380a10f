"""What migrates: RAM blocks, devices, the machine's run state, and the device WorkerPool."""

from .device import BytesDevice, Device, DeviceStateError, PickleDevice, StateBufferQueue
from .machine import Machine, RunState, copy_state
from .ramblock import RamBlock
from .workers import Aborted, Job, WorkerError, WorkerPool

__all__ = [
    "Aborted",
    "BytesDevice",
    "Device",
    "DeviceStateError",
    "Job",
    "Machine",
    "PickleDevice",
    "RamBlock",
    "RunState",
    "StateBufferQueue",
    "WorkerError",
    "WorkerPool",
    "copy_state",
]
