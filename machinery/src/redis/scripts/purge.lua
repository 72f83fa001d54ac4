-- purge: empties a queue (Inspect::purge for RedisBroker).
--
-- KEYS[1]  the queue
-- (no ARGV)
--
-- Atomic: counts and deletes in one step, so a message pushed meanwhile is either counted and deleted
-- or left in place.
-- Returns how many messages the queue held.
local n = redis.call('LLEN', KEYS[1])
redis.call('DEL', KEYS[1])
return n
