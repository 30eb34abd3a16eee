-- KEYS[1] status, KEYS[2] feed shard stream, KEYS[3] its sequence, KEYS[4]
-- the app's snapshot chunk (one slot: the feed shard).
-- ARGV: account, account seq, data, updated_at, packed record (its first 8
-- bytes, the version, are replaced here), app id, feed maxlen.
-- The stored version is the store's own, monotonic per application even when
-- the application moves to another account (whose fact sequence may be
-- lower): it is max(stored + 1, seq), which is the account's seq while one
-- account owns the app. A write is accepted only from the owning account (or
-- for an application no registration owns yet) and only if its seq is
-- newer than the last one accepted from that account (``wseq:ACCOUNT``).
-- An accepted write also replaces the app's packed snapshot entry (the app
-- id, a NUL, then the record: a reader takes HVALS alone) and
-- appends the change to the feed with the shard's next sequence number, in
-- this one step: a reader that has applied every number holds the table.
-- Returns {code, previous data or false, previous version, stored version}:
-- code 1 written, 2 already stored from this very seq, 0 refused.
local owner = redis.call('HGET', KEYS[1], 'account')
local cur = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
local old = redis.call('HGET', KEYS[1], 'data')
if owner and owner ~= ARGV[1] then return {0, old, cur, cur} end
local seq = tonumber(ARGV[2])
local seen = tonumber(redis.call('HGET', KEYS[1], 'wseq:' .. ARGV[1]) or '-1')
if seen >= seq then
  if seen == seq and redis.call('HGET', KEYS[1], 'wacct') == ARGV[1] then
    return {2, old, cur, cur}
  end
  return {0, old, cur, cur}
end
local v = math.max(cur + 1, seq)
redis.call('HSET', KEYS[1], 'version', v, 'data', ARGV[3], 'account', ARGV[1],
           'updated_at', ARGV[4], 'wseq:' .. ARGV[1], ARGV[2], 'wacct', ARGV[1])
redis.call('HSET', KEYS[4], ARGV[6],
           ARGV[6] .. '\0' .. struct.pack('<i8', v) .. string.sub(ARGV[5], 9))
feed_append(KEYS[2], KEYS[3], ARGV[7], true,
            {'a', ARGV[6], 'v', v, 'acct', ARGV[1], 'd', ARGV[3], 'u', ARGV[4]})
return {1, old, cur, v}
