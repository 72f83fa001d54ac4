-- give_back: returns one message a worker dropped without settling it to the head of its queue
-- (RedisAcker::abandon: a task cut off by a panic or a shutdown runs again at once, instead of when its
-- consumer closes or its heartbeat expires).
--
-- KEYS[1]  the consumer's in-flight list
-- KEYS[2]  the queue
-- KEYS[3]  the queue's redelivered set, machinery:redelivered:<queue>
-- ARGV[1]  the message's exact bytes, which identify it in KEYS[1] (one occurrence is moved)
-- ARGV[2]  seconds to keep the redelivery marks
--
-- Atomic: the message is removed from the in-flight list and pushed onto the head of the queue (where it
-- is taken next) in one step, and marked redelivered; if it was no longer in flight (settled, or returned
-- by a closing consumer or a recovery meanwhile), nothing happens.
-- Returns 1 if the message was moved, 0 otherwise.
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
  redis.call('LPUSH', KEYS[2], ARGV[1])
  redis.call('SADD', KEYS[3], redis.sha1hex(ARGV[1]))
  redis.call('EXPIRE', KEYS[3], ARGV[2])
  return 1
end
return 0
