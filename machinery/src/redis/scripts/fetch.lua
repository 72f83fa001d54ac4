-- fetch: hands a consumer up to ARGV[1] messages from its queue (RedisConsumer::fetch, and ::wait
-- right after its BLMOVE), and registers the consumer.
--
-- KEYS[1]  the queue (Go's list, named by the routing key)
-- KEYS[2]  this consumer's in-flight list, machinery:inflight:<queue>:<consumer tag>
-- KEYS[3]  the queue's redelivered set, machinery:redelivered:<queue> (SHA-1 hex of returned bodies)
-- KEYS[4]  the queue's consumer registry, machinery:consumers:<queue>
-- KEYS[5]  this consumer's heartbeat key, machinery:heartbeat:<queue>:<consumer tag>
-- ARGV[1]  how many messages to take (0 allowed)
-- ARGV[2]  this consumer's tag
-- ARGV[3]  now, in Unix milliseconds (a heartbeat's value)
-- ARGV[4]  the heartbeat timeout in milliseconds
-- ARGV[5]  optional: 'after-wait' when the script runs in one pipeline right after a BLMOVE from
--          KEYS[1] to KEYS[2]
--
-- Atomic: a message leaves the head of the queue only by arriving at the tail of the in-flight list, in
-- the queue's order, so a crash at any point loses nothing (recovery returns the in-flight list).
-- Every run registers the consumer in KEYS[4] (and, if its heartbeat key is missing, sets it to ARGV[3]
-- with a TTL of ARGV[4], so that it is never registered without one): a consumer that another one
-- recovered as dead (its in-flight list returned, its registration removed) and that fetches again is
-- registered again in the same step, so what it takes is never in a list recovery cannot see. After a
-- BLMOVE this runs next on the same connection, before anything else can.
-- Returns a flat array of pairs {body, redelivered 0/1}. With 'after-wait' the reply starts with one
-- more element: the redelivered flag of the in-flight list's last element, which is what BLMOVE moved,
-- if it moved anything (nothing runs between the two; the caller ignores the flag otherwise).
-- Reading a redelivered mark removes it. Bodies are pushed 1000 at a time to stay within Lua's
-- unpack limit.
if redis.call('SADD', KEYS[4], ARGV[2]) == 1 and redis.call('EXISTS', KEYS[5]) == 0 then
  redis.call('SET', KEYS[5], ARGV[3], 'PX', ARGV[4])
end
local out = {}
local marked = redis.call('EXISTS', KEYS[3]) == 1
if ARGV[5] then
  out[1] = 0
  local last = redis.call('LINDEX', KEYS[2], -1)
  if marked and last then out[1] = redis.call('SREM', KEYS[3], redis.sha1hex(last)) end
end
local taken = {}
local n = tonumber(ARGV[1])
if n > 0 then
  local popped = redis.call('LPOP', KEYS[1], n)
  if popped then
    for i = 1, #popped, 1000 do
      redis.call('RPUSH', KEYS[2], unpack(popped, i, math.min(i + 999, #popped)))
    end
    for _, m in ipairs(popped) do taken[#taken + 1] = m end
  end
end
for _, m in ipairs(taken) do
  out[#out + 1] = m
  if marked then out[#out + 1] = redis.call('SREM', KEYS[3], redis.sha1hex(m)) else out[#out + 1] = 0 end
end
return out
