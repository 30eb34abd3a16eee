-- KEYS[1] an account's ledger. ARGV: announcement id, claim JSON, now, stale ms.
-- Claims the right to make an announcement, once: 1 if claimed now, 2 if a
-- claim left by a writer presumed dead (at least `stale` ms old) is taken
-- over (the taker checks the stream before adding it again), 0 if it is
-- committed already, -1 if another writer holds a recent claim.
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  return 1
end
local ok, rec = pcall(cjson.decode, cur)
if not ok or type(rec) ~= 'table' or rec['claimed_at'] == nil then return 0 end
if tonumber(ARGV[3]) - tonumber(rec['claimed_at']) < tonumber(ARGV[4]) then return -1 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 2
