-- Read-only views for operators and the release loop; one round trip, one clock reading, no writes.
-- ARGV: 2 phone, or '' for the account view (ARGV[1] and KEYS: see guard_lib.lua)
-- Phone view: {streak, in_flight, blocked_until ms or 0}.
-- Account view: {failures_in_window, in_flight, restricted_until ms or 0, reason or '', blocked numbers}.
local state, window_key, blocks = KEYS[1], KEYS[2], KEYS[3]
local now, streak_limit, cooldown, memory, _, _, window = read_args(ARGV[1])
local phone = ARGV[2]

if phone ~= '' then
  local s, n, lf = phone_state(redis.call('HGET', state, phone), now, streak_limit, cooldown, memory)
  local blocked_until = tonumber(redis.call('ZSCORE', blocks, phone) or '0')
  if blocked_until <= now then
    blocked_until = 0
  end
  if s >= streak_limit and lf + cooldown > blocked_until then
    blocked_until = lf + cooldown
  end
  return {s, n, blocked_until}
end

local failures = redis.call('ZCOUNT', window_key, '(' .. string.format('%d', now - window), '+inf')
local got = redis.call('HMGET', state, 'n', 'ru', 'rr')
local restricted_until = tonumber(got[2] or '0')
local reason = got[3] or ''
if restricted_until <= now then
  restricted_until, reason = 0, ''
end
local blocked = redis.call('ZCOUNT', blocks, '(' .. string.format('%d', now), '+inf')
return {failures, tonumber(got[1] or '0'), restricted_until, reason, blocked}
