"""Write one run's results: results.json (everything), results.md, the PNG plots, a line per
target on stderr and a JSON summary on stdout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..context import Context
from .markdown import markdown


def write(ctx: Context, out: Path, res: dict[str, Any]) -> None:
    # Imported here, not at the top: --help and main()'s "matplotlib is missing" hint work
    # without it.
    from . import plots

    out.mkdir(parents=True, exist_ok=True)
    res["plots"] = plots.all_plots(res, out)
    (out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / "results.md").write_text(markdown(res))
    ctx.say(f"wrote {out}/results.json, results.md, {', '.join(res['plots'])}")
    for t in res["targets"]:
        ctx.say(
            f"target {'met   ' if t['met'] else 'MISSED'} {t['target']}: {t['measured']} (wanted {t['wanted']})"
        )
    summary = {"plan": res["plan"], "elapsed_s": res["elapsed_s"], "targets": res["targets"],
               "ingest": [{k: r.get(k) for k in ("cell", "stored_pps", "acked_pps", "x_naive", "of_pipeline", "server_cpu_per_100k")}
                          for r in res.get("ingest", [])]}  # fmt: skip
    if nb := res.get("nearby"):
        summary["nearby"] = [{k: r.get(k) for k in ("kind", "radius_m", "concurrency", "rps", "p50_ms", "p99_ms", "max_ms")}
                             for r in nb["cases"]]  # fmt: skip
    for key in ("geofences", "geofences_sites"):
        if gf := res.get(key):
            summary[key] = {
                k: gf.get(k) for k in ("by_fences", "ratio_pps", "pair_ratios", "interval")
            }
    if st := res.get("storage"):
        summary["storage"] = st["results"]
    print(json.dumps(summary, indent=1))
