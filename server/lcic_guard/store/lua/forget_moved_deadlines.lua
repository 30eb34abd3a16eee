-- KEYS[1] the leader's deadline set. ARGV: member, score, member, score, ...
-- Removes each member moved to its shard, only if its score is still the one
-- read before the move: one rescheduled meanwhile (an earlier version still
-- running writes here) stays, and is moved again. Returns how many went.
local gone = 0
for i = 1, #ARGV, 2 do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) == tonumber(ARGV[i + 1]) then
    gone = gone + redis.call('ZREM', KEYS[1], ARGV[i])
  end
end
return gone
