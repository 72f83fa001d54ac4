-- finish_many (after state_lib): stores the final states of tasks one consumer finished together and
-- acknowledges each task's message in the same step as its state, in one script call instead of one
-- per task (RedisAcker::try_ack_with_state, batched by the consumer's Finisher; a Redis without cluster
-- mode, where the keys are in no common slot). See store_state in state_lib.lua for the rules.
--
-- KEYS[i]      for i in 1..n: the uuid of task i (Go's state record)
-- KEYS[n + 1]  the consumer's in-flight list
-- ARGV[1]      expiry in seconds
-- ARGV[2]      n, the number of tasks
-- ARGV[3 + 7(i-1) ..]  task i's seven pieces: the JSON text before the TaskName value, the TaskName
--              value (or '' to keep the previous record's), the CreatedAt value (or ''), the text after
--              it, the channel to announce the state on (or ''), the middle (State, Results, Error),
--              and the message's exact bytes, removed from the in-flight list once its state is written
--
-- Returns one answer per task, in order: 1 (state written, then message acknowledged), or the text of
-- the error that refused that task's write (a key that is not a string; its message stays in flight).
-- One task's refusal leaves the others' writes alone.
local n = tonumber(ARGV[2])
local inflight = KEYS[n + 1]
local answers = {}
for i = 1, n do
  local at = 2 + (i - 1) * 7
  local answer = store_state(KEYS[i], ARGV[at + 1], ARGV[at + 2], ARGV[at + 3], ARGV[at + 4], ARGV[1],
                             ARGV[at + 5], '', {ARGV[at + 6]}, inflight, ARGV[at + 7])
  if type(answer) == 'table' and answer['err'] then answer = answer['err'] end
  answers[i] = answer
end
return answers
