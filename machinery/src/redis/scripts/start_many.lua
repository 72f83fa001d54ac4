-- start_many (after state_lib): stores STARTED for a batch of tasks a worker fetched together, each after
-- its check (revocation, SUCCESS), in one script call instead of one per task (a Redis without cluster
-- mode; the keys are in no common slot). See store_state in state_lib.lua for the rules of each write.
--
-- KEYS[i]  the uuid of task i (Go's state record)
-- ARGV[1]  expiry in seconds
-- ARGV[2]  the error texts of the marks that stop a start (revoked, cancelled), one per line
-- ARGV[3 + 5(i-1) ..]  task i's five pieces: the JSON text before the TaskName value, the TaskName
--          value (or '' to keep the previous record's), the CreatedAt value (or ''), the text after it,
--          and the middle (State, Results, Error) of its STARTED
--
-- Returns one answer per task, in order: 1 written, 0 revoked or SUCCESS already (nothing written), or the text of the
-- error that refused that task's write (a key that is not a string); one task's refusal leaves the
-- others' writes alone.
local answers = {}
for i, key in ipairs(KEYS) do
  local at = 2 + (i - 1) * 5
  local answer = store_state(key, ARGV[at + 1], ARGV[at + 2], ARGV[at + 3], ARGV[at + 4], ARGV[1], '',
                             ARGV[2], {ARGV[at + 5]}, nil, nil)
  if type(answer) == 'table' and answer['err'] then answer = answer['err'] end
  answers[i] = answer
end
return answers
