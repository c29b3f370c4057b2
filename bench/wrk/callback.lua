-- wrk script: every request is a distinct, correctly signed Tencent IM C2C recall callback.
--
-- Configured through the environment by bench/run.py (bench/load.py):
--   BENCH_PATH_FILE  lines "<unix second>\t<path?query>": the callback path with Sign/RequestTime
--                    precomputed for each second of the run (second 0 = any second: unsigned app)
--   BENCH_BODY       the body, with {KEY} where the MsgKey goes and {MS} where EventTime goes
--   BENCH_RUN        a 6-digit run tag, so no two runs (or measurements) share a MsgKey
--
-- Each thread numbers its requests; MsgKey = <counter mod 1e6>_<run><thread><counter>_<second>,
-- the shape relay.tencent.samples uses, so the relay publishes a distinct event for every request.
-- done() prints one line "BENCH_JSON {...}": latency percentiles (µs), statuses counted in
-- response() (exactly how many 200s were answered), wrk's own counters.

local threads = {}
local next_id = 1

function setup(thread)
  thread:set("tid", next_id)
  table.insert(threads, thread)
  next_id = next_id + 1
end

local paths = {}
local any_path = nil
local last_path = nil
local pre, mid, post
local run = os.getenv("BENCH_RUN") or "000000"
local counter = 0
local cur_sec = -1
local cur_path = nil
local headers = { ["Content-Type"] = "application/json" }

-- Counters read by done() through thread:get (globals of the thread's Lua state).
statuses = {}
ok = 0

function init(args)
  local file = assert(io.open(assert(os.getenv("BENCH_PATH_FILE"), "BENCH_PATH_FILE not set"), "r"))
  for line in file:lines() do
    local sec, path = line:match("^(%d+)\t(.+)$")
    if sec then
      sec = tonumber(sec)
      if sec == 0 then any_path = path else paths[sec] = path end
      last_path = path
    end
  end
  file:close()
  local body = assert(os.getenv("BENCH_BODY"), "BENCH_BODY not set")
  local k = assert(body:find("{KEY}", 1, true), "BENCH_BODY lacks {KEY}")
  local m = assert(body:find("{MS}", 1, true), "BENCH_BODY lacks {MS}")
  assert(k < m, "{KEY} must come before {MS}")
  pre = body:sub(1, k - 1)
  mid = body:sub(k + 5, m - 1)
  post = body:sub(m + 4)
end

function request()
  local sec = os.time()
  if sec ~= cur_sec then
    cur_sec = sec
    -- Past the precomputed range, keep the last signature (still valid for RELAY_SIGNATURE_MAX_AGE).
    cur_path = any_path or paths[sec] or last_path
  end
  counter = counter + 1
  local key = string.format("%06d_%s%02d%08d_%d", counter % 1000000, run, tid, counter, sec)
  local body = pre .. key .. mid .. string.format("%d", sec * 1000) .. post
  return wrk.format("POST", cur_path, headers, body)
end

function response(status, hdrs, body)
  if status == 200 then
    ok = ok + 1
  end
  statuses[status] = (statuses[status] or 0) + 1
end

local function json_statuses(t)
  local parts = {}
  for code, n in pairs(t) do
    table.insert(parts, string.format('"%d":%d', code, n))
  end
  return "{" .. table.concat(parts, ",") .. "}"
end

function done(summary, latency, requests)
  local total_ok = 0
  local merged = {}
  for _, thread in ipairs(threads) do
    total_ok = total_ok + (thread:get("ok") or 0)
    for code, n in pairs(thread:get("statuses") or {}) do
      merged[code] = (merged[code] or 0) + n
    end
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"duration_us":%d,"requests":%d,"bytes":%d,"ok":%d,"statuses":%s,'
      .. '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},'
      .. '"latency_us":{"min":%d,"mean":%.1f,"stdev":%.1f,"max":%d,"p50":%d,"p90":%d,"p99":%d,"p999":%d}}\n',
    summary.duration, summary.requests, summary.bytes, total_ok, json_statuses(merged),
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency.stdev, latency.max,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9)))
end
