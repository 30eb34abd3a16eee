-- KEYS[1] facts, KEYS[2] meta, KEYS[3] recorded.
-- Returns {seq, {id, json, ...}, {id, recorded ms, ...}} read at one instant.
local seq = tonumber(redis.call('HGET', KEYS[2], 'seq') or '0')
return {seq, redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[3])}
