-- set_state: stores task states in Go's record, keeping what the new state lacks from the previous
-- record (Go's mergeNewTaskState, on the server); optionally announces it and acknowledges the message
-- (RedisBackend's state writes, and a Redis broker's acknowledgement with its final state).
--
-- KEYS[1]  the task uuid (Go's state record)
-- KEYS[2]  optional: a Redis broker's in-flight list, to acknowledge the message in the same step
-- ARGV[1]  JSON text before the TaskName value
-- ARGV[2]  the TaskName value (JSON), or '' to keep the previous record's
-- ARGV[3]  the CreatedAt value (JSON), or '' to keep the previous record's
-- ARGV[4]  JSON text after the CreatedAt value
-- ARGV[5]  expiry in seconds
-- ARGV[6]  channel to announce the last state on (the message is its JSON), or ''
-- ARGV[7]  the error texts of the marks that stop a start (revoked, cancelled), one per line, or ''
--          (then no revocation check)
-- ARGV[8..] one or more "middles": the text from after TaskName up to CreatedAt (State, Results, Error),
--          one state each
-- last     with KEYS[2] only: the message's exact bytes, removed from KEYS[2] once the states are
--          written
--
-- Writes one state per middle, in order, each as SET ... EX; announces the last; then removes the
-- message from the in-flight list. All in one atomic step, the state before the acknowledgement, so a
-- failure leaves the message in flight (it runs again) and never acknowledged without its state.
-- A key that holds anything but a string (a queue's list, say) is never replaced: the script answers
-- WRONGTYPE and changes nothing.
-- Returns 1; with revocation texts, writes nothing and returns 0 if the previous record is one of those
-- marks. Only strings are read from the old record; the JSON text we made is stored as it is (big
-- integers in results stay exact). The old record is decoded only when a look at its text cannot tell:
-- a record without results holds TaskName and CreatedAt once, at the top level, as plain JSON strings
-- that are copied as they are, and a record without the word FAILURE is no revocation.
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind ~= 'none' and kind ~= 'string' then
  return redis.error_reply('WRONGTYPE ' .. KEYS[1] .. ' holds a ' .. kind .. ', not a task state')
end
local name, created = ARGV[2], ARGV[3]
local raw = false
if name == '' or created == '' or ARGV[7] ~= '' then raw = redis.call('GET', KEYS[1]) end
local old = nil
local function decoded()
  if old == nil then
    old = false
    if raw then
      local ok, t = pcall(cjson.decode, raw)
      if ok and type(t) == 'table' then old = t end
    end
  end
  return old
end
if ARGV[7] ~= '' and raw and string.find(raw, 'FAILURE', 1, true) then
  local t = decoded()
  if t and t['State'] == 'FAILURE' then
    for text in string.gmatch(ARGV[7], '[^\n]+') do
      if t['Error'] == text then return 0 end
    end
  end
end
local plain = raw and not string.find(raw, '"Results":[', 1, true)
local function kept(key, default)
  local copied = plain and string.match(raw, '"' .. key .. '":("[^"\\]*")')
  if copied then return copied end
  local t = decoded()
  local prev = default
  if t and type(t[key]) == 'string' then prev = t[key] end
  return cjson.encode(prev)
end
if name == '' then name = kept('TaskName', '') end
if created == '' then created = kept('CreatedAt', '0001-01-01T00:00:00Z') end
local last = #ARGV
if KEYS[2] then last = last - 1 end
local text
for i = 8, last do
  text = ARGV[1] .. name .. ARGV[i] .. created .. ARGV[4]
  redis.call('SET', KEYS[1], text, 'EX', ARGV[5])
end
if ARGV[6] ~= '' then redis.call('PUBLISH', ARGV[6], text) end
if KEYS[2] then redis.call('LREM', KEYS[2], 1, ARGV[#ARGV]) end
return 1
