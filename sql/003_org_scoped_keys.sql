-- Tenancy (API v1.1): the dedup guard and the batch-id key are scoped by org, and every trip
-- has an owner. Two orgs may use the same tripId, driverId and batchId and never touch.
--
-- Before this file's transaction, migrate.py (prepare_003) does the slow work on each existing
-- partition without blocking ingest: fills a NULL "orgId" with '' (rows imported from outside
-- the service; no org can read them either way), proves NOT NULL with a validated CHECK, and
-- builds the new unique index CONCURRENTLY. What is left here takes short locks: no scan, no
-- index build, except on a partition created in between (small: it has just begun).

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

-- IngestBatch: batch ids remembered per ("orgId", "driverId", "batchId"). Existing records get
-- the org of the rows their batch stored; failing that (a batch whose every ping was a
-- duplicate), the one org the driver id is known in; failing that (unknown, or a driver id in
-- several orgs), '' which no org's claim ever matches: that batch id is forgotten early, and
-- an identical resend is still caught by the per-ping guard.
ALTER TABLE "IngestBatch" ADD COLUMN "orgId" text;

UPDATE "IngestBatch" b SET "orgId" = t."orgId"
FROM (SELECT DISTINCT "orgId", "driverId", "batchId" FROM "TripLocation"
      WHERE "batchId" IS NOT NULL) t
WHERE t."driverId" = b."driverId" AND t."batchId" = b."batchId";

UPDATE "IngestBatch" b SET "orgId" = d."orgId"
FROM (SELECT "driverId", min("orgId") AS "orgId" FROM "TripLocation"
      GROUP BY "driverId" HAVING count(DISTINCT "orgId") = 1) d
WHERE b."orgId" IS NULL AND d."driverId" = b."driverId";

UPDATE "IngestBatch" SET "orgId" = '' WHERE "orgId" IS NULL;

-- A pod still running the previous version claims without an org: '' (see above).
ALTER TABLE "IngestBatch" ALTER COLUMN "orgId" SET DEFAULT '';
ALTER TABLE "IngestBatch" ALTER COLUMN "orgId" SET NOT NULL;
ALTER TABLE "IngestBatch" DROP CONSTRAINT "IngestBatch_pkey";
ALTER TABLE "IngestBatch" ADD PRIMARY KEY ("orgId", "driverId", "batchId");

-- Trip ownership: a trip belongs to the driver whose ping first created it, within its org;
-- a dispatcher hands it over (PUT /api/v1/tracking/trips/{tripId}/driver). Checked and
-- claimed once per flush, in the flush's transaction (ingest/store.py).
CREATE TABLE "IngestTrip" (
    "orgId"     text NOT NULL,
    "tripId"    text NOT NULL,
    "driverId"  text NOT NULL,
    "createdAt" timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY ("orgId", "tripId")
);
-- Counts the trips a driver started in the last day (MAX_TRIPS_PER_DRIVER_PER_DAY).
CREATE INDEX "IngestTrip_driver_createdAt_idx" ON "IngestTrip" ("orgId", "driverId", "createdAt");

-- Trips stored before: owned by the driver of their first ping.
INSERT INTO "IngestTrip" ("orgId", "tripId", "driverId", "createdAt")
SELECT DISTINCT ON ("orgId", "tripId") "orgId", "tripId", "driverId", "createdAt"
FROM "TripLocation"
ORDER BY "orgId", "tripId", "timestamp";
