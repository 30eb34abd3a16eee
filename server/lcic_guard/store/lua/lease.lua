-- KEYS[1] a lease (the leader's, or a deadline shard's), KEYS[2] its counter.
-- ARGV: holder id, ttl ms.
-- Returns the fencing token held (a new one on acquisition), 0 if another
-- holder has the lease.
local cur = redis.call('GET', KEYS[1])
if cur then
  local holder, token = string.match(cur, '^(.*)|(%d+)$')
  if holder == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return tonumber(token)
  end
  return 0
end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. token, 'PX', ARGV[2])
return token
