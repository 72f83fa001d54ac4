-- settle: moves one message out of a list and, only if it was still there, pushes its replacement
-- onto another (RedisAcker: requeue and dead-letter; Inspect::requeue_dead for RedisBroker).
--
-- KEYS[1]  the list to remove the message from: a consumer's in-flight list (or a dead-letter list)
-- KEYS[2]  the destination list: the queue, or the dead-letter list <queue>.dead
-- ARGV[1]  the message's exact bytes, which identify it in KEYS[1] (one occurrence is removed)
-- ARGV[2]  the bytes to push onto the tail of KEYS[2]
--
-- Atomic: the removal and the push are one step, so the message is never lost nor duplicated, even when
-- another worker recovered it meanwhile or another client requeues the same entry.
-- Returns 1 if the message was moved, 0 if it was no longer in KEYS[1] (then nothing is pushed).
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
  redis.call('RPUSH', KEYS[2], ARGV[2])
  return 1
end
return 0
