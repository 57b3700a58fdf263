-- bench/wrk.py's block and unblock passes: `method` /chain/<chain>/<family>/<address> of addresses unique across
-- wrk's threads and connections. Thread t (0-based) of T takes the pool indices start + t, start + t + T, ...
-- until its own quota; then it stops (a connection that asks for more in the meantime gets GET /health, counted
-- apart). done() prints one JSON line for bench/wrk.py: wrk's summary, latency percentiles, counts per thread.
--   wrk ... -s block.lua URL -- METHOD CHAIN FAMILY START QUOTA[,QUOTA...]   (one quota per thread)
-- FAMILY: ipv4 (index i is 198.18.0.0 + i, RFC 2544's range) or ipv6 (2001:db8:b:: + i, RFC 3849's).

local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } wrk_timespec;
int clock_gettime(int clk_id, wrk_timespec *tp);
]]
local ts = ffi.new("wrk_timespec")

-- CLOCK_MONOTONIC in microseconds: wrk's own duration is always -d (its main thread sleeps that long), so the
-- pass's time is taken here, from a thread's first request to its last answer.
local function now_us()
   ffi.C.clock_gettime(1, ts)
   return tonumber(ts.tv_sec) * 1000000 + math.floor(tonumber(ts.tv_nsec) / 1000)
end

local threads = {}

function setup(thread)
   thread:set("tid", #threads)
   table.insert(threads, thread)
end

local function address(family, i)
   if family == "ipv4" then
      return string.format("198.%d.%d.%d", 18 + math.floor(i / 65536), math.floor(i / 256) % 256, i % 256)
   end
   return string.format("2001:db8:b::%x:%x", math.floor(i / 65536), i % 65536)
end

function init(args)
   method, chain, family = args[1], args[2], args[3]
   start = tonumber(args[4])
   local quotas = {}
   for q in string.gmatch(args[5], "%d+") do table.insert(quotas, tonumber(q)) end
   nthreads = #quotas
   quota = quotas[tid + 1]
   first_us, last_us = 0, 0
   sent, answered, health, created, existed, deleted, other = 0, 0, 0, 0, 0, 0, 0
   prefix = "/chain/" .. chain .. "/" .. family .. "/"
   -- wrk calls thread 0's request() once before the run, to count the requests in the string it returns
   -- (script_verify_request in wrk.c): that one is never sent, so it must not take an address.
   primed = tid ~= 0
end

function request()
   if not primed then
      primed = true
      return wrk.format("GET", "/health")
   end
   if sent >= quota then
      return wrk.format("GET", "/health")
   end
   if sent == 0 then first_us = now_us() end
   local i = start + tid + sent * nthreads
   sent = sent + 1
   return wrk.format(method, prefix .. address(family, i))
end

function response(status, headers, body)
   if string.find(body, '"status"%s*:%s*"ok"') then
      health = health + 1
      return
   end
   answered = answered + 1
   if status == 201 then
      created = created + 1
   elseif status == 200 and method == "PUT" then
      existed = existed + 1
   elseif status == 200 and string.find(body, '"deleted"%s*:%s*true') then
      deleted = deleted + 1
   else
      other = other + 1
      if other <= 3 then io.stderr:write("wrk: ", status, " ", body, "\n") end
   end
   last_us = now_us()
   if answered >= quota then
      wrk.thread:stop()
   end
end

local names = {"first_us", "last_us", "sent", "answered", "health", "created", "existed", "deleted", "other"}

function done(summary, latency, requests)
   local per = {}
   for _, t in ipairs(threads) do
      local fields = {}
      for _, name in ipairs(names) do
         table.insert(fields, string.format('"%s": %d', name, t:get(name) or 0))
      end
      table.insert(per, "{" .. table.concat(fields, ", ") .. "}")
   end
   local e = summary.errors
   io.write(string.format('WRK-JSON {"requests": %d, "duration_us": %d, "bytes": %d, "errors": {"connect": %d, ' ..
      '"read": %d, "write": %d, "status": %d, "timeout": %d}, "p50_us": %d, "p90_us": %d, "p99_us": %d, ' ..
      '"max_us": %d, "threads": [%s]}\n', summary.requests, summary.duration, summary.bytes, e.connect, e.read,
      e.write, e.status, e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency.max, table.concat(per, ", ")))
end
