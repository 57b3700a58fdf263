-- bench/wrk.py's /health pass: GET /health (no auth: the daemon's cheapest answer) for the duration given to wrk;
-- done() prints one JSON line for bench/wrk.py, as block.lua does.

wrk.method = "GET"
wrk.path = "/health"
local threads = {}

function setup(thread)
   table.insert(threads, thread)
end

function init(args)
   answered, other = 0, 0
end

function response(status, headers, body)
   if status == 200 then answered = answered + 1 else other = other + 1 end
end

function done(summary, latency, requests)
   local ok, bad = 0, 0
   for _, t in ipairs(threads) do
      ok = ok + (t:get("answered") or 0)
      bad = bad + (t:get("other") or 0)
   end
   local e = summary.errors
   io.write(string.format('WRK-JSON {"requests": %d, "duration_us": %d, "bytes": %d, "errors": {"connect": %d, ' ..
      '"read": %d, "write": %d, "status": %d, "timeout": %d}, "p50_us": %d, "p90_us": %d, "p99_us": %d, ' ..
      '"max_us": %d, "threads": [{"answered": %d, "other": %d}]}\n', summary.requests, summary.duration,
      summary.bytes, e.connect, e.read, e.write, e.status, e.timeout, latency:percentile(50),
      latency:percentile(90), latency:percentile(99), latency.max, ok, bad))
end
