-- KEYS[1] a lease (the leader's, or a deadline shard's). ARGV: holder id.
-- Gives the lease up if held.
local cur = redis.call('GET', KEYS[1])
if cur and string.match(cur, '^(.*)|%d+$') == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
