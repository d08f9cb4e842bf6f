"""The Lua scripts behind RedisStore: one to admit calls, one to settle them, one to renew.

They run on Redis's own clock (TIME), so every proxy replica sees the same time. All
keys of a team share the hash tag ``{team}``, so a script touches one Cluster slot;
``tokens_per_day`` keys get the UTC day appended inside the script, which stays in
that slot. The arithmetic mirrors limits/memory.py: per-minute limits are token
buckets refilled evenly over a minute, ``concurrent`` is a sorted set of leases
scored by expiry in whole milliseconds, ``tokens_per_day`` a counter per UTC day.

Lease scores are integers because a small sorted set (up to 128 members: a team's
calls in flight) is a flat list that every ZADD and ZREM walks, reading each score:
an integer is stored as one, a fraction as text parsed anew at every step. With 100
leases, adding and removing one cost Redis 14.5 µs with fractional seconds, 4.7 µs
with integer milliseconds.
"""

from __future__ import annotations

_COMMON = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function available(key, limit)
  local s = redis.call('HMGET', key, 't', 'ts')
  if not s[1] then return limit end
  return math.min(limit, tonumber(s[1]) + (now - tonumber(s[2])) * limit / 60)
end
-- A day's UTC calendar month as year * 12 + month - 1 (store.month_of): Hinnant's
-- civil_from_days, in floors as Lua 5.1 has no integer division.
local function month_of(day)
  local z = day + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local y, m = yoe + era * 400, mp + 3
  if mp >= 10 then y, m = y + 1, mp - 9 end
  return y * 12 + m - 1
end
-- The key of a per-period check (tokens_per_day, the budgets) for the period of a day.
local function period_key(key, kind, day)
  if kind == 6 then return key .. ':m' .. month_of(tonumber(day)) end
  return key .. ':' .. day
end
local function period_ttl(kind)
  if kind == 6 then return 3456000 end  -- 40 days: a month, and a settlement's delay
  return 172800
end
local function store_bucket(key, limit, left)
  redis.call('HSET', key, 't', left, 'ts', now)
  redis.call('EXPIRE', key, math.ceil((limit - left) / (limit / 60)) + 1)
end
"""

# KEYS[i]: the state key of check i. ARGV: the number of calls, kind and limit per check,
# then per call: lease, lease ttl, reserved tokens, reserved micro-dollars (redis/batch.py
# gathers the calls). Budgets (kinds 5, 6) take the micro-dollars, the others the tokens;
# a refused budget's retry_after is -1: the proxy reckons the period's end from ``now``.
# Each check's state is read once and written once; the calls are taken in order, each
# against what the calls before it left, as separate runs at one instant would be.
# Returns per call {admitted, day, refused index, retry_after, now, level per check},
# the levels as the call found them.
ADMIT = (
    _COMMON
    + """
local day = math.floor(tonumber(t[1]) / 86400)
local n, calls = #KEYS, tonumber(ARGV[1])
local kinds, limits, levels = {}, {}, {}
for i = 1, n do
  local kind, limit = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  kinds[i], limits[i] = kind, limit
  if kind == 3 then
    redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now_ms)
    levels[i] = redis.call('ZCARD', KEYS[i])
  elseif kind >= 4 then
    levels[i] = tonumber(redis.call('GET', period_key(KEYS[i], kind, day)) or '0')
  else
    levels[i] = available(KEYS[i], limit)
  end
end
local out, admitted, ttl, taken, spent = {}, 0, 0, 0, 0
for c = 1, calls do
  local at = 2 * n + 4 * c - 2
  local lease, reserved, cost = ARGV[at], tonumber(ARGV[at + 2]), tonumber(ARGV[at + 3])
  local refused, retry = 0, 0
  local reply = {1, day, 0, '0', tostring(now)}
  for i = 1, n do
    local kind, limit, level = kinds[i], limits[i], levels[i]
    local wait = nil
    if kind == 3 then
      if level >= limit then wait = 1 end
    elseif kind == 4 then
      if reserved > limit or level + reserved > limit then wait = (day + 1) * 86400 - now end
    elseif kind >= 5 then
      if cost > limit or level + cost > limit then wait = -1 end
    else
      local need = reserved
      if kind == 1 then need = 1 end
      if need > limit then wait = 60
      elseif level < need then wait = (need - level) / (limit / 60) end
    end
    if wait and refused == 0 then refused, retry = i, wait end
    reply[5 + i] = tostring(level)
  end
  if refused == 0 then
    admitted, ttl, taken = admitted + 1, tonumber(ARGV[at + 1]), taken + reserved
    spent = spent + cost
    for i = 1, n do
      local kind = kinds[i]
      if kind == 3 then
        redis.call('ZADD', KEYS[i], now_ms + math.floor(ttl * 1000), lease)
        levels[i] = levels[i] + 1
      elseif kind == 4 then levels[i] = levels[i] + reserved
      elseif kind >= 5 then levels[i] = levels[i] + cost
      elseif kind == 1 then levels[i] = levels[i] - 1
      else levels[i] = levels[i] - reserved end
    end
  else
    reply[1], reply[3], reply[4] = 0, refused, tostring(retry)
  end
  out[c] = reply
end
if admitted > 0 then
  for i = 1, n do
    local kind = kinds[i]
    if kind == 3 then
      redis.call('EXPIRE', KEYS[i], math.ceil(ttl * 2))
    elseif kind >= 4 then
      local amount, key = taken, period_key(KEYS[i], kind, day)
      if kind >= 5 then amount = spent end
      if amount ~= 0 then
        redis.call('INCRBY', key, amount)
        redis.call('EXPIRE', key, period_ttl(kind))
      end
    else
      store_bucket(KEYS[i], limits[i], levels[i])
    end
  end
end
return out
"""
)

# KEYS: the ledger index, the state key of each check, then per call its done marker and
# its ledger hash. ARGV: the number of calls, kind and limit per check, then per call:
# day, model, lease, reserved, used, prompt, completion, estimated, cost, key label,
# reserved micro-dollars (a budget's hold, replaced by the cost). A
# call whose done marker is set already was settled before and is skipped. Token counts
# are added up per hash, in total and per key label (fields "requests@LABEL", …), and
# written once; a cost is added per call, as the integer string the proxy sent (a sum in
# Lua would be a double, exact only to 2**53). The token buckets take each call's
# correction in order, as separate runs would. Returns per call 1, or 0 if it had been
# settled already.
SETTLE = (
    _COMMON
    + """
local calls = tonumber(ARGV[1])
local n = #KEYS - 1 - 2 * calls
local fields = {'requests', 'prompt_tokens', 'completion_tokens', 'estimated_prompt_tokens',
                'estimated_completion_tokens'}
local out, leases, deltas, days, costs, books = {}, {}, {}, {}, {}, {}
local function count(book, first, prompt, completion)
  book[1] = book[1] + 1
  book[first] = book[first] + prompt
  book[first + 1] = book[first + 1] + completion
end
for c = 1, calls do
  local at, key = 2 * n + 11 * c - 9, n + 2 * c
  if redis.call('SET', KEYS[key], '1', 'NX', 'EX', 86400) then
    out[c] = 1
    local day, model, hash, label = ARGV[at], ARGV[at + 1], KEYS[key + 1], ARGV[at + 9]
    local delta = tonumber(ARGV[at + 4]) - tonumber(ARGV[at + 3])
    leases[#leases + 1] = ARGV[at + 2]
    deltas[#deltas + 1] = delta
    days[day] = (days[day] or 0) + delta
    costs[day] = (costs[day] or 0) + tonumber(ARGV[at + 8]) - tonumber(ARGV[at + 10])
    local book = books[hash]
    if not book then
      book = {all = {0, 0, 0, 0, 0}, by = {}}
      books[hash] = book
      redis.call('SADD', KEYS[1], day .. ':' .. model)
    end
    local split = book.by[label]
    if not split then
      split = {0, 0, 0, 0, 0}
      book.by[label] = split
    end
    local first = 2
    if ARGV[at + 7] == '1' then first = 4 end
    local prompt, completion = tonumber(ARGV[at + 5]), tonumber(ARGV[at + 6])
    count(book.all, first, prompt, completion)
    count(split, first, prompt, completion)
    if ARGV[at + 8] ~= '0' then
      redis.call('HINCRBY', hash, 'cost_micro_usd', ARGV[at + 8])
      redis.call('HINCRBY', hash, 'cost_micro_usd@' .. label, ARGV[at + 8])
    end
  else
    out[c] = 0
  end
end
if #leases == 0 then return out end
for hash, book in pairs(books) do
  for f = 1, 5 do
    if book.all[f] ~= 0 then redis.call('HINCRBY', hash, fields[f], book.all[f]) end
  end
  for label, split in pairs(book.by) do
    for f = 1, 5 do
      if split[f] ~= 0 then redis.call('HINCRBY', hash, fields[f] .. '@' .. label, split[f]) end
    end
  end
end
for i = 1, n do
  local kind, limit = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  if kind == 3 then
    redis.call('ZREM', KEYS[1 + i], unpack(leases))
  elseif kind >= 4 then
    local by_day = days
    if kind >= 5 then by_day = costs end
    for day, delta in pairs(by_day) do
      if delta ~= 0 then
        local key = period_key(KEYS[1 + i], kind, day)
        redis.call('INCRBY', key, delta)
        redis.call('EXPIRE', key, period_ttl(kind))
      end
    end
  elseif kind == 2 then
    local level = available(KEYS[1 + i], limit)
    for _, delta in ipairs(deltas) do level = math.min(limit, level - delta) end
    store_bucket(KEYS[1 + i], limit, level)
  end
end
return out
"""
)

# KEYS: the state keys of budget checks; ARGV: their kind codes. What each holds now
# (spent and held by calls in flight, this day or month), for GET /v1/usage. Returns
# {day, now, level per check}.
LEVELS = (
    _COMMON
    + """
local day = math.floor(tonumber(t[1]) / 86400)
local out = {day, tostring(now)}
for i = 1, #KEYS do
  out[2 + i] = redis.call('GET', period_key(KEYS[i], tonumber(ARGV[i]), day)) or '0'
end
return out
"""
)

# KEYS: concurrency keys. ARGV: lease, ttl. Keeps a long call's slots alive: the lease's
# expiry, and the set's own, which ADMIT set to twice the ttl from the last admission (a
# call outliving it would otherwise lose its slot with the whole set). Only a lease still
# there extends the set (CH: ZADD counts the score it changed).
RENEW = """
local t = redis.call('TIME')
local ttl = tonumber(ARGV[2])
local expiry = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + math.floor(ttl * 1000)
for i = 1, #KEYS do
  if redis.call('ZADD', KEYS[i], 'XX', 'CH', expiry, ARGV[1]) == 1 then
    redis.call('EXPIRE', KEYS[i], math.ceil(ttl * 2))
  end
end
return 1
"""
