-- wrk script for bench/idempotency.sh: POST one reading per request to
-- /v1/data, each with a new idempotency key or none, so that the runs with
-- and without keys do the same Lua work and differ only in the key.
--
-- Environment:
--   BENCH_KEY     API key sent as "Authorization: Bearer KEY"
--   BENCH_IDEM    none (no key), header (an Idempotency-Key header) or field
--                 (a "msg_id" field in the reading); default none
--   BENCH_PREFIX  text that makes keys unique across runs (default "r")
-- Every request is built when it is sent. Keys never repeat, so each one
-- is a miss that the index stores: the cost measured is the insert.
-- The done hook prints the same BENCH line as bench/post.lua.

local key = os.getenv("BENCH_KEY")
local mode = os.getenv("BENCH_IDEM") or "none"
local prefix = os.getenv("BENCH_PREFIX") or "r"
local counter = 0
local threads_made = 0

-- Runs in the main state; thread:set writes the global thread_tag of
-- each thread's own state, so that the threads' keys differ.
function setup(thread)
    threads_made = threads_made + 1
    thread:set("thread_tag", tostring(threads_made))
end

function request()
    counter = counter + 1
    local id = string.format("%s-%s-%012d", prefix, thread_tag or "0",
                             counter)
    local headers = {
        ["Content-Type"] = "application/json",
        ["Authorization"] = "Bearer " .. key,
    }
    -- Every mode sends the id once in a header and once in the body, under
    -- names that ingestd ignores unless the mode makes one of them the key,
    -- so that all requests have the same size.
    local extra = '"msg_nr":"' .. id .. '"'
    if mode == "header" then
        headers["Idempotency-Key"] = id
    else
        headers["X-Request-Tag"] = id
    end
    if mode == "field" then
        extra = '"msg_id":"' .. id .. '"'
    end
    local body = string.format(
        '{"device_id":"bench-1","timestamp":"2026-12-04T17:00:00.000Z",' ..
        '"sensor_value":%.2f,"temperature":21.5,"humidity":48.0,' ..
        '"battery":87,%s}', 40 + counter % 20, extra)
    return wrk.format("POST", "/v1/data", headers, body)
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
