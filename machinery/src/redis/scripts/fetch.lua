-- fetch: hands a consumer up to ARGV[1] messages from its queue (RedisConsumer::fetch, and ::wait
-- right after its BLMOVE).
--
-- KEYS[1]  the queue (Go's list, named by the routing key)
-- KEYS[2]  this consumer's in-flight list, machinery:inflight:<queue>:<consumer tag>
-- KEYS[3]  the queue's redelivered set, machinery:redelivered:<queue> (SHA-1 hex of returned bodies)
-- ARGV[1]  how many messages to take (0 allowed)
-- ARGV[2]  optional: 'after-wait' when the script runs in one pipeline right after a BLMOVE from
--          KEYS[1] to KEYS[2]
--
-- Atomic: a message leaves the head of the queue only by arriving at the tail of the in-flight list, in
-- the queue's order, so a crash at any point loses nothing (recovery returns the in-flight list).
-- Returns a flat array of pairs {body, redelivered 0/1}. With 'after-wait' the reply starts with one
-- more element: the redelivered flag of the in-flight list's last element, which is what BLMOVE moved,
-- if it moved anything (nothing runs between the two; the caller ignores the flag otherwise).
-- Reading a redelivered mark removes it. Bodies are pushed 1000 at a time to stay within Lua's
-- unpack limit.
local out = {}
local marked = redis.call('EXISTS', KEYS[3]) == 1
if ARGV[2] then
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
