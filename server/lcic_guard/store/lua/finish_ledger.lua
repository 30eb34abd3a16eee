-- KEYS[1] the hash holding an announcement cursor, KEYS[2] the account's
-- ledger (same slot). ARGV: cursor field, payload, announcement id, record.
-- Clears the outbox once the payload it holds is on the stream, and records
-- the announcement in the ledger, in one step: a record exists only for an
-- announcement on the stream.
if redis.call('HGET', KEYS[1], ARGV[1] .. ':outbox') == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1] .. ':outbox', ARGV[1] .. ':outbox_at',
             ARGV[1] .. ':outbox_taken')
end
redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
return 1
