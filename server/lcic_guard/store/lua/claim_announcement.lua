-- KEYS[1] a hash holding an announcement cursor. ARGV: cursor field,
-- expected value ('' for none), new value, payload, now.
-- Claims the right to announce a change: advances the cursor and leaves the
-- payload in an outbox, atomically. Returns 1 if claimed.
local cur = redis.call('HGET', KEYS[1], ARGV[1]) or ''
if cur ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3], ARGV[1] .. ':outbox', ARGV[4],
           ARGV[1] .. ':outbox_at', ARGV[5])
return 1
