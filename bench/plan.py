"""What each mode measures, and for how long. The default samples the matrix to stay under
5 minutes on 2 cores; --full runs all of it; --quick the headline only, briefly."""

from __future__ import annotations

from dataclasses import dataclass

from .stages.throughput import Cell

HEADLINE = (20, 256)  # batch, connections: the cell the targets are stated for
LIMITS = ("pipeline", "decode", "copy")


def bracketed_rounds(pairs: int) -> tuple[int, ...]:
    """Fences of each geofence round: ``pairs`` rounds of 1000, each between two rounds of 0
    (geofences_bench._bracketed)."""
    return (0, 1000) * pairs + (0,)


@dataclass(frozen=True)
class Plan:
    name: str
    cells: tuple[Cell, ...]
    duration_s: int  # each throughput cell (wrk takes whole seconds)
    warm_s: float  # skipped before the measurement window
    half_rate_s: float
    fanout_sizes: tuple[int, ...]
    fanout_phase_s: float
    fanout_modes: tuple[str, ...]  # of the contender fan-out server
    overload_s: float
    recovery_s: float
    profile_s: float = 10.0  # each of the service and the pipeline
    nearby_s: float = 5.0  # each nearby case over HTTP (wrk: whole seconds)
    nearby_ref_s: float = 3.0  # each in-process Redis reference case
    nearby_during_s: float = 5.0  # nearby while ingest runs; 0: not measured
    # Fences of each geofence round, in order (--quick runs the stage only with --only).
    geofence_rounds: tuple[int, ...] = bracketed_rounds(3)
    # ... and with the fences of depots and customers' sites (load/city.py LAYOUTS).
    geofence_site_rounds: tuple[int, ...] = bracketed_rounds(2)
    storage_rows: int = 200_000  # rows per fill of the storage stage


def _headline() -> list[Cell]:
    b, c = HEADLINE
    return [Cell(k, b, c) for k in ("service", "naive", "pipeline", "decode", "copy")]


def quick() -> Plan:
    return Plan("quick", tuple(_headline()), 3, 0.75, 2.0, (1000,), 1.0, ("frame", "encode"),
                10.0, 2, nearby_s=2.0, nearby_ref_s=1.0, nearby_during_s=0.0,
                geofence_rounds=(0, 1000), geofence_site_rounds=(0, 1000),
                storage_rows=50_000)  # fmt: skip


def default() -> Plan:
    cells = [*_headline(), Cell("service", 20, 256, "buffered")]
    for b, c in ((1, 64), (200, 64)):
        cells += [Cell(k, b, c) for k in ("service", "naive", "pipeline")]
    return Plan("default", tuple(cells), 6, 1.5, 8.0, (1000, 10_000), 2.0,
                ("frame", "encode"), 60.0, 6.0)  # fmt: skip


def full() -> Plan:
    cells: list[Cell] = []
    for b in (1, 20, 200):
        for c in (64, 256):
            cells += [Cell(k, b, c) for k in ("service", "naive", "pipeline", "decode")]
            cells.append(Cell("service", b, c, "buffered"))
        cells.append(Cell("copy", b, 1))
    return Plan("full", tuple(cells), 10, 2.0, 10.0, (1000, 10_000), 4.0,
                ("frame", "send_str", "encode"), 60.0, 10.0, nearby_s=10.0, nearby_ref_s=5.0,
                nearby_during_s=10.0, geofence_rounds=bracketed_rounds(5),
                geofence_site_rounds=bracketed_rounds(3))  # fmt: skip
