"""The stages of a run, each a contender under load with what it costs measured:
ingest (throughput.py), latency and overload (overload.py), fanout (fanout_bench.py),
profile (profile_service.py). decode_validate.py is a microbenchmark of the service's
decode + validate stage, run on its own."""
