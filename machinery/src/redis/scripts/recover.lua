-- recover: returns the in-flight messages of a queue's dead consumers to the queue (run by live
-- consumers' background tasks, one per queue per period, and by RedisBroker::recover_dead_consumers).
--
-- KEYS[1]  the queue's consumer registry, machinery:consumers:<queue> (a set of consumer tags)
-- KEYS[2]  the queue
-- KEYS[3]  the queue's redelivered set, machinery:redelivered:<queue>
-- KEYS[4]  the queue's recovery lock, machinery:recovering:<queue> (holds the tag of the last scanner)
-- ARGV[1]  heartbeat key prefix, machinery:heartbeat:<queue>: (a tag completes the key)
-- ARGV[2]  in-flight key prefix, machinery:inflight:<queue>: (a tag completes the key)
-- ARGV[3]  the caller's own consumer tag, never recovered ('' when the caller is not a consumer)
-- ARGV[4]  seconds to keep the redelivery marks
-- ARGV[5]  milliseconds to hold the recovery lock; '0' scans without it (an explicit call)
--
-- With a lock time, the round scans only if it takes KEYS[4] (SET NX PX): one round per queue per lock
-- time, whichever consumer comes first; the others return -1 at once, without reading the registry.
-- Scanning, for every other registered consumer whose heartbeat key has expired: moves its in-flight
-- messages, tail first, to the head of the queue (so they keep their original order and run next),
-- marks each redelivered (SHA-1 hex of the body), and unregisters the consumer. Atomic: a message is in
-- exactly one list at every moment, and two callers recovering at once cannot both move it.
-- Returns how many messages were moved (-1: skipped, another consumer holds the lock). The in-flight
-- and heartbeat keys are built here from the prefixes, which is why Redis Cluster is not supported.
if tonumber(ARGV[5]) > 0 and not redis.call('SET', KEYS[4], ARGV[3], 'NX', 'PX', ARGV[5]) then
  return -1
end
local moved = 0
for _, tag in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if tag ~= ARGV[3] and redis.call('EXISTS', ARGV[1] .. tag) == 0 then
    local inflight = ARGV[2] .. tag
    while true do
      local m = redis.call('LMOVE', inflight, KEYS[2], 'RIGHT', 'LEFT')
      if not m then break end
      redis.call('SADD', KEYS[3], redis.sha1hex(m))
      moved = moved + 1
    end
    redis.call('SREM', KEYS[1], tag)
  end
end
if moved > 0 then redis.call('EXPIRE', KEYS[3], ARGV[4]) end
return moved
