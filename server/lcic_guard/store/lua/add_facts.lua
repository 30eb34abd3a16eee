-- KEYS[1] facts, KEYS[2] meta, KEYS[3] recorded. ARGV: recorded ms ('' for
-- Redis's clock now), then event_id, json, event_id, json, ...
-- Adds the facts not yet known, each with its recording time; bumps seq once
-- if any was added. A known id with different content is a conflict (the
-- first one stays). Returns {seq, added, conflicting ids...}.
ARGV[1] = now_or(ARGV[1])
local added = 0
local out = {}
for i = 2, #ARGV, 2 do
  local cur = redis.call('HGET', KEYS[1], ARGV[i])
  if not cur then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
    redis.call('HSET', KEYS[3], ARGV[i], ARGV[1])
    added = added + 1
  elseif cur ~= ARGV[i + 1] then
    table.insert(out, ARGV[i])
  end
end
local seq
if added > 0 then
  seq = redis.call('HINCRBY', KEYS[2], 'seq', 1)
else
  seq = tonumber(redis.call('HGET', KEYS[2], 'seq') or '0')
end
local res = {seq, added}
for _, id in ipairs(out) do table.insert(res, id) end
return res
