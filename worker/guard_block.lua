-- block_phone(phone, seconds): the provider said this number is blocked for this account. Only ever extends.
-- ARGV: 2 phone, 3 duration ms (ARGV[1] and KEYS: see guard_lib.lua)
-- The blocks set has a member per blocked number, scored with the block's end.
local state, blocks = KEYS[1], KEYS[3]
local now = read_args(ARGV[1])
local duration = tonumber(ARGV[3])
local until_ms = now + duration
redis.call('ZREMRANGEBYSCORE', blocks, '-inf', string.format('%d', now))
redis.call('ZADD', blocks, 'GT', string.format('%d', until_ms), ARGV[2])
outlive(blocks, duration)
-- Admit consults the blocks set only while the latest block end lies ahead.
if until_ms > tonumber(redis.call('HGET', state, 'bz') or '0') then
  redis.call('HSET', state, 'bz', string.format('%d', until_ms))
  outlive(state, duration)
end
return 0
