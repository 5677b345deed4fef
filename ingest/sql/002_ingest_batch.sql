-- Batch ids already stored, for replay detection. Rows expire after BATCH_ID_TTL_HOURS
-- (ingest/maintenance.py); pings stay deduplicated by ("tripId", "timestamp") regardless.
CREATE TABLE "IngestBatch" (
    "driverId"  text NOT NULL,
    "batchId"   text NOT NULL,
    "createdAt" timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY ("driverId", "batchId")
);

CREATE INDEX "IngestBatch_createdAt_idx" ON "IngestBatch" ("createdAt");
