-- Redis's own clock in ms, for a recording time the caller did not give.
local function now_or(arg)
  if arg ~= '' then return arg end
  local t = redis.call('TIME')
  return tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
end
