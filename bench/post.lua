-- wrk script for bench/http.sh: POST one reading per request to /v1/data.
--
-- Environment:
--   BENCH_KEY     API key sent as "Authorization: Bearer KEY" (optional, so
--                 the same script drives the nginx reference run)
--   BENCH_DEVICE  device id written into each reading (default bench-1)
--
-- Each request carries one realistic reading of about 150 bytes. The bodies
-- are built once per thread, so the Lua cost per request is a table lookup
-- and the load generator spends its CPU on HTTP, not on formatting JSON.
-- The done hook prints one line that bench/http.sh parses:
--   BENCH requests=N duration_us=N rps=X p50_us=N p99_us=N max_us=N
--         non2xx=N connect_errors=N read_errors=N write_errors=N timeouts=N

local device = os.getenv("BENCH_DEVICE") or "bench-1"
local key = os.getenv("BENCH_KEY")
local body_count = 64
local requests = {}
local next_request = 1

local function make_body(i)
    -- Values and timestamps vary between bodies so that a server cannot
    -- cache one parse result. Every field has a fixed width, so every body
    -- has the same length.
    local sensor = 40 + (i % 20) * 0.75
    local temperature = 21.5 + (i % 7) * 0.1
    local humidity = 48 + (i % 11) * 0.5
    return string.format(
        '{"device_id":"%s","timestamp":"2026-12-04T17:%02d:%02d.%03dZ",' ..
        '"sensor_value":%.2f,"temperature":%.1f,"humidity":%.1f,' ..
        '"battery":%d}',
        device, i % 60, (i * 7) % 60, (i * 37) % 1000, sensor, temperature,
        humidity, 87 - i % 5)
end

function init(args)
    local headers = {
        ["Content-Type"] = "application/json",
        ["Connection"] = "keep-alive",
    }
    if key ~= nil and key ~= "" then
        headers["Authorization"] = "Bearer " .. key
    end
    for i = 1, body_count do
        requests[i] = wrk.format("POST", "/v1/data", headers, make_body(i))
    end
end

function request()
    local r = requests[next_request]
    next_request = next_request % body_count + 1
    return r
end

function done(summary, latency, requests_unused)
    local e = summary.errors
    local seconds = summary.duration / 1e6
    local rps = 0
    if seconds > 0 then
        rps = summary.requests / seconds
    end
    io.write(string.format(
        "BENCH requests=%d duration_us=%d rps=%.1f p50_us=%d p99_us=%d " ..
        "max_us=%d non2xx=%d connect_errors=%d read_errors=%d " ..
        "write_errors=%d timeouts=%d\n",
        summary.requests, summary.duration, rps,
        latency:percentile(50), latency:percentile(99), latency.max,
        e.status, e.connect, e.read, e.write, e.timeout))
end
