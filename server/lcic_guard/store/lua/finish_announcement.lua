-- KEYS[1] the hash. ARGV: cursor field, payload. Clears the outbox once the
-- payload it holds is on the stream.
if redis.call('HGET', KEYS[1], ARGV[1] .. ':outbox') == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1] .. ':outbox', ARGV[1] .. ':outbox_at',
             ARGV[1] .. ':outbox_taken')
end
return 1
