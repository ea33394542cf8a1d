-- count_external_failure(reference, at_ms): a failed push the account made without stkpush (a payment button,
-- the dashboard), read from the transactions list. It fills the same window at the provider, so it fills ours:
-- once per provider reference (the member names it), at its own time, and a tier it crosses restricts the account.
-- ARGV: 2 provider reference, 3 when it failed, ms (ARGV[1] and KEYS: see lib.lua)
-- Returns 1 when it was counted now, 0 when it was counted before or is older than the window.
local state, window_key = KEYS[1], KEYS[2]
local reference, at = ARGV[2], tonumber(ARGV[3])
local now, _, _, _, _, _, window, _, _, _, tiers = read_args(ARGV[1])
local window_start = now - window
if at <= window_start then
  return 0
end
-- seq 0 and no phone: revert (which looks for a token) and the streak rules never touch it.
if redis.call('ZADD', window_key, 'NX', string.format('%d', at), '0|-|x:' .. reference) == 0 then
  return 0
end
outlive(window_key, grace(window))
local failures = redis.call('ZCOUNT', window_key, '(' .. string.format('%d', window_start), '+inf')
for threshold, duration in string.gmatch(tiers, '(%d+):(%d+)') do
  if failures == tonumber(threshold) + 1 then
    restrict(state, now, tonumber(duration), 'more than ' .. threshold .. ' failures in the window')
  end
end
return 1
