-- The Prisma model "TripLocation" of the trucking app, partitioned by month on "timestamp".
-- Monthly partitions "TripLocation_YYYY_MM" are created by the service (ingest/partitions.py).
CREATE TABLE "TripLocation" (
    "tripId"    text NOT NULL,
    "driverId"  text NOT NULL,
    "orgId"     text,
    "latitude"  double precision NOT NULL,
    "longitude" double precision NOT NULL,
    "accuracy"  double precision,
    "speed"     double precision,
    "heading"   double precision,
    "altitude"  double precision,
    "timestamp" timestamptz(3) NOT NULL,
    "batchId"   text,
    "createdAt" timestamptz(3) NOT NULL DEFAULT now(),
    -- The dedup guard; it also serves the model's (tripId, timestamp DESC) index by backward scan.
    CONSTRAINT "TripLocation_tripId_timestamp_key" UNIQUE ("tripId", "timestamp")
) PARTITION BY RANGE ("timestamp");

CREATE INDEX "TripLocation_batchId_idx" ON "TripLocation" ("batchId");
