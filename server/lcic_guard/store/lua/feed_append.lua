-- Appends an entry to a feed shard's stream (prefix of the scripts that
-- write one). A change takes the shard's next sequence number; a progress
-- mark repeats the current one. The number travels as field 's', so that a
-- reader sees a gap (a trimmed range, a lost write) or a sequence gone back
-- on every read. Returns the entry's number.
local function feed_append(stream, seqkey, maxlen, bump, fields)
  local s
  if bump then
    s = redis.call('INCR', seqkey)
  else
    s = tonumber(redis.call('GET', seqkey) or '0')
  end
  local args = {'XADD', stream, 'MAXLEN', '~', maxlen, '*', 's', s}
  for i = 1, #fields do args[#args + 1] = fields[i] end
  redis.call(unpack(args))
  return s
end
