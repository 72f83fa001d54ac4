-- unique_release: releases a unique-task key if the given task holds it (its final state is stored).
--
-- KEYS[1]  the unique-task key
-- ARGV[1]  the task's id
--
-- Returns 1 if the key was deleted, 0 if another task (or none) holds it: a later claim is never undone.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
