-- KEYS[1] status, KEYS[2] parked. ARGV: event_id, json, parked ttl ms.
-- Returns the owner account if the application is known; otherwise parks
-- the fact (the parked hash expires ttl after the last fact parked) and
-- returns false.
local owner = redis.call('HGET', KEYS[1], 'account')
if owner then return owner end
redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2])
if tonumber(ARGV[3]) > 0 then redis.call('PEXPIRE', KEYS[2], ARGV[3]) end
return false
