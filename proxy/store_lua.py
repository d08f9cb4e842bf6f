"""The Lua scripts behind RedisStore: one round trip to admit a call, one to settle it.

They run on Redis's own clock (TIME), so every proxy replica sees the same time. All
keys of a team share the hash tag ``{team}``, so a script touches one Cluster slot;
``tokens_per_day`` keys get the UTC day appended inside the script, which stays in
that slot. The arithmetic mirrors store_memory.py: per-minute limits are token
buckets refilled evenly over a minute, ``concurrent`` is a sorted set of leases
scored by expiry, ``tokens_per_day`` a counter per UTC day.
"""

from __future__ import annotations

_COMMON = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function available(key, limit)
  local s = redis.call('HMGET', key, 't', 'ts')
  if not s[1] then return limit end
  return math.min(limit, tonumber(s[1]) + (now - tonumber(s[2])) * limit / 60)
end
local function store_bucket(key, limit, left)
  redis.call('HSET', key, 't', left, 'ts', now)
  redis.call('EXPIRE', key, math.ceil((limit - left) / (limit / 60)) + 1)
end
"""

# KEYS[i]: state key of check i. ARGV: lease, lease_ttl, reserved, then kind and limit
# per check. Returns {admitted, day, refused index, retry_after, now, level per check}.
ADMIT = (
    _COMMON
    + """
local day = math.floor(tonumber(t[1]) / 86400)
local lease, ttl, reserved = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local refused, retry = 0, 0
local levels = {}
for i = 1, #KEYS do
  local kind, limit = tonumber(ARGV[2 + 2 * i]), tonumber(ARGV[3 + 2 * i])
  local wait = nil
  if kind == 3 then
    redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
    levels[i] = redis.call('ZCARD', KEYS[i])
    if levels[i] >= limit then wait = 1 end
  elseif kind == 4 then
    levels[i] = tonumber(redis.call('GET', KEYS[i] .. ':' .. day) or '0')
    if reserved > limit or levels[i] + reserved > limit then wait = (day + 1) * 86400 - now end
  else
    local need = reserved
    if kind == 1 then need = 1 end
    levels[i] = available(KEYS[i], limit)
    if need > limit then wait = 60
    elseif levels[i] < need then wait = (need - levels[i]) / (limit / 60) end
  end
  if wait and refused == 0 then refused, retry = i, wait end
end
if refused == 0 then
  for i = 1, #KEYS do
    local kind, limit = tonumber(ARGV[2 + 2 * i]), tonumber(ARGV[3 + 2 * i])
    if kind == 3 then
      redis.call('ZADD', KEYS[i], now + ttl, lease)
      redis.call('EXPIRE', KEYS[i], math.ceil(ttl * 2))
    elseif kind == 4 then
      redis.call('INCRBY', KEYS[i] .. ':' .. day, reserved)
      redis.call('EXPIRE', KEYS[i] .. ':' .. day, 172800)
    else
      local need = reserved
      if kind == 1 then need = 1 end
      store_bucket(KEYS[i], limit, levels[i] - need)
    end
  end
end
local out = {refused == 0 and 1 or 0, day, refused, tostring(retry), tostring(now)}
for i = 1, #KEYS do out[#out + 1] = tostring(levels[i]) end
return out
"""
)

# KEYS: done marker, ledger hash, ledger index, then the state key of each check.
# ARGV: day, model, lease, reserved, used, prompt, completion, estimated, then kind and
# limit per check. Returns 0 if this request was already settled, else 1.
SETTLE = (
    _COMMON
    + """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', 86400) then return 0 end
local day, model, lease = ARGV[1], ARGV[2], ARGV[3]
local delta = tonumber(ARGV[5]) - tonumber(ARGV[4])
local prefix = ''
if ARGV[8] == '1' then prefix = 'estimated_' end
redis.call('HINCRBY', KEYS[2], 'requests', 1)
if ARGV[6] ~= '0' then redis.call('HINCRBY', KEYS[2], prefix .. 'prompt_tokens', ARGV[6]) end
if ARGV[7] ~= '0' then redis.call('HINCRBY', KEYS[2], prefix .. 'completion_tokens', ARGV[7]) end
redis.call('SADD', KEYS[3], day .. ':' .. model)
for i = 4, #KEYS do
  local j = i - 3
  local kind, limit = tonumber(ARGV[7 + 2 * j]), tonumber(ARGV[8 + 2 * j])
  if kind == 3 then
    redis.call('ZREM', KEYS[i], lease)
  elseif kind == 4 then
    redis.call('INCRBY', KEYS[i] .. ':' .. day, delta)
  elseif kind == 2 then
    store_bucket(KEYS[i], limit, math.min(limit, available(KEYS[i], limit) - delta))
  end
end
return 1
"""
)

# KEYS: concurrency keys. ARGV: lease, ttl. Keeps a long call's slots alive: the lease's
# expiry, and the set's own, which ADMIT set to twice the ttl from the last admission (a
# call outliving it would otherwise lose its slot with the whole set). Only a lease still
# there extends the set (CH: ZADD counts the score it changed).
RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ttl = tonumber(ARGV[2])
for i = 1, #KEYS do
  if redis.call('ZADD', KEYS[i], 'XX', 'CH', now + ttl, ARGV[1]) == 1 then
    redis.call('EXPIRE', KEYS[i], math.ceil(ttl * 2))
  end
end
return 1
"""
