-- promote: moves due delayed tasks to their queues (each consumer's background task, and
-- RedisBroker::promote_delayed).
--
-- KEYS[1]  the delayed-task sorted set (Go's delayed_tasks; score = ETA in Unix nanoseconds)
-- ARGV[1]  now, in Unix nanoseconds
-- ARGV[2]  most entries to move in this call (the next call moves the rest)
-- ARGV[3]  the default queue
--
-- Takes due entries earliest first and pushes each, byte for byte, onto the tail of the queue named by
-- its RoutingKey (Go's key, or any spelling of it, as Go's decoder accepts), or of the default queue
-- when it has none or the body is not JSON (the worker then dead-letters it). Reading the routing key
-- with cjson does not re-encode the body. Atomic: many workers polling at once neither duplicate nor
-- lose an entry.
-- Returns how many entries were moved.
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, m in ipairs(due) do
  redis.call('ZREM', KEYS[1], m)
  local queue = ARGV[3]
  local ok, sig = pcall(cjson.decode, m)
  if ok and type(sig) == 'table' then
    local rk = sig['RoutingKey']
    if rk == nil then
      for k, v in pairs(sig) do
        if type(k) == 'string' and string.lower(k) == 'routingkey' then rk = v end
      end
    end
    if type(rk) == 'string' and rk ~= '' then queue = rk end
  end
  redis.call('RPUSH', queue, m)
end
return #due
