-- KEYS[1] facts, KEYS[2] meta, KEYS[3] recorded. ARGV: token, expected seq,
-- event id, json, recorded ms ('' for Redis's clock now).
-- Records the release fact (with its recording time) only if the caller's
-- fencing token is not older than one already seen for the account and the
-- facts are exactly those the caller decided on. Returns the new seq, -1 if
-- fenced off, -2 if the facts changed meanwhile.
local fence = tonumber(redis.call('HGET', KEYS[2], 'fence') or '0')
local token = tonumber(ARGV[1])
if token < fence then return -1 end
local seq = tonumber(redis.call('HGET', KEYS[2], 'seq') or '0')
if seq ~= tonumber(ARGV[2]) then return -2 end
redis.call('HSET', KEYS[2], 'fence', token)
if redis.call('HSETNX', KEYS[1], ARGV[3], ARGV[4]) == 0 then return seq end
redis.call('HSET', KEYS[3], ARGV[3], now_or(ARGV[5]))
return redis.call('HINCRBY', KEYS[2], 'seq', 1)
