-- wrk script: unique ping batches from many simulated drivers, each with its own token.
--
--   wrk -t T -c C -d D -s pings.lua URL -- DATA_FILE BATCH TAG START_MS THREADS
--
-- DATA_FILE returns {drivers = {...}, tokens = {...}} (bench/load/tokens.py). Each wrk thread
-- takes every THREADS-th driver and cycles through them, one request each, so concurrent
-- requests of a thread come from different drivers. Every driver drives one trip
-- (TAG_driverId) whose timestamps advance 1 ms per ping from START_MS: no two pings of a
-- trip share a timestamp and no batchId (TAG-thread-sequence) repeats, so nothing is a
-- duplicate and every ping must be stored. done() prints one line: BENCH_JSON {...}.
--
-- Positions: without data.tracks, a function of the timestamp alone (every trip is at the
-- same spot at the same time, as the ingest matrix has always measured). With data.tracks
-- (one {lat, lon, dlat, dlon} per driver), each trip drives a straight line of its own from
-- its start, one step per ping: trucks spread over a city, for the geofence stage.

local threads = {}
local nthreads_setup = 0

function setup(thread)
  nthreads_setup = nthreads_setup + 1
  thread:set("tid", nthreads_setup)
  table.insert(threads, thread)
end

local batch, tag, heads, trips, ids, tracks, next_ms, start_ms, n, idx, seq
local cache_sec, cache_str = -1, ""
statuses = {}

function init(args)
  local data = dofile(args[1])
  batch = tonumber(args[2])
  tag = args[3]
  start_ms = tonumber(args[4])
  local nthreads = tonumber(args[5])
  local host = wrk.host .. ":" .. tostring(wrk.port)
  heads, trips, ids, tracks, next_ms = {}, {}, {}, {}, {}
  n = 0
  for i = tid, #data.drivers, nthreads do
    n = n + 1
    local d = data.drivers[i]
    ids[n] = d
    trips[n] = tag .. "_" .. d
    tracks[n] = data.tracks and data.tracks[i]
    next_ms[n] = start_ms
    heads[n] = "POST /api/v1/tracking/ping HTTP/1.1\r\nHost: " .. host ..
      "\r\nAuthorization: Bearer " .. data.tokens[i] ..
      "\r\nContent-Type: application/json\r\nContent-Length: "
  end
  idx, seq = 0, 0
end

local function stamp(ms)
  local sec = math.floor(ms / 1000)
  if sec ~= cache_sec then
    cache_sec = sec
    cache_str = os.date("!%Y-%m-%dT%H:%M:%S.", sec)
  end
  return cache_str .. string.format("%03dZ", ms % 1000)
end

local fmt = '{"latitude":%.6f,"longitude":%.6f,"timestamp":"%s",' ..
  '"accuracy":4.5,"speed":11.2,"heading":87.0,"altitude":921.0}'

function request()
  idx = idx % n + 1
  seq = seq + 1
  local ms = next_ms[idx]
  next_ms[idx] = ms + batch
  local parts = {}
  local tr = tracks[idx]
  for k = 1, batch do
    local t = ms + k - 1
    if tr then
      local s = t - start_ms
      parts[k] = string.format(fmt, tr[1] + s * tr[3], tr[2] + s * tr[4], stamp(t))
    else
      parts[k] = string.format(fmt, 12.9 + (t % 100000) * 1e-6, 77.5 + (t % 70000) * 1e-6, stamp(t))
    end
  end
  local body = '{"batchId":"' .. tag .. "-" .. tid .. "-" .. seq .. '","tripId":"' .. trips[idx] ..
    '","driverId":"' .. ids[idx] .. '","locations":[' .. table.concat(parts, ",") .. "]}"
  return heads[idx] .. #body .. "\r\n\r\n" .. body
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local codes = {}
  for _, t in ipairs(threads) do
    local s = t:get("statuses")
    if s then
      for code, count in pairs(s) do
        codes[code] = (codes[code] or 0) + count
      end
    end
  end
  local parts = {}
  for code, count in pairs(codes) do
    parts[#parts + 1] = string.format('"%d":%d', code, count)
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"mean":%.1f,"p50":%d,"p90":%d,"p99":%d,"p999":%d,"max":%d},"statuses":{%s}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, table.concat(parts, ",")))
end
