-- Read-only views for operators and the release loop; one round trip, one clock reading, no writes.
-- ARGV: 2 phone, or '' for the account view (ARGV[1] and KEYS: see lib.lua)
-- Phone view: {streak, in_flight, blocked_until ms or 0}.
-- Account view: {failures_in_window, in_flight, restricted_until ms or 0, reason or '', blocked numbers,
-- bulk in flight}.
local state, window_key = KEYS[1], KEYS[2]
local now, streak_limit, cooldown, memory, _, _, window = read_args(ARGV[1])
local phone = ARGV[2]

if phone ~= '' then
  local got = redis.call('HMGET', state, phone, 'bl')
  local s, n, lf = phone_state(got[1], now, streak_limit, cooldown, memory)
  local block_end = blocked_until(got[2], phone)
  if block_end <= now then
    block_end = 0
  end
  if s >= streak_limit and lf + cooldown > block_end then
    block_end = lf + cooldown
  end
  return {s, n, block_end}
end

local failures = redis.call('ZCOUNT', window_key, '(' .. string.format('%d', now - window), '+inf')
local got = redis.call('HMGET', state, 'n', 'ru', 'rr', 'bl', 'nb')
local restricted_until = tonumber(got[2] or '0')
local reason = got[3] or ''
if restricted_until <= now then
  restricted_until, reason = 0, ''
end
local blocked = 0
for _, entry_until in string.gmatch(got[4] or '', ';(%d+):(%d+)') do
  if tonumber(entry_until) > now then
    blocked = blocked + 1
  end
end
return {failures, tonumber(got[1] or '0'), restricted_until, reason, blocked, tonumber(got[5] or '0')}
