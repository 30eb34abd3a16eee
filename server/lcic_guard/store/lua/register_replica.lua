-- KEYS[1] the live reconcilers (sorted set). ARGV: replica name, ttl ms.
-- Notes the replica alive until now + ttl on Redis's clock (the one every
-- replica shares: a replica's own clock may be off, or a test's), forgets
-- the replicas whose time ran out (killed ones, within a ttl), and returns
-- how many are alive: each takes about the deadline shards / that many.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return redis.call('ZCARD', KEYS[1])
