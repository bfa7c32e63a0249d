-- wrk script shared by tools/synod-bench and tools/bench-peers.
--
-- Configured through the environment (wrk hands script arguments only to init(), and
-- setup() and done() need the settings too):
--   BENCH_MODE         synod-write | synod-read | healthz | dqlite-put | etcd-put
--   BENCH_KEYS         key space: keys are drawn uniformly from 1..BENCH_KEYS (default 100000)
--   BENCH_VALUE_BYTES  size of each written value in bytes (default 100)
--   BENCH_DB           Synod database name (default bench)
--   BENCH_CONSISTENCY  Synod read consistency: linearizable | lease | local (default lease)
--   BENCH_ADDRS        optional space-separated host:port list; thread i sends to entry
--                      i mod n (round robin by thread). Unset: every thread uses wrk's URL.
--
-- done() prints one line starting with "RESULT " and key=value fields: rps, p50/p99/p999
-- (milliseconds), non2xx (answers counted as failures by response() below: any status
-- outside 200-299), socket (connect, read, write and timeout errors from wrk), requests
-- (HTTP requests answered) and retries.
--
-- Latency: wrk's own histogram (latency:percentile), which wrk corrects for coordinated
-- omission after the run: every sample of n >= 2e microseconds, e being the mean time
-- between two requests of one connection, adds samples n-e, n-2e, ... down to e.
--
-- dqlite-demo (go-dqlite 1.11) answers "200 Error: database is locked" whenever a write
-- arrives while another one is in flight (its leader takes one write transaction at a
-- time and the demo does not retry), so dqlite-put retries such a write, with the same
-- key, after a backoff of 1, 2, 4, 8, then 16 ms, as an application would. Its rps counts
-- completed writes, its latency runs from the first attempt to the "done", and retries
-- counts the "locked" answers. Measuring that needs one connection per wrk thread
-- (-t N -c N): the script times requests itself and then applies the same correction as
-- wrk; set BENCH_CONNECTIONS=N so that the script can check. Any other answer that is
-- not "200 done" counts in non2xx.

local mode = os.getenv("BENCH_MODE") or "synod-write"
local keys = tonumber(os.getenv("BENCH_KEYS") or "100000")
local value_bytes = tonumber(os.getenv("BENCH_VALUE_BYTES") or "100")
local db = os.getenv("BENCH_DB") or "bench"
local consistency = os.getenv("BENCH_CONSISTENCY") or "lease"

local known = { ["synod-write"] = true, ["synod-read"] = true, healthz = true,
                ["dqlite-put"] = true, ["etcd-put"] = true }
if not known[mode] then
  io.stderr:write("kv.lua: unknown BENCH_MODE " .. mode .. "\n")
  os.exit(2)
end

-- A value of exactly value_bytes printable characters that need no escaping in JSON.
local function make_value(n)
  local alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
  local parts = {}
  for i = 1, n do
    local j = (i - 1) % #alphabet + 1
    parts[i] = alphabet:sub(j, j)
  end
  return table.concat(parts)
end

local b64_alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
local b64_digit = {}
for i = 1, 64 do b64_digit[i - 1] = b64_alphabet:sub(i, i) end

-- Standard base64 with padding; plain arithmetic, so it runs on Lua 5.1 and LuaJIT alike.
local function base64(s)
  local out = {}
  for i = 1, #s, 3 do
    local a, b, c = s:byte(i, i + 2)
    local n = a * 65536 + (b or 0) * 256 + (c or 0)
    out[#out + 1] = b64_digit[math.floor(n / 262144)]
    out[#out + 1] = b64_digit[math.floor(n / 4096) % 64]
    out[#out + 1] = b and b64_digit[math.floor(n / 64) % 64] or "="
    out[#out + 1] = c and b64_digit[n % 64] or "="
  end
  return table.concat(out)
end

-- ---------------------------------------------------------------------------------------
-- Main Lua state: one setup() call per thread, then done() once.

local threads = {}

function setup(thread)
  local index = #threads + 1
  thread:set("thread_index", index)
  local addrs = os.getenv("BENCH_ADDRS")
  if addrs and addrs ~= "" then
    local list = {}
    for a in addrs:gmatch("%S+") do list[#list + 1] = a end
    local hostport = list[(index - 1) % #list + 1]
    local host, port = hostport:match("^(.+):(%d+)$")
    local resolved = wrk.lookup(host, port)
    if not resolved or not resolved[1] then
      io.stderr:write("kv.lua: cannot resolve " .. hostport .. "\n")
      os.exit(2)
    end
    thread.addr = resolved[1]
  end
  threads[index] = thread
end

-- Percentiles of latencies (integer microseconds) recorded by the script, computed the
-- way wrk computes its own: coordinated-omission correction with the mean interval between
-- two completions of one connection, then the sample of rank round(p/100 * count + 0.5).
local function corrected_percentiles(samples, duration_us, connections, ps)
  local hist, count = {}, 0
  for _, v in ipairs(samples) do
    hist[v] = (hist[v] or 0) + 1
    count = count + 1
  end
  local per_connection = math.floor(count / connections)
  if per_connection > 0 then
    local e = math.floor(duration_us / per_connection)
    local original = {}
    for n, c in pairs(hist) do original[#original + 1] = { n, c } end
    for _, nc in ipairs(original) do
      local n, c = nc[1], nc[2]
      if e > 0 and n >= 2 * e then
        local m = n - e
        while m > e do
          hist[m] = (hist[m] or 0) + c
          count = count + c
          m = m - e
        end
      end
    end
  end
  local values = {}
  for n in pairs(hist) do values[#values + 1] = n end
  table.sort(values)
  local out = {}
  for i, p in ipairs(ps) do
    local rank = math.floor(p / 100 * count + 0.5 + 0.5) -- round(p/100 * count + 0.5)
    local total, result = 0, 0
    for _, n in ipairs(values) do
      total = total + hist[n]
      result = n
      if total >= rank then break end
    end
    out[i] = result
  end
  return out
end

function done(summary, latency, requests)
  local non2xx, retries, completed = 0, 0, summary.requests
  local e = summary.errors
  local socket = e.connect + e.read + e.write + e.timeout
  local seconds = summary.duration / 1e6
  local p
  for _, t in ipairs(threads) do non2xx = non2xx + (t:get("non2xx") or 0) end
  if mode == "dqlite-put" then
    local connections = tonumber(os.getenv("BENCH_CONNECTIONS") or "")
    if connections ~= #threads then
      io.stderr:write("kv.lua: dqlite-put needs one connection per thread: run wrk with " ..
                      "-t N -c N and set BENCH_CONNECTIONS=N\n")
      os.exit(2)
    end
    local samples = {}
    for _, t in ipairs(threads) do
      retries = retries + (t:get("retries") or 0)
      for _, v in ipairs(t:get("samples") or {}) do samples[#samples + 1] = v end
    end
    completed = #samples
    p = corrected_percentiles(samples, summary.duration, #threads, { 50, 99, 99.9 })
  else
    p = { latency:percentile(50), latency:percentile(99), latency:percentile(99.9) }
  end
  io.write(string.format(
    "RESULT rps=%.1f p50=%.3f p99=%.3f p999=%.3f non2xx=%d socket=%d requests=%d retries=%d\n",
    completed / seconds, p[1] / 1000, p[2] / 1000, p[3] / 1000, non2xx, socket,
    summary.requests, retries))
end

-- ---------------------------------------------------------------------------------------
-- Per-thread Lua states.

local make_request

function init(args)
  non2xx = 0
  math.randomseed(os.time() * 1000 + (thread_index or 0) * 7919)
  for _ = 1, 10 do math.random() end

  local value = make_value(value_bytes)
  local json = { ["Content-Type"] = "application/json" }

  if mode == "synod-write" then
    local path = "/v1/db/" .. db .. "/exec"
    local head = '{"statements":[{"sql":"INSERT INTO kv(k, v) VALUES (?, ?) ' ..
                 'ON CONFLICT(k) DO UPDATE SET v = excluded.v","params":['
    local tail = ',"' .. value .. '"]}]}'
    make_request = function()
      return wrk.format("POST", path, json, head .. math.random(keys) .. tail)
    end
  elseif mode == "synod-read" then
    local path = "/v1/db/" .. db .. "/query"
    local head = '{"sql":"SELECT v FROM kv WHERE k = ?","params":['
    local tail = '],"consistency":"' .. consistency .. '"}'
    make_request = function()
      return wrk.format("POST", path, json, head .. math.random(keys) .. tail)
    end
  elseif mode == "healthz" then
    local req = wrk.format("GET", "/healthz")
    make_request = function() return req end
  elseif mode == "dqlite-put" then
    local ffi = require("ffi")
    ffi.cdef [[
      typedef struct { long tv_sec; long tv_nsec; } kv_bench_timespec;
      int clock_gettime(int clock_id, kv_bench_timespec *tp);
    ]]
    local ts = ffi.new("kv_bench_timespec")
    now_us = function()
      ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
      return tonumber(ts.tv_sec) * 1000000 + math.floor(tonumber(ts.tv_nsec) / 1000)
    end
    samples, retries, tries, backoff, in_flight = {}, 0, 0, 0, false
    local key, started
    make_request = function()
      -- A request while one is in flight: wrk's one-off check of request() on the first
      -- thread before it starts, or a reconnection after a socket error (which wrk counts).
      -- Either way the previous write is abandoned and a new one starts.
      if in_flight then tries = 0 end
      in_flight = true
      if tries == 0 then
        key = math.random(keys)
        started = now_us()
      end
      tries = tries + 1
      return wrk.format("PUT", "/" .. key, nil, value)
    end
    completed_write = function()
      samples[#samples + 1] = now_us() - started
    end
  elseif mode == "etcd-put" then
    local tail = '","value":"' .. base64(value) .. '"}'
    make_request = function()
      return wrk.format("POST", "/v3/kv/put", json,
                        '{"key":"' .. base64(tostring(math.random(keys))) .. tail)
    end
  end
end

function request()
  return make_request()
end

if mode == "dqlite-put" then
  function response(status, headers, body)
    in_flight = false
    if status == 200 and body:sub(1, 4) == "done" then
      completed_write()
      tries = 0
    elseif status == 200 and tries < 200 and body:find("database is locked", 1, true) then
      retries = retries + 1
      backoff = math.min(2 ^ (tries - 1), 16)
    else
      non2xx = non2xx + 1
      tries = 0
    end
  end

  function delay()
    local ms = backoff
    backoff = 0
    return ms
  end
else
  function response(status, headers, body)
    if status < 200 or status > 299 then non2xx = non2xx + 1 end
  end
end
