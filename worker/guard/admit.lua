-- admit(phone, token, lane): decide and, when admitted, reserve, in one atomic step.
-- ARGV: 2 phone, 3 token, 4 lane: '' interactive (the whole budget), else the bulk lane's limits packed '>dd'
-- (the budget minus the interactive reserve, the bulk in-flight cap) (ARGV[1] and KEYS: see lib.lua)
-- Returns one integer (a small reply on the hot path): 0 admitted; -1 the token already holds a reservation for
-- another number; otherwise (retry_ms + 1) * 8 + reason, reason 1 phone blocked, 2 phone busy, 3 account budget,
-- 4 account restricted, 5 bulk lane full, 6 the guard's state is gone (no marker 'e'), and retry_ms -1 when
-- only a resolve (or a rebuild) can help.
-- A bulk reservation is stored as 'b' .. phone, so resolve knows which lane's count to lower.
local state, window_key = KEYS[1], KEYS[2]
local phone, reservation, lane = ARGV[2], 't:' .. ARGV[3], ARGV[4]

-- One read: the token's reservation, the number's state, in flight, restriction, latest block end, TTL due,
-- bulk in flight, and the rebuild marker.
local got = redis.call('HMGET', state, reservation, phone, 'n', 'ru', 'bz', 'x', 'nb', 'e')

-- No marker: Redis lost the state (a restart without data, a failover that lost writes). Counting from zero
-- would spend a budget the provider still counts: refuse until the state is rebuilt from the ledger.
if not got[8] then
  return 6
end

-- A redelivered task admits again with the same token: it already holds the reservation (in its first lane).
if got[1] then
  if got[1] == phone or got[1] == 'b' .. phone then
    return 0
  end
  return -1
end

local now, streak_limit, cooldown, memory, max_inflight, budget, window, idle = read_args(ARGV[1])

local restricted_until = tonumber(got[4] or '0')
if now < restricted_until then
  return (restricted_until - now + 1) * 8 + 4
end
local blocks_until = tonumber(got[5] or '0')
if now < blocks_until then
  -- Some number's block is still running: is it this one?
  local block_end = blocked_until(redis.call('HGET', state, 'bl'), phone)
  if now < block_end then
    return (block_end - now + 1) * 8 + 1
  end
end

local s, n, lf, fs = phone_state(got[2], now, streak_limit, cooldown, memory)
if s >= streak_limit then
  return (lf + cooldown - now + 1) * 8 + 1
end
-- Every send in flight may still fail, so it counts against the streak as well as the in-flight limit.
if n >= max_inflight or s + n >= streak_limit then
  return 2
end

-- Entries older than the window may linger until a trim; count only those inside it.
local window_start = string.format('%d', now - window)
local failures = redis.call('ZCOUNT', window_key, '(' .. window_start, '+inf')
local in_flight = tonumber(got[3] or '0')
-- Refuse with `code` when failures and sends in flight leave no room under `limit`.
local function over(limit, code)
  local excess = failures + in_flight - limit + 1
  if excess <= 0 then
    return nil
  end
  if excess <= failures then
    -- Exact: once the excess-th oldest failure slides out, the budget has room (if nothing else changes).
    redis.call('ZREMRANGEBYSCORE', window_key, '-inf', window_start)
    local entry = redis.call('ZRANGE', window_key, excess - 1, excess - 1, 'WITHSCORES')
    return (tonumber(entry[2]) + window - now + 1) * 8 + code
  end
  return code
end

local refused = over(budget, 3)
if refused then
  return refused
end

if lane == '' then
  redis.call('HSET', state, reservation, phone, phone, phone_value(s, n + 1, lf, fs), 'n', in_flight + 1)
else
  local bulk_budget, bulk_max = struct.unpack('>dd', lane)
  local bulk_in_flight = tonumber(got[7] or '0')
  -- Only a resolve lowers the bulk lane's own count.
  if bulk_in_flight >= bulk_max then
    return 5
  end
  refused = over(bulk_budget, 5)
  if refused then
    return refused
  end
  redis.call('HSET', state, reservation, 'b' .. phone, phone, phone_value(s, n + 1, lf, fs), 'n', in_flight + 1,
    'nb', bulk_in_flight + 1)
end
if now >= tonumber(got[6] or '0') then
  redis.call('HSET', state, 'x', top_up_state(state, now, idle, restricted_until, blocks_until))
end
return 0
