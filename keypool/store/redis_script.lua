-- One atomic change to one key's shared breaker, on Redis's own clock (milliseconds).
-- Mirrors keypool/store/_model.py `apply`, which the contract tests hold both to.
-- KEYS: 1 state hash, 2 trial-slot sorted set, 3 epoch marker: its value names this incarnation of
--       the shared state (missing: the state was lost; a new value: it was lost and made again)
-- ARGV: 1 op, 2 failure_threshold, 3 success_threshold, 4 timeout_ms, 5 backoff_multiplier,
--       6 max_timeout_ms, 7 jitter, 8 half_open_max_calls, 9 probe_timeout_ms, 10 token,
--       11 arg (ms: a throttle's length, a trial lease's), 12 reason, 13 channel, 14 provider,
--       15 key_id, 16 random in [0, 1), 17 cap (renew: the latest expiry) or the local stamp
--       (merge), 18-22 (merge) the local view: open, open_until, throttled_until, quarantine,
--       reason, 23 (merge) the epoch to start if there is none
-- Returns the state (open, ou, tu, q, f, s, k, reason, v), allowed, changed, now, epoch, stamp and
-- the trial slots as a flat list (token, expiry, ...); a change is also published on the channel.
local h, z, epoch = KEYS[1], KEYS[2], KEYS[3]
local op = ARGV[1]
if op == 'merge' then
  redis.call('SET', epoch, ARGV[23], 'NX')
end
local eid = redis.call('GET', epoch)
if not eid then
  return {'lost'}
end
local fth, sth = tonumber(ARGV[2]), tonumber(ARGV[3])
local timeout, mult, maxt = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local jitter, hmax, probe = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local token, arg, why = ARGV[10], tonumber(ARGV[11]), ARGV[12]
local cap = tonumber(ARGV[17]) or 0
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local r = redis.call('HMGET', h, 'open', 'ou', 'tu', 'q', 'f', 's', 'k', 'reason', 'v', 'ts')
local open, ou, tu = tonumber(r[1]) or 0, tonumber(r[2]) or 0, tonumber(r[3]) or 0
local q, f, sc = r[4] or '', tonumber(r[5]) or 0, tonumber(r[6]) or 0
local k, reason, v, ts = tonumber(r[7]) or 0, r[8] or '', tonumber(r[9]) or 0, tonumber(r[10]) or 0
local before = table.concat({open, ou, tu, q, f, sc, k, reason}, '|')
local state_before = table.concat({open, ou, tu, q}, '|')
local slots_before = table.concat(redis.call('ZRANGE', z, 0, -1, 'WITHSCORES'), '|')

redis.call('ZREMRANGEBYSCORE', z, '-inf', now)
if token ~= '' and op ~= 'renew' then redis.call('ZREM', z, token) end
local half = open == 1 and q == '' and now >= ou
local allowed = 0

local function trip(w)
  k = k + 1
  local d = math.min(timeout * (mult ^ (k - 1)), maxt)
  if jitter > 0 then d = d + d * jitter * tonumber(ARGV[16]) end
  open, ou, f, sc, reason = 1, now + math.floor(d + 0.5), 0, 0, w
  redis.call('DEL', z)
end
local function close()
  open, ou, f, sc, k = 0, 0, 0, 0, 0
  redis.call('DEL', z)
end

if op == 'failure' then
  if q == '' then
    if half and token ~= '' then trip('trial_failed')
    elseif open == 0 then
      f = f + 1
      if f >= fth then trip('failures') end
    end
  end
elseif op == 'success' then
  if q == '' then
    if half and token ~= '' then
      sc = sc + 1
      if sc >= sth then close() end
    elseif open == 0 and f > 0 then f = 0 end
  end
elseif op == 'claim' then
  if q ~= '' or tu > now or (open == 1 and now < ou) then allowed = 0
  elseif open == 0 then allowed = 1
  elseif redis.call('ZCARD', z) < hmax then
    local lease = probe
    if arg > 0 and arg < probe then lease = arg end
    redis.call('ZADD', z, now + lease, token)
    allowed = 1
  end
elseif op == 'renew' then
  if token ~= '' and q == '' then
    local exp = redis.call('ZSCORE', z, token)
    if exp then
      local untl = now + arg
      if cap > 0 and cap < untl then untl = cap end
      if untl > tonumber(exp) then redis.call('ZADD', z, untl, token) end
    end
  end
elseif op == 'throttle' then
  if now + arg > tu then tu = now + arg end
elseif op == 'quarantine' then
  if q == '' then
    q, open, f, sc = (why ~= '' and why or 'manual'), 1, 0, 0
    redis.call('DEL', z)
  end
elseif op == 'trip' then
  if q == '' then trip('failures') end
elseif op == 'reset' then
  q, tu = '', 0
  close()
elseif op == 'merge' then
  -- After the store was unreachable or lost state: the side that changed last wins, whole.
  local lopen, lou, ltu, lq, lwhy = tonumber(ARGV[18]), tonumber(ARGV[19]), tonumber(ARGV[20]),
    ARGV[21], ARGV[22]
  if cap > ts then
    local same = lopen == open and (lopen == 0 or lou == ou)
    local tripped = lopen == 1 and lq == ''
    if tripped then
      reason = (lwhy ~= '' and lwhy or 'failures')
      if k < 1 then k = 1 end
    elseif lq == '' then
      k = 0
    end
    if lopen == 1 then ou = lou else ou = 0 end
    open, tu, q, f, sc = lopen, ltu, lq, 0, 0
    if not same then redis.call('DEL', z) end
  end
end

if table.concat({open, ou, tu, q}, '|') ~= state_before then
  if op == 'merge' then ts = cap else ts = now end
end
local slots = redis.call('ZRANGE', z, 0, -1, 'WITHSCORES')
local changed = 0
if table.concat({open, ou, tu, q, f, sc, k, reason}, '|') ~= before
    or table.concat(slots, '|') ~= slots_before then
  changed = 1
  v = v + 1
  redis.call('HSET', h, 'open', open, 'ou', ou, 'tu', tu, 'q', q, 'f', f, 's', sc, 'k', k,
    'reason', reason, 'v', v, 'ts', ts)
  redis.call('PUBLISH', ARGV[13], cjson.encode({p = ARGV[14], k = ARGV[15],
    s = {open, ou, tu, q, f, sc, k, reason, v, ts}, t = slots, e = eid}))
end
return {open, ou, tu, q, f, sc, k, reason, v, allowed, changed, now, eid, ts, slots}
