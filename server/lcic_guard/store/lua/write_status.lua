-- KEYS[1] status. ARGV: account, account seq, data, updated_at.
-- The stored version is the store's own, monotonic per application even when
-- the application moves to another account (whose fact sequence may be
-- lower): it is max(stored + 1, seq), which is the account's seq while one
-- account owns the app. A write is accepted only from the owning account (or
-- for an application no registration owns yet) and only if its seq is
-- newer than the last one accepted from that account (``wseq:ACCOUNT``).
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
return {1, old, cur, v}
