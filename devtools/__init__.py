"""Development tools: `make run`, throwaway PostgreSQL/Redis, the driver simulator, and the
one process harness the tests and the benchmarks share. Not part of the production image."""
