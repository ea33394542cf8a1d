-- revert_failure(token): a late success takes back the latest failure recorded for this token.
-- ARGV: 2 token (ARGV[1] and KEYS: see lib.lua)
-- Returns 1 when a failure still in the window was taken back, else 0 (nothing changes).
local state, window_key = KEYS[1], KEYS[2]
local token = ARGV[2]
local now, streak_limit, cooldown, memory, _, _, window = read_args(ARGV[1])

-- Reverts are rare and the window is bounded by the account budget, so a scan beats an index kept per failure.
local found, found_seq, found_phone = nil, -1, nil
local window_start = '(' .. string.format('%d', now - window)
for _, member in ipairs(redis.call('ZRANGEBYSCORE', window_key, window_start, '+inf')) do
  local seq, phone, owner = string.match(member, '^(%d+)|([^|]*)|(.*)$')
  seq = tonumber(seq)
  -- Phone '-' marks a failure from another channel (external.lua): no token of ours ever owns it.
  if owner == token and phone ~= '-' and seq > found_seq then
    found, found_seq, found_phone = member, seq, phone
  end
end
if not found then
  return 0
end
redis.call('ZREM', window_key, found)

-- The streak goes down by one only while the failure still belongs to it: not after a success, a fresh start or
-- forgetting (each of which began a new streak, with a later run_seq). Lowering a streak needs no longer TTL.
local s, n, lf, fs = phone_state(redis.call('HGET', state, found_phone), now, streak_limit, cooldown, memory)
if s > 0 and found_seq >= fs then
  write_phone(state, found_phone, s - 1, n, lf, fs)
end
return 1
