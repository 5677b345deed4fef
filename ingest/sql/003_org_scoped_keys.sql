-- Tenancy (API v1.1): the dedup guard and the batch-id key are scoped by org, and every trip
-- has an owner. Two orgs may use the same tripId, driverId and batchId and never touch.
--
-- Before this file's transaction, migrate.py (prepare_003) does every slow part without
-- blocking ingest: on each partition it fills a NULL "orgId" with '' (rows imported from outside
-- the service; no org can read them either way), proves NOT NULL with a validated CHECK and
-- builds the new unique index CONCURRENTLY; it moves "IngestBatch" to the new key and fills
-- "IngestTrip" (below). What is left here takes short locks and reads no table whole, except a
-- partition created in between (small: it has just begun). Statements wait at most
-- lock_timeout for their locks; migrate.py retries the file if one times out.

-- TripLocation: ("orgId", "tripId", "timestamp") replaces ("tripId", "timestamp").
DO $$
DECLARE
    part text;
BEGIN
    FOR part IN
        SELECT c.relname FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid
        JOIN pg_class p ON p.oid = i.inhparent
        WHERE p.relname = 'TripLocation' AND p.relnamespace = to_regnamespace(current_schema())
    LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_constraint
                       WHERE conrelid = format('%I', part)::regclass
                         AND conname = part || '_orgId_not_null' AND convalidated) THEN
            EXECUTE format('UPDATE %I SET "orgId" = '''' WHERE "orgId" IS NULL', part);
        END IF;
    END LOOP;
END $$;

ALTER TABLE "TripLocation" ALTER COLUMN "orgId" SET NOT NULL;

CREATE UNIQUE INDEX "TripLocation_orgId_tripId_timestamp_key"
    ON ONLY "TripLocation" ("orgId", "tripId", "timestamp");

DO $$
DECLARE
    part text;
BEGIN
    FOR part IN
        SELECT c.relname FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid
        JOIN pg_class p ON p.oid = i.inhparent
        WHERE p.relname = 'TripLocation' AND p.relnamespace = to_regnamespace(current_schema())
    LOOP
        EXECUTE format(
            'CREATE UNIQUE INDEX IF NOT EXISTS %I ON %I ("orgId", "tripId", "timestamp")',
            part || '_org_trip_ts_key', part);
        EXECUTE format('ALTER INDEX "TripLocation_orgId_tripId_timestamp_key" ATTACH PARTITION %I',
                       part || '_org_trip_ts_key');
        EXECUTE format('ALTER TABLE %I DROP CONSTRAINT IF EXISTS %I', part, part || '_orgId_not_null');
    END LOOP;
END $$;

ALTER TABLE "TripLocation" DROP CONSTRAINT "TripLocation_tripId_timestamp_key";

-- IngestBatch: batch ids remembered per ("orgId", "driverId", "batchId"). prepare_003 added the
-- column (NOT NULL DEFAULT '': no rewrite, no scan), gave existing records their org (the org of
-- the rows their batch stored; failing that, the one org their driver id is known in; failing
-- that '', which no org's claim ever matches: that batch id is forgotten early, and an identical
-- resend is still caught by the per-ping guard) and built the new key's index CONCURRENTLY.
-- A pod still running the previous version claims without an org: ''.
ALTER TABLE "IngestBatch" ADD COLUMN IF NOT EXISTS "orgId" text NOT NULL DEFAULT '';
CREATE UNIQUE INDEX IF NOT EXISTS "IngestBatch_org_driver_batch_key"
    ON "IngestBatch" ("orgId", "driverId", "batchId");
ALTER TABLE "IngestBatch" DROP CONSTRAINT "IngestBatch_pkey";
ALTER TABLE "IngestBatch" ADD CONSTRAINT "IngestBatch_pkey"
    PRIMARY KEY USING INDEX "IngestBatch_org_driver_batch_key";

-- ingest:prepare (run by prepare_003 before the transaction too, then it fills "IngestTrip")
-- Trip ownership: a trip belongs to the driver whose ping first created it, within its org;
-- a dispatcher hands it over (PUT /api/v1/tracking/trips/{tripId}/driver). Checked and
-- claimed once per flush, in the flush's transaction (ingest/store.py). prepare_003 fills it
-- with the trips stored before, each owned by the driver of its first ping; a trip that a
-- previous-version pod starts after that is claimed by the first driver posting to it.
CREATE TABLE IF NOT EXISTS "IngestTrip" (
    "orgId"     text NOT NULL,
    "tripId"    text NOT NULL,
    "driverId"  text NOT NULL,
    "createdAt" timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY ("orgId", "tripId")
);
-- Counts the trips a driver started in the last day (MAX_TRIPS_PER_DRIVER_PER_DAY).
CREATE INDEX IF NOT EXISTS "IngestTrip_driver_createdAt_idx"
    ON "IngestTrip" ("orgId", "driverId", "createdAt");

-- One row per flush attempt, written in its transaction: a flush whose COMMIT reply was lost
-- looks for its row to learn whether it committed (ingest/flush.py). Ids are epoch ms << 20 plus
-- random bits; maintenance deletes those older than a few hours by range.
CREATE TABLE IF NOT EXISTS "IngestFlush" ("id" bigint PRIMARY KEY);
-- ingest:end-prepare
