-- resolve(token, outcome): settle one reservation, in one atomic step.
-- ARGV: 2 token, 3 outcome ('success' | 'failure' | 'released') (ARGV[1] and KEYS: see lib.lua)
-- Returns 1 when a reservation was settled, 0 for an unknown or already settled token (nothing changes).
local state, window_key = KEYS[1], KEYS[2]
local reservation, outcome = 't:' .. ARGV[2], ARGV[3]

local phone = redis.call('HGET', state, reservation)
if not phone then
  return 0
end
-- A bulk reservation ('b' .. phone, admit.lua) also holds one of the bulk lane's sends in flight.
local bulk = string.byte(phone, 1) == 98
if bulk then
  phone = string.sub(phone, 2)
end

-- The bulk lane's count after this settlement, as fields to write (none for an interactive reservation).
local function bulk_fields(held)
  if not bulk then
    return {}
  end
  local nb = tonumber(held or '1') - 1
  if nb < 0 then
    nb = 0
  end
  return {'nb', nb}
end

if outcome ~= 'failure' then
  -- Success resets the streak; a release leaves it as stored (the time rules apply whenever it is read), so
  -- neither needs the clock. The state hash's TTL is topped up by admits, which run at least as often.
  local got = redis.call('HMGET', state, phone, 'n', 'nb')
  local value, n = got[1], 0
  if value then
    local s, held, lf, fs = struct.unpack('>HHdI4', value)
    if held > 0 then
      n = held - 1
    end
    if outcome == 'success' then
      s = 0
    end
    value = phone_value(s, n, lf, fs)
  end
  local in_flight = tonumber(got[2] or '1') - 1
  if in_flight < 0 then
    in_flight = 0
  end
  if value then
    redis.call('HDEL', state, reservation)
    redis.call('HSET', state, phone, value, 'n', in_flight, unpack(bulk_fields(got[3])))
  else
    redis.call('HDEL', state, reservation, phone)
    redis.call('HSET', state, 'n', in_flight, unpack(bulk_fields(got[3])))
  end
  return 1
end

local now, streak_limit, cooldown, memory, _, _, window, idle, gc_min, gc_sample, tiers = read_args(ARGV[1])
local got = redis.call('HMGET', state, phone, 'n', 'q', 'x', 'xw', 'nb')
local s, n, lf, fs = phone_state(got[1], now, streak_limit, cooldown, memory)
if n > 0 then
  n = n - 1
end
local in_flight = tonumber(got[2] or '1') - 1
if in_flight < 0 then
  in_flight = 0
end
local seq = tonumber(got[3] or '0') + 1
if s == 0 then
  fs = seq
end
s = s + 1
lf = now

-- Fields to write besides the number's own. The state hash exists (it holds the reservation), so its TTL can
-- be topped up before the writes.
local extra = {'n', in_flight, 'q', seq}
if bulk then
  local nb = bulk_fields(got[6])
  extra[#extra + 1], extra[#extra + 2] = nb[1], nb[2]
end
if now >= tonumber(got[4] or '0') then
  local ends = redis.call('HMGET', state, 'ru', 'bz')
  local due = top_up_state(state, now, idle, tonumber(ends[1] or '0'), tonumber(ends[2] or '0'))
  extra[#extra + 1], extra[#extra + 2] = 'x', due
end

local window_start = string.format('%d', now - window)
-- Readers count only entries inside the window, so trimming the ones that slid out can wait for every 16th.
if seq % 16 == 0 then
  redis.call('ZREMRANGEBYSCORE', window_key, '-inf', window_start)
end
-- The member names the failure so that revert can find it by token; seq keeps two failures of one token apart.
redis.call('ZADD', window_key, string.format('%d', now), string.format('%d|%s|%s', seq, phone, ARGV[2]))
local failures = redis.call('ZCOUNT', window_key, '(' .. window_start, '+inf')
-- The window needs a TTL of a window from its newest entry: top it up when due, or when it may be new (a trim
-- can empty and so delete it).
if failures == 1 or now >= tonumber(got[5] or '0') then
  redis.call('PEXPIRE', window_key, grace(window))
  extra[#extra + 1], extra[#extra + 2] = 'xw', now + math.floor(window / 8)
end
-- The provider restricts from the failure that takes the window above a tier's threshold.
for threshold, duration in string.gmatch(tiers, '(%d+):(%d+)') do
  if failures == tonumber(threshold) + 1 then
    restrict(state, now, tonumber(duration), 'more than ' .. threshold .. ' failures in the window')
  end
end

redis.call('HDEL', state, reservation)
redis.call('HSET', state, phone, phone_value(s, n, lf, fs), unpack(extra))
if seq % 4 == 0 then
  collect(state, now, streak_limit, cooldown, memory, gc_min, gc_sample)
end
return 1
