-- rebuild(epoch, image): replace the account's state with one derived from the ledger, in one atomic step, and
-- write the marker. Runs only while the marker is missing, so two rebuilds racing each other (or a rebuild
-- racing admits that a finished rebuild let through) never throw away reservations made since.
-- ARGV: 2 epoch (any short text), 3 the image as JSON (worker/guard/recovery.py, GuardImage.to_json)
-- Returns 1 when rebuilt, 0 when the marker was already there (nothing changes).
local state, window_key = KEYS[1], KEYS[2]
if redis.call('HEXISTS', state, 'e') == 1 then
  return 0
end
local now, _, _, _, _, _, window, idle = read_args(ARGV[1])
local image = cjson.decode(ARGV[3])

redis.call('DEL', state, window_key)
local in_flight, bulk_in_flight = 0, 0
-- Each reservation is {token, phone, lane}; a bulk one is stored as 'b' .. phone and counted in 'nb' too, as
-- admit.lua does, so resolve lowers the right lane's count.
for _, reservation in ipairs(image.reservations) do
  if reservation[3] == 'bulk' then
    redis.call('HSET', state, 't:' .. reservation[1], 'b' .. reservation[2])
    bulk_in_flight = bulk_in_flight + 1
  else
    redis.call('HSET', state, 't:' .. reservation[1], reservation[2])
  end
  in_flight = in_flight + 1
end
-- Each number is {phone, streak, in flight, last failure ms, run_seq}, as lib.lua packs it.
for _, number in ipairs(image.phones) do
  local value = phone_value(number[2], number[3], number[4], number[5])
  if value then
    redis.call('HSET', state, number[1], value)
  end
end
-- Each failure is {ms, seq, phone, token}: the member form resolve.lua writes, so revert can find it.
local newest = 0
for _, failure in ipairs(image.failures) do
  redis.call('ZADD', window_key, string.format('%d', failure[1]),
    string.format('%d|%s|%s', failure[2], failure[3], failure[4]))
  newest = math.max(newest, failure[1])
end
local restricted_until = image.restricted_until
if restricted_until > now then
  redis.call('HSET', state, 'ru', string.format('%d', restricted_until), 'rr', image.restriction_reason)
else
  restricted_until = 0
end
local kept, latest = {}, 0
for _, block in ipairs(image.blocks) do
  if block[2] > now then
    kept[#kept + 1] = ';' .. block[1] .. ':' .. string.format('%d', block[2])
    latest = math.max(latest, block[2])
  end
end
if #kept > 0 then
  redis.call('HSET', state, 'bl', table.concat(kept), 'bz', string.format('%d', latest))
end
if bulk_in_flight > 0 then
  redis.call('HSET', state, 'nb', bulk_in_flight)
end
redis.call('HSET', state, 'n', in_flight, 'q', string.format('%d', image.seq), 'e', ARGV[2],
  'xw', now + math.floor(window / 8))
if newest > 0 then
  redis.call('PEXPIRE', window_key, grace(window))
end
redis.call('HSET', state, 'x', top_up_state(state, now, idle, restricted_until, latest))
return 1
