"""The Lua scripts behind ``JobStore``: each one job-state change, done atomically.

Redis runs a script without interleaving other commands, so a chunk's result is stored
and the job's progress advanced exactly once (``STORE``), a cancel removes every queued
chunk of a job at once (``END``), and a worker extends only claims it still owns
(``EXTEND``). Times are passed in as ARGV (seconds since the epoch) rather than read
with TIME, so a script's effect does not depend on when it is replayed from the AOF.
Comments above each script give its KEYS and ARGV; "job keys" are the seven of
``JobStore._job_keys``: job, in, out, tasks, stream, expiry, receiving.

A job still receiving inputs is in the ``receiving`` index, scored (and its hash's
``upload_seen`` set) by its last upload progress: ENQUEUE and TOUCH renew it, SEAL and
every end remove it, and ABANDON (or BEGIN, about to run one of its chunks) fails a job
silent since before the cutoff that ARGV gives.
"""

# finish(): move a job to a terminal state. Keys of a failed or cancelled job's queued
# chunks are deleted (their stream entries too, so the queue depth drops at once); every
# per-job key then lives result_ttl more, and the sweeper index learns when.
FINISH = """
local function finish(job, inkey, outkey, tasks, stream, expiry, receiving, job_id, state,
                      reason, now, ttl_ms, channel)
  redis.call('HSET', job, 'state', state, 'finished', now)
  redis.call('ZREM', receiving, job_id)
  if reason ~= '' then redis.call('HSET', job, 'error', reason) end
  if state ~= 'succeeded' then
    local ids = redis.call('LRANGE', tasks, 0, -1)
    for i = 1, #ids, 500 do
      redis.call('XDEL', stream, unpack(ids, i, math.min(i + 499, #ids)))
    end
    redis.call('DEL', inkey)
  end
  redis.call('DEL', tasks)
  redis.call('PEXPIRE', job, ttl_ms)
  redis.call('PEXPIRE', inkey, ttl_ms)
  redis.call('PEXPIRE', outkey, ttl_ms)
  redis.call('ZADD', expiry, tonumber(now) + tonumber(ttl_ms) / 1000, job_id)
  redis.call('PUBLISH', channel, state)
end
local function active(state)
  return state == 'receiving' or state == 'queued' or state == 'running'
end
local function fail_if_silent(K, job_id, cutoff, reason, now, ttl_ms, channel)
  local h = redis.call('HMGET', K[1], 'state', 'sealed', 'upload_seen')
  if h[1] ~= 'receiving' or h[2] == '1' or not h[3] then return false end
  if tonumber(h[3]) >= tonumber(cutoff) then return false end
  finish(K[1], K[2], K[3], K[4], K[5], K[6], K[7], job_id, 'failed', reason, now, ttl_ms,
         channel)
  return true
end
"""

# KEYS: job, in, tasks, stream, receiving
# ARGV: job_id, max_queued, now, then (chunk, n, payload) triples
ENQUEUE = FINISH + """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {-2, 0} end
if not active(state) then return {-3, state} end
local k = (#ARGV - 3) / 3
local depth = redis.call('XLEN', KEYS[4])
if depth + k > tonumber(ARGV[2]) then return {-1, depth} end
local ttl = redis.call('PTTL', KEYS[1])
for i = 0, k - 1 do
  local chunk, n, payload = ARGV[4 + 3 * i], ARGV[5 + 3 * i], ARGV[6 + 3 * i]
  if payload ~= '' then redis.call('HSET', KEYS[2], chunk, payload) end
  local id = redis.call('XADD', KEYS[4], '*', 'job', ARGV[1], 'chunk', chunk, 'n', n)
  redis.call('RPUSH', KEYS[3], id)
end
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[2], ttl)
  redis.call('PEXPIRE', KEYS[3], ttl)
end
-- A running total (the seal checks it against the chunks the upload counted), not a depth.
redis.call('HINCRBY', KEYS[1], 'chunks_submitted', k)
if state == 'receiving' then
  redis.call('HSET', KEYS[1], 'upload_seen', ARGV[3])
  redis.call('ZADD', KEYS[5], ARGV[3], ARGV[1])
end
return {depth + k, 'ok'}
"""

# KEYS: job, receiving   ARGV: job_id, now -> the job's state ('expired' if gone)
# The upload made progress without queueing a chunk (a message that did not fill one).
TOUCH = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'expired' end
if state == 'receiving' then
  redis.call('HSET', KEYS[1], 'upload_seen', ARGV[2])
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
end
return state
"""

# KEYS: job keys   ARGV: job_id, items, chunks, now, ttl_ms, channel
SEAL = FINISH + """
-- 'chunks_queued': the count's name in hashes written before it was renamed.
local h = redis.call('HMGET', KEYS[1], 'state', 'chunks_done', 'chunks_submitted',
                     'chunks_queued')
if not h[1] then return -2 end
if not active(h[1]) then return -3 end
if (tonumber(h[3]) or 0) + (tonumber(h[4]) or 0) ~= tonumber(ARGV[3]) then return -4 end
redis.call('HSET', KEYS[1], 'sealed', 1, 'items_total', ARGV[2], 'chunks_total', ARGV[3])
redis.call('ZREM', KEYS[7], ARGV[1])
if h[1] == 'receiving' then
  local started = redis.call('HEXISTS', KEYS[1], 'started') == 1
  redis.call('HSET', KEYS[1], 'state', started and 'running' or 'queued')
end
if tonumber(h[2]) == tonumber(ARGV[3]) then
  finish(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], ARGV[1], 'succeeded',
         '', ARGV[4], ARGV[5], ARGV[6])
else
  redis.call('PUBLISH', ARGV[6], 'sealed')
end
return 1
"""

# KEYS: job keys
# ARGV: chunk, entry_id, group, now, then ABANDON's six: job_id, cutoff, reason, now,
# ttl_ms, channel
# -> {'run', kind, model, seed, temperature, image_format, chunk_size, payload|false,
#     on_item_error|false} or {'skip', why}
# A job whose upload went silent before the cutoff is failed here: none of its chunks
# is computed for an upload that will never be sealed.
BEGIN = FINISH + """
fail_if_silent(KEYS, ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10])
local h = redis.call('HMGET', KEYS[1], 'state', 'kind', 'model', 'seed', 'temperature',
                     'image_format', 'started', 'chunk_size', 'on_item_error')
if not h[1] or not active(h[1]) then
  redis.call('XACK', KEYS[5], ARGV[3], ARGV[2])
  redis.call('XDEL', KEYS[5], ARGV[2])
  return {'skip', h[1] or 'expired'}
end
if h[1] == 'queued' then redis.call('HSET', KEYS[1], 'state', 'running') end
if not h[7] then redis.call('HSET', KEYS[1], 'started', ARGV[4]) end
local payload = redis.call('HGET', KEYS[2], ARGV[1])
return {'run', h[2], h[3], h[4], h[5], h[6], h[8], payload, h[9]}
"""

# KEYS: job keys   ARGV: job_id, cutoff, reason, now, ttl_ms, channel
# -> 1 if the job was failed now; 0 if it is not a silent upload (its index entry, if
# stale, is dropped)
ABANDON = FINISH + """
if fail_if_silent(KEYS, ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]) then
  return 1
end
local h = redis.call('HMGET', KEYS[1], 'state', 'sealed')
if h[1] ~= 'receiving' or h[2] == '1' then redis.call('ZREM', KEYS[7], ARGV[1]) end
return 0
"""

# KEYS: job keys
# ARGV: job_id, chunk, n, result, entry_id, group, now, result_ttl_ms, channel, failed
# (how many of the n items are ItemFailures) -> 1 if stored now, 0 if it was stored
# before (or the job is over)
STORE = FINISH + """
local stored = 0
local h = redis.call('HMGET', KEYS[1], 'state', 'sealed', 'chunks_total')
if h[1] and active(h[1]) and redis.call('HSETNX', KEYS[3], ARGV[2], ARGV[4]) == 1 then
  stored = 1
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl > 0 then redis.call('PEXPIRE', KEYS[3], ttl) end
  redis.call('HDEL', KEYS[2], ARGV[2])
  redis.call('HINCRBY', KEYS[1], 'items_done', ARGV[3])
  if tonumber(ARGV[10]) > 0 then redis.call('HINCRBY', KEYS[1], 'items_failed', ARGV[10]) end
  local chunks = redis.call('HINCRBY', KEYS[1], 'chunks_done', 1)
  if h[1] == 'queued' then redis.call('HSET', KEYS[1], 'state', 'running') end
  if h[2] == '1' and chunks == tonumber(h[3]) then
    finish(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], ARGV[1],
           'succeeded', '', ARGV[7], ARGV[8], ARGV[9])
  else
    redis.call('PUBLISH', ARGV[9], chunks)
  end
end
redis.call('XACK', KEYS[5], ARGV[6], ARGV[5])
redis.call('XDEL', KEYS[5], ARGV[5])
return stored
"""

# KEYS: job keys   ARGV: job_id, state, reason, now, ttl_ms, channel
# -> 1 if the job moved to ``state``, else its current state
END = FINISH + """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'expired' end
if not active(state) then return state end
finish(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], ARGV[1], ARGV[2],
       ARGV[3], ARGV[4], ARGV[5], ARGV[6])
return 1
"""

# KEYS: stream, dead   ARGV: group, entry_id, maxlen, then field/value pairs
DEAD_LETTER = """
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', unpack(ARGV, 4))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
return 1
"""

# KEYS: stream, job, tasks   ARGV: group, consumer, entry_id, job_id, chunk, n, prior
# Give a chunk back to the queue at once (graceful shutdown): only if we still own it.
RELEASE = FINISH + """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #p == 0 or p[1][2] ~= ARGV[2] then return 0 end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
local state = redis.call('HGET', KEYS[2], 'state')
if not state or not active(state) then return 0 end
local id = redis.call('XADD', KEYS[1], '*', 'job', ARGV[4], 'chunk', ARGV[5], 'n', ARGV[6],
                      'prior', ARGV[7])
redis.call('RPUSH', KEYS[3], id)
return 1
"""

# KEYS: stream   ARGV: group, consumer, ids... -> per id: 'kept', 'stolen' or 'gone'
# XCLAIM ... JUSTID resets the idle time without counting a delivery; only entries this
# consumer still owns are touched, so a claim that was lost is not stolen back.
EXTEND = """
local out = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if #p == 0 then
    out[#out + 1] = 'gone'
  elseif p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    out[#out + 1] = 'kept'
  else
    out[#out + 1] = 'stolen'
  end
end
return out
"""

# KEYS: jobs, expiry, receiving   ARGV: now, limit -> number of job ids dropped from the
# indexes
SWEEP = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for i = 1, #ids, 500 do
  local part = {unpack(ids, i, math.min(i + 499, #ids))}
  redis.call('ZREM', KEYS[1], unpack(part))
  redis.call('ZREM', KEYS[2], unpack(part))
  redis.call('ZREM', KEYS[3], unpack(part))
end
return #ids
"""
