-- complete_member: counts a finished group member and elects the one call that triggers the chord
-- (Backend::complete_group_member for RedisBackend).
--
-- KEYS[1]  the group record (the group uuid, Go's GroupMeta JSON)
-- KEYS[2]  the finished-member set, machinery:chord:<group uuid>:done
-- KEYS[3]  the member list, machinery:chord:<group uuid>:members (the group's task uuids, in order)
-- KEYS[4]  the progress hash, machinery:chord:<group uuid> (fields cursor, fired, winner)
-- KEYS[5]  Go's chord lock, TriggerChordMutex (absent on a Redis Cluster)
-- ARGV[1]  the finished member's task uuid
-- ARGV[2]  the group's task count
-- ARGV[3]  expiry in seconds of the keys above
-- ARGV[4]  'own' on a Redis Cluster: KEYS[2..4] are {<group uuid>}:chord…, in the group record's slot;
--          only members in the set count (no member states are read, they live in other slots) and Go's
--          lock is not looked at
--
-- Atomic, so exactly one call ever sees the group complete: returns 1 to that call (and sets
-- ChordTriggered in the group record, keeping its TTL, and stores its member as the field winner of
-- KEYS[4], with the same expiry), 0 otherwise, -1 while a Go worker holds TriggerChordMutex (call again),
-- -2 if the group record is missing when the group completes. Every later call for the winning member
-- (its reply was lost, its message was redelivered) returns 1 again, at once and without touching the
-- group record; calls for any other member, and every call once Go fired the chord, return 0.
-- Members finished by our workers are counted in the set, so a pure Rust group needs no state reads.
-- Members finished by Go workers are not in the set: a cursor walks the group in order, advancing past
-- members that are in the set or whose stored state is final, and stops at the first that is not; each
-- member is passed once, and each call reads at most one state that does not advance it.
if redis.call('HGET', KEYS[4], 'winner') == ARGV[1] then return 1 end
local own = ARGV[4] == 'own'
if not own and redis.call('EXISTS', KEYS[5]) == 1 then return -1 end
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[3])
if redis.call('HGET', KEYS[4], 'fired') then return 0 end
local meta = redis.call('GET', KEYS[1])
if redis.call('SCARD', KEYS[2]) < tonumber(ARGV[2]) then
  if own or not meta then return 0 end
  if redis.call('EXISTS', KEYS[3]) == 0 then
    local ok, t = pcall(cjson.decode, meta)
    if not ok or type(t) ~= 'table' or type(t['TaskUUIDs']) ~= 'table' or #t['TaskUUIDs'] == 0 then
      return 0
    end
    local uuids = t['TaskUUIDs']
    for i = 1, #uuids, 1000 do
      redis.call('RPUSH', KEYS[3], unpack(uuids, i, math.min(i + 999, #uuids)))
    end
    redis.call('EXPIRE', KEYS[3], ARGV[3])
  end
  local n = redis.call('LLEN', KEYS[3])
  local cursor = tonumber(redis.call('HGET', KEYS[4], 'cursor') or '0')
  while cursor < n do
    local member = redis.call('LINDEX', KEYS[3], cursor)
    if redis.call('SISMEMBER', KEYS[2], member) == 0 then
      local raw = redis.call('GET', member)
      if not raw then break end
      local ok, st = pcall(cjson.decode, raw)
      if not ok or type(st) ~= 'table' or (st['State'] ~= 'SUCCESS' and st['State'] ~= 'FAILURE') then
        break
      end
    end
    cursor = cursor + 1
  end
  redis.call('HSET', KEYS[4], 'cursor', cursor)
  redis.call('EXPIRE', KEYS[4], ARGV[3])
  if cursor < n then return 0 end
end
if not meta then return -2 end
redis.call('HSET', KEYS[4], 'fired', '1')
redis.call('EXPIRE', KEYS[4], ARGV[3])
if string.find(meta, '"ChordTriggered":true', 1, true) then return 0 end
local updated, replaced = string.gsub(meta, '"ChordTriggered":false', '"ChordTriggered":true', 1)
if replaced == 0 then
  local ok, t = pcall(cjson.decode, meta)
  if not ok or type(t) ~= 'table' then return -2 end
  if t['ChordTriggered'] == true then return 0 end
  t['ChordTriggered'] = true
  updated = cjson.encode(t)
end
redis.call('SET', KEYS[1], updated, 'KEEPTTL')
redis.call('HSET', KEYS[4], 'winner', ARGV[1])
return 1
