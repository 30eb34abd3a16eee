-- KEYS[1] continuity, KEYS[2] release pause. ARGV: expected run ids ('' for
-- none stored), run ids, generation, now, cause ('' when none), checker,
-- expected pause start ('' for none).
-- Stores what the reconciler sees of the store now; with a cause, and only
-- if the stored run ids and the pause are still the ones the caller read
-- (so that of several replicas one reports it, and the first detection
-- stays: a stream gone back or a new generation leaves the run ids as
-- they were), starts a release pause. Returns 1 if this caller started it.
local stored = redis.call('HGET', KEYS[1], 'run_ids') or ''
if stored ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'run_ids', ARGV[2], 'generation', ARGV[3], 'checked_at', ARGV[4],
           'checked_by', ARGV[6])
if ARGV[5] == '' then return 0 end
if (redis.call('HGET', KEYS[2], 'since') or '') ~= ARGV[7] then return 0 end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], 'since', ARGV[4], 'cause', ARGV[5])
return 1
