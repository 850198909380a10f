"""Draw a migration timeline (migration/timeline.py's document) as one PNG.

Top: remaining bytes (left axis) with throughput and dirty rate (right axis, MiB/s),
pass boundaries as thin lines, the switchover as a red line and the downtime shaded.
Bottom: one lane per multifd channel per side, dark where the channel was busy (the
darker, the larger the busy fraction of that interval), empty where it was idle.

Imports matplotlib (the optional extra ``multifd[plot]``); only
commands/timeline_options.py imports this module, and only to draw.
"""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display needed

import matplotlib.pyplot as plt

__all__ = ["draw"]

MiB = 1 << 20
_SIDE_COLOURS = {"source": "tab:blue", "destination": "tab:green"}


def draw(doc: dict[str, Any], path: str) -> None:
    """Write the picture of ``doc`` to ``path`` (PNG)."""
    samples = doc.get("samples") or []
    lanes = [(side, lane) for side in ("source", "destination")
             for lane in (doc.get("channels") or {}).get(side, [])]
    fig, (top, bottom) = plt.subplots(
        2, 1, sharex=True, figsize=(11, 6 + 0.25 * len(lanes)),
        gridspec_kw={"height_ratios": [3, max(1, 0.35 * len(lanes))]})
    t = [s["t_ms"] / 1000 for s in samples]
    top.plot(t, [(s.get("remaining") or 0) / MiB for s in samples], color="black",
             label="remaining (MiB)")
    top.set_ylabel("remaining (MiB)")
    rates = top.twinx()
    rates.plot(t, [s.get("throughput") or 0 for s in samples], color="tab:blue",
               label="throughput (MiB/s)")
    rates.plot(t, [s.get("dirty_rate") or 0 for s in samples], color="tab:orange",
               label="dirty rate (MiB/s)")
    rates.set_ylabel("MiB/s")
    for e in doc.get("events") or []:
        x = e["t_ms"] / 1000
        if e["event"] == "pass":
            for ax in (top, bottom):
                ax.axvline(x, color="grey", linewidth=0.6, linestyle=":")
        elif e["event"] == "pause":
            for ax in (top, bottom):
                ax.axvline(x, color="red", linewidth=1.2)
            top.annotate("switchover", (x, 1), xycoords=("data", "axes fraction"),
                         color="red", fontsize=8, ha="right", va="top", rotation=90)
    downtime = doc.get("downtime")
    if downtime:
        for ax in (top, bottom):
            ax.axvspan(downtime[0] / 1000, downtime[1] / 1000, color="red", alpha=0.15,
                       label="downtime" if ax is top else None)
    handles = top.get_legend_handles_labels()
    more = rates.get_legend_handles_labels()
    top.legend(handles[0] + more[0], handles[1] + more[1], loc="upper right", fontsize=8)
    top.set_title("migration timeline")
    for y, (side, lane) in enumerate(lanes):
        colour = _SIDE_COLOURS.get(side, "tab:grey")
        for t0, t1, frac in lane.get("busy", []):
            bottom.broken_barh([(t0 / 1000, (t1 - t0) / 1000)], (y - 0.4, 0.8),
                               facecolors=colour, alpha=max(0.15, min(1.0, frac)))
    bottom.set_yticks(range(len(lanes)))
    bottom.set_yticklabels([f"{side[:3]} ch{lane['channel']} ({lane.get('busy_pct', 0)}%)"
                            for side, lane in lanes], fontsize=8)
    bottom.set_ylim(-0.6, max(0.6, len(lanes) - 0.4))
    bottom.invert_yaxis()
    bottom.set_xlabel("time (s)")
    bottom.set_title("multifd channels: busy (dark) / idle", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
