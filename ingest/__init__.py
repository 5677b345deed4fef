"""ingest: high-throughput GPS ingestion service."""

__version__ = "0.1.0"
