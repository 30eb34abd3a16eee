-- KEYS[1] the hash. ARGV: cursor field, payload, now, stale ms.
-- Takes over an outbox whose writer is presumed dead (it was claimed, or last
-- taken over, at least `stale` ms ago), so that exactly one replica finishes
-- it. Returns 1 if taken.
local f = ARGV[1]
local cur = redis.call('HMGET', KEYS[1], f .. ':outbox', f .. ':outbox_at', f .. ':outbox_taken')
if cur[1] ~= ARGV[2] then return 0 end
local last = math.max(tonumber(cur[2] or '0'), tonumber(cur[3] or '0'))
if tonumber(ARGV[3]) - last < tonumber(ARGV[4]) then return 0 end
redis.call('HSET', KEYS[1], f .. ':outbox_taken', ARGV[3])
return 1
