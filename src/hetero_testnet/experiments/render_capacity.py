"""The report's capacity section: utilisation, and each client's device, idle share and bytes per step.

Shown only when the runs measured capacity (summary.json since issue 12), so reports of older runs
regenerate byte for byte. Clients are matched across seeds by client id (the same id has the same
tier and profile in every run of a configuration).
"""

from __future__ import annotations

from hetero_testnet.experiments.format import NA, fmt, fmt_ci, md_table
from hetero_testnet.experiments.report import Report
from hetero_testnet.experiments.stats import mean_ci


def capacity_section(report: Report) -> list[str]:
    if not any(r.utilisation is not None for c in report.configs for r in c.finished):
        return []
    header = ["configuration", "utilisation", "client", "tier", "device (speed)", "idle share",
              "emulated s / round", "MB sent / step"]
    rows = []
    for c in report.configs:
        runs = [r for r in c.finished if r.utilisation is not None]
        if not runs:
            continue
        clients = sorted({cid for r in runs for cid in r.capacity_by_client})
        for i, cid in enumerate(clients):
            got = [r.capacity_by_client[cid] for r in runs if cid in r.capacity_by_client]
            first = got[0]
            per_round = [g["emulated_s"] / g["rounds"] for g in got
                         if g.get("emulated_s") is not None and g.get("rounds")]
            sent = [g["bytes_sent_per_step"] / 1e6 for g in got if g.get("bytes_sent_per_step") is not None]
            tier = runs[0].client_tiers.get(cid)
            rows.append([f"`{c.label}`" if i == 0 else "", fmt_ci(mean_ci([r.utilisation for r in runs]), 3)
                         if i == 0 else "", str(cid), NA if tier is None else str(tier),
                         f"{first['profile']} ({first['speed']:g})",
                         fmt_ci(mean_ci([g["idle_share"] for g in got]), 3),
                         fmt(sum(per_round) / len(per_round), 3) if per_round else NA,
                         fmt(sum(sent) / len(sent), 3) if sent else NA])
    return ["## Capacity: utilisation, idle share and bytes per client", ""] + md_table(header, rows) + ["", "Utilisation = the clients' compute (the emulated hold of a slower device included) / (clients "
                    "x round wall time), over committed rounds; idle share = 1 - a client's compute / the wall time "
                    "of its rounds (waiting for the slowest and exchanging); emulated s / round = the hold its device "
                    "profile added (`run/throttle.py`); mean ± 95% CI over seeds where there are several.", ""]
