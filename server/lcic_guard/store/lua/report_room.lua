-- KEYS[1] status, KEYS[2] feed shard stream, KEYS[3] its sequence.
-- ARGV: field, started_at or '', scheduled_end or '', ended_at or '', until,
-- now, prune_threshold, app id, feed maxlen.
-- Merges a start or end report into the room's record as
-- lcic_guard.domain.rooms.merge_report defines it (earliest start, earliest
-- end, first scheduled end, latest until), atomically; refuses unknown
-- applications (returns 0). Once the hash holds many rooms, forgets the
-- others whose protection window has passed (rooms.forgettable). The
-- domain functions are the rule; a property test checks this script
-- against them. The report goes on the feed in the same step, so that every
-- sidecar forgets what it held of the room.
if not redis.call('HGET', KEYS[1], 'account') then return 0 end
local raw = redis.call('HGET', KEYS[1], ARGV[1])
local room = {}
if raw then room = cjson.decode(raw) end
local function num(v) if v == '' then return nil end return tonumber(v) end
local function earliest(a, b)
  if a == nil or a == cjson.null then return b end
  if b == nil then return a end
  return math.min(a, b)
end
local s, e, x, u = num(ARGV[2]), num(ARGV[3]), num(ARGV[4]), tonumber(ARGV[5])
room.s = earliest(room.s, s)
if e ~= nil and (room.e == nil or room.e == cjson.null) then room.e = e end
room.x = earliest(room.x, x)
if room.u == nil or room.u == cjson.null or u > room.u then room.u = u end
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(room))
local n = redis.call('HLEN', KEYS[1])
if n > tonumber(ARGV[7]) then
  local now = tonumber(ARGV[6])
  local all = redis.call('HGETALL', KEYS[1])
  for i = 1, #all, 2 do
    if string.sub(all[i], 1, 5) == 'room:' and all[i] ~= ARGV[1] then
      local r = cjson.decode(all[i + 1])
      if (r.u ~= nil and r.u ~= cjson.null and r.u < now) then
        redis.call('HDEL', KEYS[1], all[i])
      end
    end
  end
end
feed_append(KEYS[2], KEYS[3], ARGV[9], true, {'a', ARGV[8], 'r', string.sub(ARGV[1], 6)})
return 1
