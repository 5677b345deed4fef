"""PNG plots of one run's results (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from ..plan import HEADLINE


def _save(fig: Any, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def ingest(rows: list[dict[str, Any]], out: Path) -> list[str]:
    b, c = HEADLINE
    head = [
        r
        for r in rows
        if r["batch"] == b
        and (r["conns"] == c or r["contender"] == "copy")
        and r["ack"] == "durable"
    ]
    files = []
    if head:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        labels = [r["label"] for r in head]
        pps = [r["stored_pps"] or r["acked_pps"] or 0 for r in head]
        colors = [
            "tab:blue"
            if r["contender"] == "service"
            else "tab:red"
            if r["contender"] == "naive"
            else "tab:gray"
            for r in head
        ]
        ax1.barh(labels, pps, color=colors)
        ax1.set_xlabel("pings/s (stored; decode: acked)")
        ax1.set_title(f"Ingest, batch {b}, {c} connections, durable")
        cpu = [r["server_cpu_per_100k"] or 0 for r in head]
        pg = [r["pg_cpu_per_100k"] or 0 for r in head]
        ax2.barh(labels, cpu, color=colors, label="process under test")
        ax2.barh(labels, pg, left=cpu, color="tab:olive", alpha=0.6, label="PostgreSQL backends")
        ax2.set_xlabel("CPU seconds per 100k pings")
        ax2.legend(loc="lower right", fontsize=8)
        files.append(_save(fig, out / "ingest_headline.png"))
    cells = sorted({(r["batch"], r["conns"], r["ack"]) for r in rows if r["contender"] != "copy"})
    keys = [
        k
        for k in ("service", "naive", "pipeline", "decode")
        if any(r["contender"] == k for r in rows)
    ]
    if len(cells) > 1:
        fig, ax = plt.subplots(figsize=(11, 4))
        width = 0.8 / len(keys)
        for i, k in enumerate(keys):
            vals = []
            for bb, cc, ack in cells:
                r = next(
                    (
                        x
                        for x in rows
                        if x["contender"] == k
                        and (x["batch"], x["conns"], x["ack"]) == (bb, cc, ack)
                    ),
                    None,
                )
                vals.append((r["stored_pps"] or r["acked_pps"] or 0) if r else 0)
            ax.bar([j + i * width for j in range(len(cells))], vals, width, label=k)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cells))])
        ax.set_xticklabels([f"b{bb} c{cc}\n{ack}" for bb, cc, ack in cells])
        ax.set_ylabel("pings/s")
        ax.set_yscale("log")
        ax.legend()
        ax.set_title("Ingest matrix (stored pings/s; decode: acked)")
        files.append(_save(fig, out / "ingest_matrix.png"))
    return files


def fanout(rows: list[dict[str, Any]], out: Path) -> list[str]:
    if not rows:
        return []
    phases = sorted({(r["subscribers"], r["pattern"]) for r in rows})
    modes = [
        m for m in ("service", "frame", "send_str", "encode") if any(r["mode"] == m for r in rows)
    ]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / len(modes)
    for i, m in enumerate(modes):
        us, p99 = [], []
        for n, kind in phases:
            r = next(
                (
                    x
                    for x in rows
                    if x["mode"] == m and (x["subscribers"], x["pattern"]) == (n, kind)
                ),
                None,
            )
            us.append((r["us_per_delivery"] or 0) if r else 0)
            p99.append((r["latency_ms"]["p99"] or 0) if r else 0)
        xs = [j + i * width for j in range(len(phases))]
        ax1.bar(xs, us, width, label=m)
        ax2.bar(xs, p99, width, label=m)
    for ax in (ax1, ax2):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(phases))])
        ax.set_xticklabels([f"{n:,} {kind}" for n, kind in phases])
        ax.legend(fontsize=8)
    ax1.set_ylabel("server CPU us per subscriber per message")
    ax1.set_title("Fan-out cost (frame = floor)")
    ax2.set_ylabel("publish-to-receive p99, ms")
    ax2.set_title("Fan-out latency")
    return [_save(fig, out / "fanout.png")]


def overload(ov: dict[str, Any] | None, out: Path) -> list[str]:
    if not ov:
        return []
    fig, ax = plt.subplots(figsize=(10, 4))
    secs = [s for s in ov["by_second"] if s.get("offered")]
    t = [s["t"] for s in secs]
    ok = [sum(v for k, v in s.items() if k.startswith("2")) * ov["batch"] for s in secs]
    ax.plot(t, [s.get("offered", 0) * ov["batch"] for s in secs], "k--", label="offered pings/s")
    ax.plot(t, ok, "tab:blue", label="2xx pings/s")
    ax.plot(t, [s.get("503", 0) * ov["batch"] for s in secs], "tab:red", label="503 pings/s")
    ax.plot(
        t,
        [s.get("shed", 0) * ov["batch"] for s in secs],
        "tab:gray",
        label="shed by generator (cap)",
    )
    ax.set_xlabel("seconds (by scheduled send time)")
    ax.set_ylabel("pings/s")
    ax2 = ax.twinx()
    ax2.plot(
        [s["t"] for s in ov["rss"]],
        [s["rss_mib"] for s in ov["rss"]],
        "tab:green",
        label="service RSS MiB",
    )
    ax2.set_ylabel("RSS MiB")
    ax2.set_ylim(bottom=0)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper right")
    ax.set_title("3x overload: answers and memory")
    return [_save(fig, out / "overload.png")]


def all_plots(res: dict[str, Any], out: Path) -> list[str]:
    return (
        ingest(res.get("ingest", []), out)
        + fanout(res.get("fanout", []), out)
        + overload(res.get("overload"), out)
    )
