-- Geofences per org, each trip's "inside which fences" state, and the enter/exit events
-- (ingest/geofences_api.py, ingest/geofence_events.py, docs/api.md#geofences).

CREATE TABLE "Geofence" (
    "orgId"     text NOT NULL,
    "id"        text NOT NULL,
    "name"      text NOT NULL,
    -- The GeoJSON geometry as accepted (geofence_shapes.parse_shape): type and coordinates.
    "geometry"  jsonb NOT NULL,
    "radiusM"   double precision,
    "vertices"  integer NOT NULL,
    "createdAt" timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY ("orgId", "id")
);

-- Bumped in the transaction of every create and delete: an evaluation reads it under the trip's
-- state lock, so it never uses an older fence set than the evaluation before it.
CREATE TABLE "GeofenceOrg" (
    "orgId"   text PRIMARY KEY,
    "version"  bigint NOT NULL,
    "fences"   integer NOT NULL,
    "vertices" bigint NOT NULL
);

-- One row per trip evaluated: its pings are evaluated up to "evaluatedTo" (in time order; NULL:
-- none yet), and it was then inside "inside". Locked FOR UPDATE while a flush's pings are evaluated, on
-- whichever pod committed them.
CREATE TABLE "GeofenceState" (
    "orgId"       text NOT NULL,
    "tripId"      text NOT NULL,
    "evaluatedTo" timestamptz,
    "inside"      text[] NOT NULL,
    "updatedAt"   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY ("orgId", "tripId")
);

-- The key is the second guard of exactly once, and serves the listing by fence and time.
CREATE TABLE "GeofenceEvent" (
    "orgId"      text NOT NULL,
    "geofenceId" text NOT NULL,
    "timestamp"  timestamptz NOT NULL,
    "tripId"     text NOT NULL,
    "event"      text NOT NULL CHECK ("event" IN ('enter', 'exit')),
    "driverId"   text NOT NULL,
    "latitude"   double precision NOT NULL,
    "longitude"  double precision NOT NULL,
    "accuracy"   double precision,
    "speed"      double precision,
    "heading"    double precision,
    "altitude"   double precision,
    "createdAt"  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY ("orgId", "geofenceId", "timestamp", "tripId", "event"),
    FOREIGN KEY ("orgId", "geofenceId") REFERENCES "Geofence" ("orgId", "id") ON DELETE CASCADE
);
