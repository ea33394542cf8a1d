-- block_phone(phone, seconds): the provider said this number is blocked for this account. Only ever extends.
-- ARGV: 2 phone, 3 duration ms (ARGV[1] and KEYS: see lib.lua)
local state = KEYS[1]
local now = read_args(ARGV[1])
local phone, duration = ARGV[2], tonumber(ARGV[3])
local until_ms = math.max(now + duration, blocked_until(redis.call('HGET', state, 'bl'), phone))
-- Rewrite the list without ended blocks and with this one; bz is the latest end.
local kept, latest = {}, until_ms
for entry_phone, entry_until in string.gmatch(redis.call('HGET', state, 'bl') or '', ';(%d+):(%d+)') do
  entry_until = tonumber(entry_until)
  if entry_phone ~= phone and entry_until > now then
    kept[#kept + 1] = ';' .. entry_phone .. ':' .. string.format('%d', entry_until)
    latest = math.max(latest, entry_until)
  end
end
kept[#kept + 1] = ';' .. phone .. ':' .. string.format('%d', until_ms)
redis.call('HSET', state, 'bl', table.concat(kept), 'bz', string.format('%d', latest))
outlive(state, latest - now)
return 0
