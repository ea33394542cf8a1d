-- dump(): the account's whole live state, read at one instant, for `stkpush guard verify`. No writes.
-- Returns {now ms, the state hash as HGETALL gives it, the window's members inside the window with scores}.
local state, window_key = KEYS[1], KEYS[2]
local now, _, _, _, _, _, window = read_args(ARGV[1])
local fields = redis.call('HGETALL', state)
local failures = redis.call('ZRANGEBYSCORE', window_key, '(' .. string.format('%d', now - window), '+inf',
  'WITHSCORES')
return {now, fields, failures}
