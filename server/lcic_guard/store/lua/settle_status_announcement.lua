-- KEYS[1] an application's status hash. ARGV: cursor field, announced state
-- expected ('' for none), new state, payload, now, version, settle ms.
-- Announces a status change only once the new state has held for the settle
-- time: the first evaluation that sees it notes it as a candidate (with the
-- time), and a later one, at least `settle` ms after, claims it (cursor
-- advanced, payload in the outbox, candidate cleared). A state that reverts
-- to the announced one drops the candidate, so it is never announced.
-- Nothing is noted or claimed from another status version than the stored
-- one (a replica holding an older status cannot announce it), from an
-- evaluation older than the last claimed at that version (a lagging clock
-- cannot announce a deadline backwards), from a stale view of the cursor, or
-- while the previous announcement is still in the outbox (it would be lost).
-- Returns {code, since}: 0 nothing to announce, 1 claimed, 2 waiting for the
-- candidate first seen at `since`, 3 refused.
local f = ARGV[1]
local now, version, settle = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
if tonumber(redis.call('HGET', KEYS[1], 'version') or '0') ~= version then return {3, 0} end
local mark = redis.call('HMGET', KEYS[1], f, f .. ':version', f .. ':now', f .. ':cand',
                        f .. ':cand_at', f .. ':outbox')
if mark[6] then return {3, 0} end
if (mark[1] or '') ~= ARGV[2] then return {3, 0} end
local mv, mn = tonumber(mark[2] or '0'), tonumber(mark[3] or '0')
if version < mv or (version == mv and now < mn) then return {3, 0} end
if ARGV[2] == ARGV[3] then
  if mark[4] then redis.call('HDEL', KEYS[1], f .. ':cand', f .. ':cand_at') end
  return {0, 0}
end
local since = tonumber(mark[5] or '0')
if mark[4] ~= ARGV[3] then
  redis.call('HSET', KEYS[1], f .. ':cand', ARGV[3], f .. ':cand_at', now)
  since = now
end
if now - since < settle then return {2, since} end
redis.call('HSET', KEYS[1], f, ARGV[3], f .. ':outbox', ARGV[4], f .. ':outbox_at', now,
           f .. ':version', version, f .. ':now', now)
redis.call('HDEL', KEYS[1], f .. ':cand', f .. ':cand_at')
return {1, since}
