"""STAGE: decode + validate (the schema's decoder, validate.to_records) of one 20-ping batch,
in process, no HTTP: the per-ping CPU cost of the hot path's first stages, in ns per ping.

    .venv/bin/python -m bench.stages.decode_validate [--pings 20] [--baseline DIR]

Three bodies: JSON with RFC 3339 timestamps ("...T10:15:00.250Z", as the driver app sends
them), JSON with epoch milliseconds, and msgpack with RFC 3339 strings. Each figure is the
best of many short rounds, so that other work on the machine inflates it as little as
possible. --baseline DIR measures DIR/ingest too (e.g. `git archive HEAD ingest | tar -x -C
DIR`), the two interleaved in the same run: compare ratios, not absolute numbers.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import msgspec

import ingest

CASES = ("json, RFC 3339", "json, epoch ms", "msgpack, RFC 3339")


def body(pings: int, iso: bool) -> dict[str, Any]:
    start = int(time.time() * 1000) - 600_000
    locations = []
    for i in range(pings):
        ms = start + i * 1000
        stamp: str | int = ms
        if iso:
            stamp = datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")
            stamp = stamp.replace("+00:00", "Z")
        locations.append(
            {"latitude": 12.9716 + i * 1e-4, "longitude": 77.5946 + i * 1e-4,
             "timestamp": stamp, "accuracy": 4.5, "speed": 11.2, "heading": 87.0}
        )  # fmt: skip
    return {"tripId": "trip_1", "driverId": "drv_1", "batchId": "b-1", "locations": locations}


def load(directory: Path) -> ModuleType:
    """DIR/ingest imported as the package ``ingest_baseline`` (its imports are relative)."""
    init = directory / "ingest" / "__init__.py"
    spec = importlib.util.spec_from_file_location(
        "ingest_baseline", init, submodule_search_locations=[str(init.parent)]
    )
    assert spec is not None and spec.loader is not None
    package = importlib.util.module_from_spec(spec)
    sys.modules["ingest_baseline"] = package
    spec.loader.exec_module(package)
    return package


def stage(package: ModuleType, case: str, pings: int) -> Callable[[int], float]:
    """A function timing ``n`` decode + to_records of the case's body."""
    schema = importlib.import_module(f"{package.__name__}.schema")
    to_records = importlib.import_module(f"{package.__name__}.validate").to_records
    packed = case.startswith("msgpack")
    raw = (msgspec.msgpack.encode if packed else msgspec.json.encode)(body(pings, "RFC" in case))
    decode = (schema.msgpack_batch_decoder if packed else schema.json_batch_decoder).decode
    now = datetime.now(UTC)
    records, rejected = to_records(decode(raw), "org_1", "b-1", now, 300, 31, [])
    assert len(records) == pings and not rejected, rejected

    def run(n: int) -> float:
        started = time.perf_counter()
        for _ in range(n):
            to_records(decode(raw), "org_1", "b-1", now, 300, 31, [])
        return time.perf_counter() - started

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pings", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--baseline", type=Path, help="a directory holding another ingest/")
    args = parser.parse_args()
    packages = {"this": ingest}
    if args.baseline:
        packages = {"baseline": load(args.baseline), **packages}
    gc.disable()  # the service freezes start-up objects and runs GC rarely (docs/bench.md)
    per_round = max(1, 4000 // args.pings)
    for case in CASES:
        runs = {name: stage(p, case, args.pings) for name, p in packages.items()}
        best = dict.fromkeys(runs, float("inf"))
        for _ in range(args.rounds):  # interleaved, so that drift hits every package alike
            for name, run in runs.items():
                best[name] = min(best[name], run(per_round))
        ns = {name: t / per_round / args.pings * 1e9 for name, t in best.items()}
        line = "  ".join(f"{name} {v:5.0f}" for name, v in ns.items())
        if "baseline" in ns:
            line += f"  ({(ns['this'] / ns['baseline'] - 1) * 100:+.0f}%)"
        print(f"{case:<18} ns/ping: {line}")


if __name__ == "__main__":
    main()
