-- KEYS[1] an account's ledger. ARGV: announcement id, record, id, record, ...
-- Forgets each record that is still exactly the one given (read by the
-- caller and judged expired), and nothing else: a record replaced since
-- (a claim in flight, a takeover) stays. Returns how many were forgotten.
local n = 0
for i = 1, #ARGV, 2 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    n = n + redis.call('HDEL', KEYS[1], ARGV[i])
  end
end
return n
