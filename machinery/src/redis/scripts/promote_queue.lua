-- promote_queue: moves one queue's due delayed tasks onto it, on a Redis Cluster (each consumer's
-- background task for its queue, and RedisBroker::promote_delayed for the default queue).
--
-- KEYS[1]  the queue's delayed-task set, {<queue>}:delayed (score = ETA in Unix nanoseconds)
-- KEYS[2]  the queue (the list Go reads; {<queue>}:delayed hashes to its slot)
-- KEYS[3]  the queue's dead-letter list, {<queue>}:dead
-- ARGV[1]  now, in Unix nanoseconds
-- ARGV[2]  most entries to move in this call (the next call moves the rest)
-- ARGV[3]  now, in Go's time format (the dead-letter envelope's "at")
--
-- Takes due entries earliest first and pushes each, byte for byte, onto the tail of the queue (the set
-- is the queue's own, so no routing key is read). An entry leaves the set only after its push
-- succeeded; a push the server refuses (the queue's key is not a list) puts the entry in the queue's dead
-- letters with the reason instead, so nothing is lost and nothing blocks the set.
-- Atomic: many workers polling at once neither duplicate nor lose an entry.
-- Returns how many entries were moved (dead-lettered ones included).
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, m in ipairs(due) do
  local pushed = redis.pcall('RPUSH', KEYS[2], m)
  if type(pushed) == 'table' and pushed['err'] then
    local reason = 'cannot move the delayed task to queue ' .. string.format('%q', KEYS[2]) .. ': ' .. pushed['err']
    redis.call('RPUSH', KEYS[3], cjson.encode({queue = KEYS[2], reason = reason, at = ARGV[3], body = m}))
  end
  redis.call('ZREM', KEYS[1], m)
end
return #due
