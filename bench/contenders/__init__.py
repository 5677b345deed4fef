"""What the service is measured against, each run as a process of its own: the naive
reference, the limits (bare pipeline, read+decode, bare COPY) and the fan-out server.
registry.py says how each is started."""
