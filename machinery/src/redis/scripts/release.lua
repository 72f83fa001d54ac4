-- release: a consumer's goodbye (RedisConsumer: on close, and on start, for what a previous consumer
-- with the same tag left behind).
--
-- KEYS[1]  the queue's consumer registry, machinery:consumers:<queue>
-- KEYS[2]  the queue
-- KEYS[3]  the queue's redelivered set, machinery:redelivered:<queue>
-- KEYS[4]  this consumer's in-flight list
-- KEYS[5]  this consumer's heartbeat key
-- KEYS[6]  this consumer's worker card, machinery:worker:<queue>:<consumer tag> (optional)
-- ARGV[1]  this consumer's tag
-- ARGV[2]  seconds to keep the redelivery marks
--
-- Atomic: moves every unacknowledged message, tail first, to the head of the queue (original order
-- kept), marks each redelivered, deletes the heartbeat (and the card: a worker that said goodbye is
-- not shown as gone) and leaves the registry, in one step.
-- Returns how many messages were returned.
local moved = 0
while true do
  local m = redis.call('LMOVE', KEYS[4], KEYS[2], 'RIGHT', 'LEFT')
  if not m then break end
  redis.call('SADD', KEYS[3], redis.sha1hex(m))
  moved = moved + 1
end
if moved > 0 then redis.call('EXPIRE', KEYS[3], ARGV[2]) end
redis.call('DEL', KEYS[5])
if KEYS[6] then redis.call('DEL', KEYS[6]) end
redis.call('SREM', KEYS[1], ARGV[1])
return moved
