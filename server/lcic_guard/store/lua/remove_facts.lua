-- KEYS[1] facts, KEYS[2] meta. ARGV: event ids. Removes the facts (an app's
-- facts from an account that no longer owns it); bumps seq if any was there.
local removed = 0
for i = 1, #ARGV do removed = removed + redis.call('HDEL', KEYS[1], ARGV[i]) end
if removed > 0 then return redis.call('HINCRBY', KEYS[2], 'seq', 1) end
return tonumber(redis.call('HGET', KEYS[2], 'seq') or '0')
