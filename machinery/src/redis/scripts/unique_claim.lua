-- unique_claim: claims a unique-task key for a task unless another task holds it (Signature::unique_for).
--
-- KEYS[1]  the unique-task key (machinery_unique_<hash of name and arguments>)
-- ARGV[1]  the claiming task's id
-- ARGV[2]  how long the claim lasts, in milliseconds
--
-- Returns false (nil) once ARGV[1] holds the key (claimed now, or held already), else the holder's id.
-- The read and the write are one atomic step, so of many senders at once exactly one claims the key.
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return holder end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
