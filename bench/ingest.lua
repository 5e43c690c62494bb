-- wrk script for bench/ingest.py: replays pre-signed, distinct webhook requests.
--
--   wrk -t T -c C -d D -s bench/ingest.lua URL -- REQUESTS_FILE T
--
-- REQUESTS_FILE has one request a line: "<message_id> <hmac-sha256 hex> <json body>".
-- Thread i of T takes lines i, i+T, i+2T, ... so no two threads send the same message, and
-- builds every raw request in init(): nothing is signed or formatted on the hot path.
-- Each thread counts answers by status and by JSON status ("received", "duplicate"), and
-- how many times it ran out of lines and started again ("wraps": must be 0 for syncd, or
-- some requests were duplicates rather than new durable inserts). done() prints one line,
-- "WRKJSON {...}", which bench/ingest.py parses.

local threads = {}

function setup(thread)
   thread:set("tid", #threads)
   table.insert(threads, thread)
end

function init(args)
   local path, nthreads = args[1], tonumber(args[2])
   requests = {}
   local index = 0
   for line in io.lines(path) do
      if index % nthreads == tid then
         local signature, body = line:match("^%S+ (%x+) (.*)$")
         local headers = {
            ["Content-Type"] = "application/json",
            ["X-MasonHub-Signature"] = "sha256=" .. signature,
         }
         requests[#requests + 1] = wrk.format("POST", wrk.path, headers, body)
      end
      index = index + 1
   end
   count, nxt, wraps = #requests, 0, 0
   statuses, received, duplicate, other = {}, 0, 0, 0
end

function request()
   nxt = nxt + 1
   if nxt > count then
      nxt, wraps = 1, wraps + 1
   end
   return requests[nxt]
end

function response(status, headers, body)
   statuses[status] = (statuses[status] or 0) + 1
   if status == 200 then
      if body:find('"received"', 1, true) then
         received = received + 1
      elseif body:find('"duplicate"', 1, true) then
         duplicate = duplicate + 1
      else
         other = other + 1
      end
   end
end

function done(summary, latency, _)
   local codes, sent, wrapped = {}, 0, 0
   local got_received, got_duplicate, got_other = 0, 0, 0
   for _, thread in ipairs(threads) do
      for code, n in pairs(thread:get("statuses")) do
         codes[code] = (codes[code] or 0) + n
      end
      got_received = got_received + thread:get("received")
      got_duplicate = got_duplicate + thread:get("duplicate")
      got_other = got_other + thread:get("other")
      wrapped = wrapped + thread:get("wraps")
      sent = sent + thread:get("wraps") * thread:get("count") + thread:get("nxt")
   end
   local parts = {}
   for code, n in pairs(codes) do
      parts[#parts + 1] = string.format('"%d":%d', code, n)
   end
   local e = summary.errors
   io.write(string.format(
      'WRKJSON {"duration_us":%d,"responses":%d,"bytes":%d,"sent":%d,"wraps":%d,'
         .. '"received":%d,"duplicate":%d,"other_200":%d,"statuses":{%s},'
         .. '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},'
         .. '"latency_us":{"mean":%.1f,"stdev":%.1f,"max":%d,"p50":%d,"p90":%d,"p99":%d,'
         .. '"p99.9":%d}}\n',
      summary.duration, summary.requests, summary.bytes, sent, wrapped,
      got_received, got_duplicate, got_other, table.concat(parts, ","),
      e.connect, e.read, e.write, e.status, e.timeout,
      latency.mean, latency.stdev, latency.max, latency:percentile(50),
      latency:percentile(90), latency:percentile(99), latency:percentile(99.9)))
end
