-- KEYS[1] status, KEYS[2] feed shard stream, KEYS[3] its sequence, KEYS[4]
-- the app's snapshot chunk. ARGV: version, packed record, app id, feed maxlen.
-- Puts a stored status into the snapshot and on the feed without writing it
-- (an application carried over from the layout before feed shards), if the
-- stored version is still the one the packed record was made from: a
-- status written meanwhile was published by its own write. Returns 1 if
-- published.
local v = redis.call('HGET', KEYS[1], 'version')
local data = redis.call('HGET', KEYS[1], 'data')
if not v or not data or v ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[4], ARGV[3], ARGV[3] .. '\0' .. ARGV[2])
feed_append(KEYS[2], KEYS[3], ARGV[4], true,
            {'a', ARGV[3], 'v', v, 'acct', redis.call('HGET', KEYS[1], 'account') or '',
             'd', data, 'u', redis.call('HGET', KEYS[1], 'updated_at') or '0'})
return 1
