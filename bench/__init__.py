"""Benchmarks of the ingest service against a naive reference and its own limits.

Run with ``python -m bench`` (about 4-5 minutes on 2 cores) or ``python -m bench --quick``
(under a minute). Everything runs on loopback; results go to ``bench/results/``.
run.py runs the stages (stages/) of a plan (plan.py): contenders (contenders/) under load
(load/), then the report (report/). See docs/bench.md.
"""
