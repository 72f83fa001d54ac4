-- stats: one queue's counts for inspection (Inspect::queue_stats for RedisBroker).
--
-- KEYS[1]  the queue
-- KEYS[2]  the delayed-task sorted set
-- KEYS[3]  the queue's consumer registry, machinery:consumers:<queue>
-- KEYS[4]  the queue's dead-letter list, <queue>.dead
-- ARGV[1]  the queue's name (to match delayed tasks' RoutingKey)
-- ARGV[2]  in-flight key prefix, machinery:inflight:<queue>: (a tag completes the key)
-- ARGV[3]  the default queue (for delayed tasks without a RoutingKey)
--
-- Read-only, and atomic: the four counts are one snapshot. It reads the whole delayed set, so it is
-- for the command-line tool, not for a worker's path.
-- Returns {pending, delayed for this queue, in flight over all registered consumers, dead}.
local delayed = 0
for _, m in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  local queue = ARGV[3]
  local ok, sig = pcall(cjson.decode, m)
  if ok and type(sig) == 'table' and type(sig['RoutingKey']) == 'string' and sig['RoutingKey'] ~= '' then
    queue = sig['RoutingKey']
  end
  if queue == ARGV[1] then delayed = delayed + 1 end
end
local inflight = 0
for _, tag in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  inflight = inflight + redis.call('LLEN', ARGV[2] .. tag)
end
return {redis.call('LLEN', KEYS[1]), delayed, inflight, redis.call('LLEN', KEYS[4])}
