-- Nothing reads "TripLocation" by batch id any more: a replayed batch is found in "IngestBatch"
-- (ingest/store.py), and the column stays, as the trucking app's model has it. The index cost
-- every row 13-73 bytes (shared or unique batch ids) and COPY about 40% of its rows/s
-- (docs/bench.md#storage). Dropping a partitioned index drops its partitions' at once: a short
-- exclusive lock, no table read.
DROP INDEX IF EXISTS "TripLocation_batchId_idx";
