-- KEYS[1] status, KEYS[2] parked. ARGV: account, occurred_at, event_id, the
-- event id's UTF-8 bytes in hex (compared instead of the id: Lua compares
-- strings by the server's locale, hex compares like the bytes).
-- The earliest registration (occurred_at, then event id) owns the app,
-- whatever the arrival order. Returns {verdict, owner, moved_from, parked
-- json...}: 'own' (the registration's account owns the app), 'later' (another
-- account owns it by an earlier registration; nothing changes) or 'moved'
-- (this registration is earlier than the owner's: the app is now its
-- account's). ``moved_from`` lists accounts whose copies of the app's facts
-- have not been cleaned up yet (space-separated); the mover clears each entry
-- once done, so a redelivered registration finishes a move a crash cut short.
-- Parked facts are returned only to the owner.
local cur = redis.call('HMGET', KEYS[1], 'account', 'reg_at', 'reg_ord', 'moved_from')
local owner, moved = cur[1], cur[4] or ''
local at, id = tonumber(ARGV[2]), ARGV[4]
local verdict = 'own'
if not owner then
  redis.call('HSET', KEYS[1], 'account', ARGV[1], 'reg_at', ARGV[2], 'reg_ord', id,
             'reg_id', ARGV[3])
  owner = ARGV[1]
else
  local oat, oid = tonumber(cur[2]), cur[3]
  local earlier = oat ~= nil and (at < oat or (at == oat and id < oid))
  if owner == ARGV[1] then
    if oat == nil or earlier then
      redis.call('HSET', KEYS[1], 'reg_at', ARGV[2], 'reg_ord', id, 'reg_id', ARGV[3])
    end
  elseif earlier then
    if not string.find(' ' .. moved .. ' ', ' ' .. owner .. ' ', 1, true) then
      moved = (moved == '' and owner) or (moved .. ' ' .. owner)
    end
    redis.call('HSET', KEYS[1], 'account', ARGV[1], 'reg_at', ARGV[2], 'reg_ord', id,
               'reg_id', ARGV[3], 'moved_from', moved)
    owner = ARGV[1]
    verdict = 'moved'
  else
    verdict = 'later'
  end
end
local res = {verdict, owner, moved}
if verdict ~= 'later' then
  local parked = redis.call('HVALS', KEYS[2])
  for i = 1, #parked do table.insert(res, parked[i]) end
end
return res
