-- wrk script: GET /api/v1/tracking/nearby from random points of a city, one dispatcher token.
--
--   wrk -t 1 -c C -d D -s nearby.lua URL -- TOKEN LAT LON HALF_LAT HALF_LON RADIUS_M LIMIT SEED
--
-- Each request asks from a point drawn uniformly within HALF_LAT and HALF_LON degrees of
-- (LAT, LON). response() counts the statuses and the trips answered (occurrences of "tripId"
-- in the body). done() prints one line: BENCH_JSON {...}, as pings.lua does.

local threads = {}
local nthreads_setup = 0

function setup(thread)
  nthreads_setup = nthreads_setup + 1
  thread:set("tid", nthreads_setup)
  table.insert(threads, thread)
end

local head, lat0, lon0, half_lat, half_lon, tail
statuses = {}
trips = 0
answers = 0

function init(args)
  head = "GET /api/v1/tracking/nearby?lat="
  lat0, lon0 = tonumber(args[2]), tonumber(args[3])
  half_lat, half_lon = tonumber(args[4]), tonumber(args[5])
  tail = "&radius_m=" .. args[6] .. "&limit=" .. args[7] .. " HTTP/1.1\r\nHost: " ..
    wrk.host .. ":" .. tostring(wrk.port) .. "\r\nAuthorization: Bearer " .. args[1] .. "\r\n\r\n"
  math.randomseed(tonumber(args[8]) + tid)
end

function request()
  local lat = lat0 + (2 * math.random() - 1) * half_lat
  local lon = lon0 + (2 * math.random() - 1) * half_lon
  return string.format("%s%.6f&lon=%.6f%s", head, lat, lon, tail)
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  if status == 200 then
    answers = answers + 1
    local _, found = string.gsub(body, '"tripId"', "")
    trips = trips + found
  end
end

function done(summary, latency, requests)
  local codes, found, answered = {}, 0, 0
  for _, t in ipairs(threads) do
    local s = t:get("statuses")
    if s then
      for code, count in pairs(s) do
        codes[code] = (codes[code] or 0) + count
      end
    end
    found = found + (t:get("trips") or 0)
    answered = answered + (t:get("answers") or 0)
  end
  local parts = {}
  for code, count in pairs(codes) do
    parts[#parts + 1] = string.format('"%d":%d', code, count)
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"mean":%.1f,"p50":%d,"p90":%d,"p99":%d,"p999":%d,"max":%d},"statuses":{%s},' ..
    '"trips":%d,"answers":%d}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, table.concat(parts, ","), found, answered))
end
