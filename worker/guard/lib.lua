-- Shared by every guard script: worker/guard/guard.py prepends this file to each script body before loading it.
--
-- KEYS, in every script: 1 the account's state hash, 2 its failure window zset.
-- ARGV[1], in every script: the clock and the guard's limits, packed once by guard.py with struct ('>d' the
-- injected clock in ms, negative for Redis TIME; '>9d' the limits; then ";threshold:duration" per restriction
-- tier). redis-py packs every argument on every call, so one is cheaper than eleven, and struct.unpack is cheaper
-- than parsing text. Redis TIME is the server's clock, the only one every worker agrees on; Redis 7 replicates a
-- script's effects, so reading it is safe. Times are integer milliseconds.
--
-- The state hash holds, as fields:
--   <phone digits>  the number's state, packed '>HHdI4': streak, in flight, last failure ms, run_seq
--   t:<token>       the phone of a reservation in flight ('b' .. phone for one in the bulk lane)
--   n               reservations in flight (present from the first admit on)
--   nb              of those, the bulk lane's (present from the first bulk admit on)
--   q               the account's failure sequence number
--   ru, rr          restricted until (ms) and why
--   bl              the provider's blocks on numbers: ';<phone>:<until ms>' each (rare, so a short string)
--   bz              the latest end in bl, so admit reads bl only while some block runs
--   x, xw           guard time until which the state hash's and the window's TTLs need no top-up
--   e               the rebuild marker: the epoch of the ledger rebuild this state descends from (rebuild.lua).
--                   Without it admit refuses everything: the state is not known to be complete.
-- One hash keeps a tracked number under 100 bytes, and lets resolve (which only knows the token) reach the
-- number's state through a key passed in KEYS. run_seq is the sequence number of the first failure of the
-- current streak; revert uses it to tell whether a failure still belongs to the streak.

-- Returns now, streak_limit, cooldown, memory, max_inflight, budget, window, idle, gc_min, gc_sample, tiers.
local function read_args(packed)
  local now, streak_limit, cooldown, memory, max_inflight, budget, window, idle, gc_min, gc_sample, rest =
    struct.unpack('>dddddddddd', packed)
  if now < 0 then
    local t = redis.call('TIME')
    now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return now, streak_limit, cooldown, memory, max_inflight, budget, window, idle, gc_min, gc_sample,
    string.sub(packed, rest)
end

-- Unpack a number's state and apply the time rules, so every script sees the same logical streak: a streak at
-- the limit starts afresh `cooldown` after its last failure; one below the limit is forgotten after `memory`.
local function phone_state(value, now, streak_limit, cooldown, memory)
  if not value then
    return 0, 0, 0, 0
  end
  local s, n, lf, fs = struct.unpack('>HHdI4', value)
  if s > 0 then
    local rest = memory
    if s >= streak_limit then
      rest = cooldown
    end
    if now >= lf + rest then
      s, lf, fs = 0, 0, 0
    end
  end
  return s, n, lf, fs
end

-- The stored form of a number's state, or nil when there is nothing worth keeping (no streak, nothing in flight).
local function phone_value(s, n, lf, fs)
  if s == 0 then
    if n == 0 then
      return nil
    end
    lf, fs = 0, 0
  end
  return struct.pack('>HHdI4', s, n, lf, fs)
end

local function write_phone(state, phone, s, n, lf, fs)
  local value = phone_value(s, n, lf, fs)
  if value then
    redis.call('HSET', state, phone, value)
  else
    redis.call('HDEL', state, phone)
  end
end

-- Extend a key's TTL to at least `ttl`, never shorten it.
local function outlive(key, ttl)
  if redis.call('PTTL', key) < ttl then
    redis.call('PEXPIRE', key, ttl)
  end
end

-- TTLs are topped up rather than reset on every write: a key is given 9/8 of its required TTL and the guard time
-- until which it still has the full requirement (1/8 later) is kept in the state hash (x, xw), read with the
-- fields each script reads anyway. A busy key then pays for one PEXPIRE per eighth of its TTL.
local function grace(ttl)
  return ttl + math.floor(ttl / 8)
end

-- The state hash must outlive the idle TTL, a restriction and the latest block (admit trusts 'bz'). Call after
-- the script's writes (PEXPIRE on a key not yet created does nothing). Returns the guard time of the next top-up,
-- which the caller stores as 'x' in the same script.
local function top_up_state(state, now, idle, restricted_until, blocks_until)
  local ttl = grace(idle)
  if restricted_until - now > ttl then
    ttl = restricted_until - now
  end
  if blocks_until - now > ttl then
    ttl = blocks_until - now
  end
  redis.call('PEXPIRE', state, ttl)
  return now + math.floor(idle / 8)
end

-- The account is restricted until `now + duration` (never shortened); the state hash outlives the restriction.
local function restrict(state, now, duration, reason)
  local until_ms = now + duration
  if until_ms > tonumber(redis.call('HGET', state, 'ru') or '0') then
    redis.call('HSET', state, 'ru', string.format('%d', until_ms), 'rr', reason)
    outlive(state, duration)
  end
end

-- When the provider's block on `phone` ends (ms), or 0. `blocks` is the bl field.
local function blocked_until(blocks, phone)
  if not blocks then
    return 0
  end
  return tonumber(string.match(blocks, ';' .. phone .. ':(%d+)') or '0')
end

-- Look at a few random fields of the state hash and delete the numbers whose state died by time alone (a rest
-- that ended, a forgotten streak). Only failures leave such fields behind (any other settlement leaves a number
-- with no streak, whose field goes at once), so the caller runs this on one failure in four, sampling
-- 4 * GC_SAMPLE fields: dead fields then stay near 1/GC_SAMPLE of the hash. Small hashes are left alone.
local function collect(state, now, streak_limit, cooldown, memory, gc_min, gc_sample)
  if redis.call('HLEN', state) > gc_min then
    local fields = redis.call('HRANDFIELD', state, gc_sample, 'WITHVALUES')
    for i = 1, #fields, 2 do
      if string.match(fields[i], '^%d+$') then
        local s, n = phone_state(fields[i + 1], now, streak_limit, cooldown, memory)
        if s == 0 and n == 0 then
          redis.call('HDEL', state, fields[i])
        end
      end
    end
  end
end
