-- set_state (after state_lib): stores task states in Go's record, keeping what the new state lacks from
-- the previous record (Go's mergeNewTaskState, on the server); optionally announces it and acknowledges
-- the message (RedisBackend's state writes, and a Redis broker's acknowledgement with its final state).
-- All in one atomic step; see store_state in state_lib.lua for the rules.
--
-- KEYS[1]  the task uuid (Go's state record)
-- KEYS[2]  optional: a Redis broker's in-flight list, to acknowledge the message in the same step
-- ARGV[1]  JSON text before the TaskName value
-- ARGV[2]  the TaskName value (JSON), or '' to keep the previous record's
-- ARGV[3]  the CreatedAt value (JSON), or '' to keep the previous record's
-- ARGV[4]  JSON text after the CreatedAt value
-- ARGV[5]  expiry in seconds
-- ARGV[6]  channel to announce the last state on (the message is its JSON), or ''
-- ARGV[7]  for a start: the error texts of the marks that stop it (revoked, cancelled), one per line;
--          '' for any other write (then the previous record is not checked)
-- ARGV[8..] one or more "middles": the text from after TaskName up to CreatedAt (State, Results, Error),
--          one state each
-- last     with KEYS[2] only: the message's exact bytes, removed from KEYS[2] once the states are
--          written
--
-- Returns 1, or 0 if a revocation or a SUCCESS stopped a start, or a WRONGTYPE error.
local last = #ARGV
if KEYS[2] then last = last - 1 end
local middles = {}
for i = 8, last do middles[#middles + 1] = ARGV[i] end
return store_state(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], middles,
                   KEYS[2], ARGV[#ARGV])
