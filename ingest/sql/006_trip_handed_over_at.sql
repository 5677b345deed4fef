-- When a dispatcher last handed the trip over (ingest/trips_api.py). Maintenance forgets the
-- owner of a trip with no ping left that is older than the first month kept (RETENTION_MONTHS):
-- "createdAt" alone would let it forget an owner a dispatcher has just set on such a trip, and
-- the first driver posting next would take the trip. Nullable, no default: adding it rewrites
-- nothing and takes the table's lock only for a moment.
ALTER TABLE "IngestTrip" ADD COLUMN IF NOT EXISTS "handedOverAt" timestamptz;
