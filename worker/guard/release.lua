-- release_phone(phone): an operator frees a number held at its streak limit; its streak starts afresh.
-- ARGV: 2 phone (ARGV[1] and KEYS: see lib.lua)
-- Returns 1 when the number had a streak, 0 otherwise. Sends in flight and provider blocks are kept.
local state = KEYS[1]
local phone = ARGV[2]
local now, streak_limit, cooldown, memory = read_args(ARGV[1])
local s, n, lf, fs = phone_state(redis.call('HGET', state, phone), now, streak_limit, cooldown, memory)
if s == 0 then
  return 0
end
write_phone(state, phone, 0, n, lf, fs)
return 1
