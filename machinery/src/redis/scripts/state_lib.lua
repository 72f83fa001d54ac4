-- state_lib: the state write that set_state and start_many share (each script is this file followed by
-- its own; Redis runs a script as one source text, so they are joined when the crate is built).
--
-- store_state(key, prefix, name, created, suffix, expire, channel, revoked, middles, inflight, message)
--   key       the task uuid (Go's state record)
--   prefix    JSON text before the TaskName value
--   name      the TaskName value (JSON), or '' to keep the previous record's
--   created   the CreatedAt value (JSON), or '' to keep the previous record's
--   suffix    JSON text after the CreatedAt value
--   expire    expiry in seconds
--   channel   channel to announce the last state on (the message is its JSON), or ''
--   revoked   for a start (RECEIVED, STARTED): the error texts of the marks that stop it (revoked,
--             cancelled), one per line; '' for any other write (then the previous record is not checked)
--   middles   a list of one or more "middles": the text from after TaskName up to CreatedAt (State,
--             Results, Error), one state each
--   inflight  optional: a Redis broker's in-flight list, to acknowledge the message in the same step
--   message   with inflight only: the message's exact bytes, removed from inflight once the states
--             are written
--
-- Writes one state per middle, in order, each as SET ... EX; announces the last; then removes the
-- message from the in-flight list: the state before the acknowledgement, so a failure leaves the message
-- in flight (it runs again) and never acknowledged without its state.
-- A key that holds anything but a string (a queue's list, say) is never replaced: the answer is a
-- WRONGTYPE error reply and nothing changes.
-- Returns 1; for a start, writes nothing and returns 0 if the previous record is one of those marks or a
-- SUCCESS (every send stores PENDING first, so a SUCCESS means the task already ran since it was last
-- sent, and this start is a second copy's: STARTED must not hide that SUCCESS). Only strings are read from the old record; the JSON text we made is stored as it is (big
-- integers in results stay exact). The old record is decoded only when a look at its text cannot tell:
-- a record without results holds TaskName and CreatedAt once, at the top level, as plain JSON strings
-- that are copied as they are, and a record without the word FAILURE is no revocation.
local function store_state(key, prefix, name, created, suffix, expire, channel, revoked, middles,
                           inflight, message)
  local kind = redis.call('TYPE', key)['ok']
  if kind ~= 'none' and kind ~= 'string' then
    return redis.error_reply('WRONGTYPE ' .. key .. ' holds a ' .. kind .. ', not a task state')
  end
  local raw = false
  if name == '' or created == '' or revoked ~= '' then raw = redis.call('GET', key) end
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
  if revoked ~= '' and raw and string.find(raw, 'SUCCESS', 1, true) then
    local t = decoded()
    if t and t['State'] == 'SUCCESS' then return 0 end
  end
  if revoked ~= '' and raw and string.find(raw, 'FAILURE', 1, true) then
    local t = decoded()
    if t and t['State'] == 'FAILURE' then
      for text in string.gmatch(revoked, '[^\n]+') do
        if t['Error'] == text then return 0 end
      end
    end
  end
  local plain = raw and not string.find(raw, '"Results":[', 1, true)
  local function kept(field, default)
    if plain then
      -- Plain searches (a pattern would try every position of the record): the first "field":" is the
      -- top-level key, as a string value's own quotes are escaped; its value is copied unless escaped.
      local _, open = string.find(raw, '"' .. field .. '":"', 1, true)
      local close = open and string.find(raw, '"', open + 1, true)
      if close and not string.find(string.sub(raw, open, close), '\\', 1, true) then
        return string.sub(raw, open, close)
      end
    end
    local t = decoded()
    local prev = default
    if t and type(t[field]) == 'string' then prev = t[field] end
    return cjson.encode(prev)
  end
  if name == '' then name = kept('TaskName', '') end
  if created == '' then created = kept('CreatedAt', '0001-01-01T00:00:00Z') end
  local text
  for _, middle in ipairs(middles) do
    text = prefix .. name .. middle .. created .. suffix
    redis.call('SET', key, text, 'EX', expire)
  end
  if channel ~= '' then redis.call('PUBLISH', channel, text) end
  if inflight then redis.call('LREM', inflight, 1, message) end
  return 1
end
