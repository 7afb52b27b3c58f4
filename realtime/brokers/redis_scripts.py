"""The Lua scripts of the Redis broker: each runs atomically inside one Redis instance.

Times are Redis's own (`TIME`, in milliseconds), so nodes whose clocks disagree still agree
on what has expired. Stream entries get automatic (time-based) ids, and history reads skip
the ones older than the history TTL; offsets are consecutive within an epoch, so "after
offset N" is "the newest top - N entries".
"""

from __future__ import annotations

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: meta hash, stream[, idempotency key]
# ARGV: pub/sub channel, head, tail, history size (0: none), history ttl ms, meta ttl s,
#       epoch for a new stream, idempotency ttl ms
# -> {offset, epoch, duplicate}
PUBLISH = """
if #KEYS == 3 then
  local seen = redis.call('GET', KEYS[3])
  if seen then
    local sep = string.find(seen, ' ', 1, true)
    return {tonumber(string.sub(seen, 1, sep - 1)), string.sub(seen, sep + 1), 1}
  end
end
local offset, epoch = 0, ''
local size = tonumber(ARGV[4])
if size > 0 then
  epoch = redis.call('HGET', KEYS[1], 'e')
  if not epoch then
    epoch = ARGV[7]
    redis.call('DEL', KEYS[2])
    redis.call('HSET', KEYS[1], 'e', epoch, 'o', 0)
  end
  offset = redis.call('HINCRBY', KEYS[1], 'o', 1)
  redis.call('EXPIRE', KEYS[1], ARGV[6])
end
local message = ARGV[2] .. cmsgpack.pack(offset, epoch) .. ARGV[3]
if size > 0 then
  redis.call('XADD', KEYS[2], 'MAXLEN', size, '*', 'p', message)
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
end
if #KEYS == 3 then
  redis.call('SET', KEYS[3], offset .. ' ' .. epoch, 'PX', ARGV[8])
end
redis.call('PUBLISH', ARGV[1], message)
return {offset, epoch, 0}
"""

# KEYS: meta hash, stream
# ARGV: epoch for a new stream, meta ttl s, history ttl ms, since offset (-1: none),
#       since epoch, limit (0: all, -1: position only), reverse (0/1)
# -> {top, epoch, message...}: with `since`, newest first (the caller orders and limits)
HISTORY = (
    """
local epoch = redis.call('HGET', KEYS[1], 'e')
local top = 0
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'e', epoch, 'o', 0)
else
  top = tonumber(redis.call('HGET', KEYS[1], 'o'))
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
local out = {top, epoch}
local limit = tonumber(ARGV[6])
if limit < 0 then
  return out
end
"""
    + _NOW
    + """
local min = tostring(now - tonumber(ARGV[3]) + 1)
local since = tonumber(ARGV[4])
local entries
if since >= 0 then
  if ARGV[5] ~= epoch or since >= top then
    return out
  end
  entries = redis.call('XREVRANGE', KEYS[2], '+', min, 'COUNT', top - since)
elseif ARGV[7] == '1' then
  if limit > 0 then
    entries = redis.call('XREVRANGE', KEYS[2], '+', min, 'COUNT', limit)
  else
    entries = redis.call('XREVRANGE', KEYS[2], '+', min)
  end
else
  if limit > 0 then
    entries = redis.call('XRANGE', KEYS[2], min, '+', 'COUNT', limit)
  else
    entries = redis.call('XRANGE', KEYS[2], min, '+')
  end
end
for i = 1, #entries do
  out[i + 2] = entries[i][2][2]
end
return out
"""
)

# The tops of many streams at once (the node's position checks), each as HISTORY answers
# a position-only read: a missing meta hash is created with a fresh epoch.
# KEYS: meta hash, stream, for each channel
# ARGV: epoch for a new stream, then each channel's meta ttl s
# -> {top, epoch, top, epoch, ...} in the order of the channels
POSITIONS = """
local out = {}
for i = 1, #KEYS, 2 do
  local meta = redis.call('HMGET', KEYS[i], 'e', 'o')
  local epoch, top = meta[1], 0
  if not epoch then
    epoch = ARGV[1]
    redis.call('DEL', KEYS[i + 1])
    redis.call('HSET', KEYS[i], 'e', epoch, 'o', 0)
  else
    top = tonumber(meta[2]) or 0
  end
  redis.call('EXPIRE', KEYS[i], ARGV[(i + 1) / 2 + 1])
  out[i] = top
  out[i + 1] = epoch
end
return out
"""

# KEYS: presence hash, presence zset, presence index
# ARGV: client, entry, ttl ms, channel -> 1 when the entry was not live before
PRESENCE_ADD = (
    _NOW
    + """
local old = redis.call('ZSCORE', KEYS[2], ARGV[1])
local ttl = tonumber(ARGV[3])
local expires = now + ttl
redis.call('ZADD', KEYS[2], expires, ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], 2 * ttl)
redis.call('PEXPIRE', KEYS[2], 2 * ttl)
redis.call('ZADD', KEYS[3], 'LT', expires, ARGV[4])
if old and tonumber(old) > now then
  return 0
end
return 1
"""
)

# KEYS: presence hash, presence zset; ARGV: client -> 1 when a live entry was removed
PRESENCE_REMOVE = (
    _NOW
    + """
local old = redis.call('ZSCORE', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[1], ARGV[1])
if old and tonumber(old) > now then
  return 1
end
return 0
"""
)

# KEYS: presence hash, presence zset -> the live entries
PRESENCE_GET = (
    _NOW
    + """
local clients = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. now, '+inf')
local out = {}
for i = 1, #clients, 1000 do
  local chunk = {}
  for j = i, math.min(i + 999, #clients) do
    chunk[#chunk + 1] = clients[j]
  end
  local entries = redis.call('HMGET', KEYS[1], unpack(chunk))
  for j = 1, #entries do
    if entries[j] then
      out[#out + 1] = entries[j]
    end
  end
end
return out
"""
)

# The presence index (one zset per Redis instance) scores each channel with a time at or
# before its earliest entry expiry: `ZADD LT` on every add keeps it a lower bound, and this
# script resets it to the true earliest after removing what expired. Removal and the
# returned list happen in one step, so exactly one node announces each expired entry.
# KEYS: presence index; ARGV: presence hash prefix, presence zset prefix, max entries
# -> {channel, entry, channel, entry, ...}
PRESENCE_EXPIRE = (
    _NOW
    + """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 100)
local out = {}
local budget = tonumber(ARGV[3])
for _, channel in ipairs(due) do
  local hash = ARGV[1] .. channel
  local zset = ARGV[2] .. channel
  local gone = redis.call('ZRANGEBYSCORE', zset, '-inf', now, 'LIMIT', 0, budget)
  for _, client in ipairs(gone) do
    local entry = redis.call('HGET', hash, client)
    redis.call('ZREM', zset, client)
    redis.call('HDEL', hash, client)
    if entry then
      out[#out + 1] = channel
      out[#out + 1] = entry
    end
  end
  budget = budget - #gone
  local first = redis.call('ZRANGE', zset, 0, 0, 'WITHSCORES')
  if #first == 0 then
    redis.call('ZREM', KEYS[1], channel)
  else
    redis.call('ZADD', KEYS[1], first[2], channel)
  end
  if budget <= 0 then
    break
  end
end
return out
"""
)

# A user's hash: one field per node where the user is connected ("until:refreshed", ms)
# and "seen" (ms). A field whose mark ran out belongs to a node that stopped refreshing it
# (it died): it is folded into "seen" at its last refresh.
_FOLD = """
local function fold(key, now)
  local fields = redis.call('HGETALL', key)
  local seen = 0
  local online = false
  for i = 1, #fields, 2 do
    local name, value = fields[i], fields[i + 1]
    if name == 'seen' then
      seen = math.max(seen, tonumber(value))
    else
      local sep = string.find(value, ':', 1, true)
      local untill = tonumber(string.sub(value, 1, sep - 1))
      if untill > now then
        online = true
      else
        seen = math.max(seen, tonumber(string.sub(value, sep + 1)))
        redis.call('HDEL', key, name)
      end
    end
  end
  return online, seen
end
"""

# KEYS: user hashes; ARGV: node, ttl ms, last seen ttl ms
USERS_ONLINE = (
    _NOW
    + _FOLD
    + """
local mark = string.format('%d:%d', now + tonumber(ARGV[2]), now)
for _, key in ipairs(KEYS) do
  if redis.call('HLEN', key) > 2 then
    local _, seen = fold(key, now)
    if seen > 0 then
      redis.call('HSET', key, 'seen', seen)
    end
  end
  redis.call('HSET', key, ARGV[1], mark)
  redis.call('PEXPIRE', key, ARGV[3])
end
return 1
"""
)

# KEYS: user hash; ARGV: node, last seen ttl ms
USER_OFFLINE = (
    _NOW
    + _FOLD
    + """
redis.call('HDEL', KEYS[1], ARGV[1])
fold(KEYS[1], now)
redis.call('HSET', KEYS[1], 'seen', now)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""
)

# KEYS: user hashes -> {online, last seen ms, ...} (last seen is now when online)
USER_STATUS = (
    _NOW
    + """
local out = {}
for _, key in ipairs(KEYS) do
  local fields = redis.call('HGETALL', key)
  local seen = 0
  local online = 0
  for i = 1, #fields, 2 do
    local name, value = fields[i], fields[i + 1]
    if name == 'seen' then
      seen = math.max(seen, tonumber(value))
    else
      local sep = string.find(value, ':', 1, true)
      if tonumber(string.sub(value, 1, sep - 1)) > now then
        online = 1
      else
        seen = math.max(seen, tonumber(string.sub(value, sep + 1)))
      end
    end
  end
  if online == 1 then
    seen = now
  end
  out[#out + 1] = online
  out[#out + 1] = seen
end
return out
"""
)

# ---------------------------------------------------------------------- nodes

# KEYS: node hash, node zset; ARGV: node id, info, ttl ms
NODE_REGISTER = (
    _NOW
    + """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
return 1
"""
)

# KEYS: node hash, node zset -> the live nodes' info (the expired ones are removed)
NODES = (
    _NOW
    + """
local dead = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
for _, id in ipairs(dead) do
  redis.call('HDEL', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
end
local out = {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  local info = redis.call('HGET', KEYS[1], id)
  if info then
    out[#out + 1] = info
  end
end
return out
"""
)

# ---------------------------------------------------------------------- MQTT sessions
# A session: hash p:ms:<client id> with o (owner node), u (user), x (expiry s), s
# (subscriptions), m (messages when written whole), n (next packet id); and list
# p:mq:<client id>, the messages queued after that.

# KEYS: session hash; ARGV: node id, user, grace ms
# -> {0} (another user's) or {1, previous owner, subscriptions, stored (1/0)}
SESSION_CLAIM = """
local user = redis.call('HGET', KEYS[1], 'u')
if user and user ~= ARGV[2] then
  return {0}
end
local ttl = redis.call('PTTL', KEYS[1])
local owner = redis.call('HGET', KEYS[1], 'o') or ''
local subs = redis.call('HGET', KEYS[1], 's') or ''
local stored = redis.call('HEXISTS', KEYS[1], 'x')
redis.call('HSET', KEYS[1], 'o', ARGV[1], 'u', ARGV[2])
local grace = tonumber(ARGV[3])
if ttl == -2 or (ttl >= 0 and ttl < grace) then
  redis.call('PEXPIRE', KEYS[1], grace)
end
return {1, owner, subs, stored}
"""

# KEYS: session hash, queue; ARGV: node id, node it is handed to (or ''), user, expiry,
# subscriptions, messages, next packet id, ttl ms (0: none) -> 1 when written
SESSION_SAVE = """
local owner = redis.call('HGET', KEYS[1], 'o')
if owner and owner ~= ARGV[1] and owner ~= ARGV[2] then
  return 0
end
redis.call('HSET', KEYS[1], 'o', owner or ARGV[1], 'u', ARGV[3], 'x', ARGV[4], 's', ARGV[5],
           'm', ARGV[6], 'n', ARGV[7])
redis.call('DEL', KEYS[2])
local ttl = tonumber(ARGV[8])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
else
  redis.call('PERSIST', KEYS[1])
end
return 1
"""

# KEYS: session hash, queue; ARGV: node id, limit, messages... -> 1 when appended
SESSION_APPEND = """
if redis.call('HGET', KEYS[1], 'o') ~= ARGV[1] then
  return 0
end
for i = 3, #ARGV do
  redis.call('RPUSH', KEYS[2], ARGV[i])
end
redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[2]) - 1)
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[2], ttl)
end
return 1
"""

# KEYS: session hash, queue; ARGV: node id
# -> {} (not ours, or never written) or {user, expiry, subscriptions, messages, next packet
# id, queued...}; the messages are the caller's from now on
SESSION_LOAD = """
if redis.call('HGET', KEYS[1], 'o') ~= ARGV[1] then
  return {}
end
if redis.call('HEXISTS', KEYS[1], 'x') == 0 then
  redis.call('DEL', KEYS[2])
  return {}
end
local r = redis.call('HMGET', KEYS[1], 'u', 'x', 's', 'm', 'n')
local out = {r[1] or '', r[2] or '0', r[3] or '', r[4] or '', r[5] or '1'}
for _, item in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
  out[#out + 1] = item
end
redis.call('HDEL', KEYS[1], 'm')
redis.call('DEL', KEYS[2])
return out
"""

# KEYS: session hash, queue; ARGV: node id, ttl ms (0: none; -1: delete)
SESSION_TOUCH = """
local owner = redis.call('HGET', KEYS[1], 'o')
if owner and owner ~= ARGV[1] then
  return 0
end
local ttl = tonumber(ARGV[2])
if ttl < 0 then
  redis.call('DEL', KEYS[1], KEYS[2])
elseif ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
  if redis.call('EXISTS', KEYS[2]) == 1 then
    redis.call('PEXPIRE', KEYS[2], ttl)
  end
else
  redis.call('PERSIST', KEYS[1])
  redis.call('PERSIST', KEYS[2])
end
return 1
"""

# ---------------------------------------------------------------------- devices
# Push tokens (redis_devices.py): hash p:dt:<provider>:<token> (on the token's instance)
# with u (user), d (device), n (nonce of this registration), e (environment), a (app id),
# pf (platform), r (registered, ms), l (last used, ms); zset p:dz per instance:
# "<provider>:<token>" -> last used (ms); hash p:d:<user> (on the user's instance):
# device -> "<nonce>|<provider>:<token>".

# KEYS: token hash, last-use zset; ARGV: member, user, device, nonce, environment, app id,
# platform, registered ms, last used ms -> {previous user, device, nonce} or {}
DEVICE_PUT = """
local prev = redis.call('HMGET', KEYS[1], 'u', 'd', 'n')
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'u', ARGV[2], 'd', ARGV[3], 'n', ARGV[4], 'e', ARGV[5],
           'a', ARGV[6], 'pf', ARGV[7], 'r', ARGV[8], 'l', ARGV[9])
redis.call('ZADD', KEYS[2], ARGV[9], ARGV[1])
if prev[1] then
  return {prev[1], prev[2] or '', prev[3] or ''}
end
return {}
"""

# KEYS: user hash; ARGV: device, pointer ('' to remove) -> the pointer it had before
DEVICE_POINT = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
if ARGV[2] == '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
return old
"""

# KEYS: user hash; ARGV: device, pointer -> 1 when the device had exactly it (removed)
DEVICE_UNPOINT = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
  return 1
end
return 0
"""

# KEYS: token hash, last-use zset; ARGV: member, nonce ('': any registration), registered
# before ms (0: any time) -> {user, device, nonce} of the removed record, or {}
DEVICE_DROP = """
local r = redis.call('HMGET', KEYS[1], 'u', 'n', 'r', 'd')
if not r[1] then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return {}
end
if ARGV[2] ~= '' and r[2] ~= ARGV[2] then
  return {}
end
local before = tonumber(ARGV[3])
if before > 0 and tonumber(r[3] or '0') >= before then
  return {}
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return {r[1], r[4] or '', r[2] or ''}
"""

# KEYS: token hash, last-use zset; ARGV: member, nonce, now ms -> 1 when that registration
# is still the token's (its last use moved forward)
DEVICE_TOUCH = """
local r = redis.call('HMGET', KEYS[1], 'n', 'l')
if r[1] ~= ARGV[2] then
  return 0
end
if tonumber(r[2] or '0') < tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], 'l', ARGV[3])
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
end
return 1
"""

# KEYS: last-use zset; ARGV: token hash prefix, unused since ms, limit
# -> {how many were looked at, then member, user, device, nonce, ... of those removed}
DEVICE_PRUNE = """
local out = {0}
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[2], 'LIMIT', 0,
                       tonumber(ARGV[3]))
for _, member in ipairs(due) do
  local key = ARGV[1] .. member
  local r = redis.call('HMGET', key, 'u', 'd', 'n')
  redis.call('ZREM', KEYS[1], member)
  if r[1] then
    redis.call('DEL', key)
    out[#out + 1] = member
    out[#out + 1] = r[1]
    out[#out + 1] = r[2] or ''
    out[#out + 1] = r[3] or ''
  end
end
out[1] = #due
return out
"""
