"""Live checkpoint and restore of a running simulation, in QEMU's mapped-ram file format.

The simulation (heat spreading over a numpy grid, a band of rows per step) keeps its
state in a multifd `Machine`: the grid is a `Machine.array` (kernel write tracking: the
code just writes numpy) and the step counter a `PickleDevice`. Every ``--every`` steps
the script checkpoints it *live*: `MigrationSource` writes to ``file:`` with the
`mapped-ram` capability (RAM at fixed offsets, written by parallel channels) while the
simulation runs on; the simulation stops only for the switchover, then resumes. The file
is written beside the old checkpoint and renamed over it, so a crash mid-checkpoint
leaves the previous one.

`restore` loads a checkpoint into a fresh process and runs on. The result does not depend
on where the checkpoints were taken or whether the run was interrupted:

    python examples/checkpoint.py run --checkpoint ckpt.img --steps 3000 --stop-at 2000
    python examples/checkpoint.py restore --checkpoint ckpt.img --steps 3000
    python examples/checkpoint.py run --steps 3000        # same checksum, no checkpoint
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import threading
import time
from typing import Any

from multifd import Machine, MigrationDestination, MigrationSource, PickleDevice
from multifd.migration.params import MigrationCapabilities, MigrationParameters

BAND = 16  # rows updated per step


class Simulation:
    def __init__(self, grid: int, *, incoming: bool) -> None:
        self.machine = Machine(incoming=incoming)
        self.grid = self.machine.array("grid", (grid, grid), "float64")
        self.state: dict[str, Any] = {"step": 0}
        # A checkpoint file this script wrote is trusted: it is not a network peer.
        self.machine.add_device(PickleDevice("sim", lambda: self.state, self.state.update,
                                             allow_pickle=True))

    def step(self) -> None:
        g, s = self.grid, self.state["step"]
        n = g.shape[0]
        r = 1 + s % (n - 2 - BAND)
        rows = slice(r, r + BAND)
        g[rows, 1:-1] = 0.25 * (g[r - 1 : r + BAND - 1, 1:-1] + g[r + 1 : r + BAND + 1, 1:-1]
                                + g[rows, :-2] + g[rows, 2:])
        g[(s * 7919) % n, (s * 104729) % n] += 1.0
        self.state["step"] = s + 1

    def run(self, steps: int, stop_at: int | None, done: threading.Event) -> None:
        """The workload thread: one step between safe points (a pause waits for it)."""
        m = self.machine
        with m.workload():
            while self.state["step"] < steps and m.safe_point():
                if self.state["step"] == stop_at:
                    os._exit(3)  # a crash: no cleanup, no last checkpoint
                self.step()
        done.set()

    def checksum(self) -> str:
        return hashlib.sha256(self.grid.tobytes()).hexdigest()


def _caps() -> MigrationCapabilities:
    caps = MigrationCapabilities()
    caps.set([{"capability": "mapped-ram", "state": True},
              {"capability": "multifd", "state": True}])
    return caps


def checkpoint(sim: Simulation, path: str) -> dict[str, Any]:
    """Write a live checkpoint to `path` (atomically) and let the simulation go on."""
    tmp = path + ".tmp"
    params = MigrationParameters(**{"max-bandwidth": 0, "downtime-limit": 100})
    src = MigrationSource(sim.machine, params=params, caps=_caps())
    src.start(f"file:{tmp}")
    status = str(src.wait())
    sim.machine.resume()  # a saved machine stays paused (QEMU: postmigrate); run on
    if status != "completed":
        raise SystemExit(f"checkpoint failed: {src.error}")
    os.replace(tmp, path)
    return {"step": sim.state["step"], "pause_ms": round(src.downtime_ms, 1)}


def restore(sim: Simulation, path: str) -> None:
    dst = MigrationDestination(sim.machine, caps=_caps())
    dst.listen(f"file:{path}")
    if str(dst.wait()) != "completed":
        raise SystemExit(f"restore failed: {dst.error}")
    sim.machine.resume()  # a checkpoint of a running machine runs anyway; be explicit


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=("run", "restore"))
    p.add_argument("--grid", type=int, default=4096, help="grid side (float64 cells)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--checkpoint", metavar="FILE", help="checkpoint file")
    p.add_argument("--every", type=int, default=500, help="steps between checkpoints")
    p.add_argument("--stop-at", type=int, help="crash at this step (to try restore)")
    args = p.parse_args()
    sim = Simulation(args.grid, incoming=args.action == "restore")
    restored_from = None
    if args.action == "restore":
        if not args.checkpoint:
            p.error("restore needs --checkpoint")
        restore(sim, args.checkpoint)
        restored_from = sim.state["step"]
    else:
        sim.machine.start()
    done = threading.Event()
    worker = threading.Thread(target=sim.run, args=(args.steps, args.stop_at, done))
    worker.start()
    taken = []
    next_at = (sim.state["step"] // args.every + 1) * args.every
    while args.checkpoint and not done.is_set():
        if sim.state["step"] >= next_at:
            taken.append(checkpoint(sim, args.checkpoint))
            next_at = (sim.state["step"] // args.every + 1) * args.every
        time.sleep(0.001)
    worker.join()
    print(json.dumps({"step": sim.state["step"], "checksum": sim.checksum(),
                      "restored_from": restored_from, "checkpoints": taken}))
    sim.machine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
