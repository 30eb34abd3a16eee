-- KEYS[1] account meta. ARGV: token. Raises the account's fence to the
-- caller's token; returns 0 if a newer token has already fenced it.
local fence = tonumber(redis.call('HGET', KEYS[1], 'fence') or '0')
local token = tonumber(ARGV[1])
if token < fence then return 0 end
if token > fence then redis.call('HSET', KEYS[1], 'fence', token) end
return 1
