-- rate_reserve: reserves the next start of a rate-limited task (#[task(rate_limit = "N/s")]) in the
-- schedule every worker sharing this server uses ("generic cell rate": one start per interval).
--
-- KEYS[1]  the task's schedule (machinery_rate_<task name>): the next free instant, in microseconds
-- ARGV[1]  the interval between two starts, in microseconds
--
-- Returns how many microseconds from now the reserved start is (0: at once). Time is the server's, so
-- the workers' clocks do not matter. The key expires once its schedule is in the past.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local at = tonumber(redis.call('GET', KEYS[1]) or '0')
if at < now then at = now end
local next = at + interval
redis.call('SET', KEYS[1], string.format('%.0f', next), 'PX', math.ceil((next - now) / 1000) + 1000)
return at - now
