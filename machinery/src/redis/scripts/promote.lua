-- promote: moves due delayed tasks to their queues (each consumer's background task, and
-- RedisBroker::promote_delayed).
--
-- KEYS[1]  the delayed-task sorted set (Go's delayed_tasks; score = ETA in Unix nanoseconds)
-- KEYS[2]  the default queue's dead-letter list (<default queue>.dead)
-- ARGV[1]  now, in Unix nanoseconds
-- ARGV[2]  most entries to move in this call (the next call moves the rest)
-- ARGV[3]  the default queue
-- ARGV[4]  now, in Go's time format (the dead-letter envelope's "at")
-- ARGV[5]  the largest entry whose JSON may be decoded here, in bytes
--
-- Takes due entries earliest first and pushes each, byte for byte, onto the tail of the queue named by
-- its RoutingKey, or of the default queue when it has none or the body is not JSON (the worker then
-- dead-letters it). The routing key is found by scanning the text for Go's `"RoutingKey":"…"` (the
-- first one is the top level's: Go and we write RoutingKey before any nested signature), so a large
-- entry is never decoded here; only a small entry with another spelling of the key (Go's decoder
-- accepts any case) is decoded with cjson. The entry leaves the set only after its push succeeded; a
-- push the server refuses (the routing key names a key that is not a list) puts the entry in the
-- default queue's dead letters with the reason instead, so nothing is lost and nothing blocks the set.
-- Atomic: many workers polling at once neither duplicate nor lose an entry.
-- Returns how many entries were moved (dead-lettered ones included).
local function routing_key(m)
  local rk = string.match(m, '"RoutingKey"%s*:%s*"([^"\\]*)"')
  if rk ~= nil then return rk end
  if #m > tonumber(ARGV[5]) then return nil end
  local ok, sig = pcall(cjson.decode, m)
  if not ok or type(sig) ~= 'table' then return nil end
  for k, v in pairs(sig) do
    if type(k) == 'string' and string.lower(k) == 'routingkey' and type(v) == 'string' then
      return v
    end
  end
  return nil
end

local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, m in ipairs(due) do
  local queue = routing_key(m)
  if queue == nil or queue == '' then queue = ARGV[3] end
  local pushed = redis.pcall('RPUSH', queue, m)
  if type(pushed) == 'table' and pushed['err'] then
    local reason = 'cannot move the delayed task to queue ' .. string.format('%q', queue) .. ': ' .. pushed['err']
    redis.call('RPUSH', KEYS[2], cjson.encode({queue = queue, reason = reason, at = ARGV[4], body = m}))
  end
  redis.call('ZREM', KEYS[1], m)
end
return #due
