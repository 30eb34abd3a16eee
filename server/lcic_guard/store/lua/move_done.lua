-- KEYS[1] status. ARGV: account. Marks the cleanup of ``account``'s copy of
-- the app's facts done (see _CLAIM_APP).
local moved = redis.call('HGET', KEYS[1], 'moved_from')
if not moved then return 0 end
local rest = {}
for a in string.gmatch(moved, '%S+') do
  if a ~= ARGV[1] then table.insert(rest, a) end
end
if #rest == 0 then
  redis.call('HDEL', KEYS[1], 'moved_from')
else
  redis.call('HSET', KEYS[1], 'moved_from', table.concat(rest, ' '))
end
return 1
