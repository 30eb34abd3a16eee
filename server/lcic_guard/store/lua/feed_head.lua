-- KEYS[1] feed shard stream, KEYS[2] its sequence.
-- Where a reader of the shard starts: {sequence, id of the stream's last
-- entry or '0-0'}, read at one instant, so that every entry after that id
-- carries a number after that sequence.
local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local id = '0-0'
if top[1] then id = top[1][1] end
return {tonumber(redis.call('GET', KEYS[2]) or '0'), id}
