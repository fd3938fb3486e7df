//! The Lua scripts that make each lock and store step atomic on the Redis server.
//!
//! Every script that changes the lock or the token publishes on the store's channel, so
//! replicas waiting for the lock wake up at once instead of at their next poll.

use std::sync::LazyLock;

use redis::Script;

/// Takes the lock if it is free, or confirms it if it already holds our value: `SET NX
/// PX` made idempotent, so a request resent after a dropped connection (which may have
/// run the first time) finds its own lock instead of waiting a lease for it.
///
/// KEYS: lock. ARGV: our value, lease in ms. Returns 1 if the lock is ours.
pub(crate) const ACQUIRE_SOURCE: &str = r"
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if current then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
";

/// [`ACQUIRE_SOURCE`] as a script (EVALSHA, falling back to EVAL).
pub(crate) static ACQUIRE: LazyLock<Script> = LazyLock::new(|| Script::new(ACQUIRE_SOURCE));

/// Compare-and-delete: releases the lock only if it still holds our value, so a holder
/// whose lease lapsed cannot release someone else's lock.
///
/// KEYS: lock. ARGV: our value, channel. Returns 1 if released.
pub(crate) const RELEASE_SOURCE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], 'released')
  return 1
end
return 0
";

/// [`RELEASE_SOURCE`] as a script (EVALSHA, falling back to EVAL).
pub(crate) static RELEASE: LazyLock<Script> = LazyLock::new(|| Script::new(RELEASE_SOURCE));

/// Compare-and-pexpire: extends the lease only while the lock is still ours.
///
/// KEYS: lock. ARGV: our value, lease in ms. Returns 1 if renewed.
pub(crate) const RENEW_SOURCE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

/// [`RENEW_SOURCE`] as a script (EVALSHA, falling back to EVAL).
pub(crate) static RENEW: LazyLock<Script> = LazyLock::new(|| Script::new(RENEW_SOURCE));

/// The fenced save: writes the token only if (a) the caller still holds the lock and
/// (b) the stored token is older. Both checks and the write are
/// one atomic step, so a holder whose lease lapsed cannot overwrite a newer token.
///
/// Saving the very record that is stored already succeeds (a save whose replica
/// acknowledgement timed out is sent again).
///
/// A stored value that cannot be decoded counts as generation 0: a save (typically a
/// new login) repairs it. (The guard's load moves an undecodable record aside first, so
/// a damaged record that still shows a generation is no obstacle either.)
///
/// A stored generation counts only if it is one the coordinator would accept: a number,
/// a whole one, at least 0 and below [`tokenflight::store::MAX_GENERATION`] (2^53). The
/// coordinator ignores a stored token numbered above it and numbers its save from its
/// own counters; if the script still compared such a generation, it would answer
/// "newer" to every save forever and every replica would refresh on its own. Lua
/// numbers are doubles, so the comparison is made where doubles are exact: every whole
/// number below 2^53 is exact, and rounding is monotonic, so a JSON integer decodes
/// below 2^53 exactly when it is below 2^53. Exactly 2^53 counts as out of range too:
/// a decoded 2^53 may stand for 2^53 + 1, and a token at the ceiling could never be
/// followed by a higher number anyway. Against a stored generation below 2^53 the new
/// one (`ARGV[2]`, rounded if it is larger) compares exactly as well.
///
/// The record is a [`tokenflight::store::record`]: its top-level `generation` is what the
/// script compares (RedisStore's records from before the shared format have it there too).
///
/// KEYS: token, lock. ARGV: our lock value, generation, record, channel. Returns "ok",
/// "lease_lost" or "newer".
pub(crate) const SAVE_SOURCE: &str = r"
if redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return 'lease_lost'
end
local current = redis.call('GET', KEYS[1])
if current == ARGV[3] then
  redis.call('PUBLISH', ARGV[4], 'saved:' .. ARGV[2])
  return 'ok'
end
if current then
  local ok, record = pcall(cjson.decode, current)
  if ok and type(record) == 'table' then
    local stored = record['generation']
    if type(stored) == 'number' and stored == stored and stored >= 0
        and stored < 9007199254740992 and stored == math.floor(stored)
        and stored >= tonumber(ARGV[2]) then
      return 'newer'
    end
  end
end
redis.call('SET', KEYS[1], ARGV[3])
redis.call('PUBLISH', ARGV[4], 'saved:' .. ARGV[2])
return 'ok'
";

/// [`SAVE_SOURCE`] as a script (EVALSHA, falling back to EVAL).
pub(crate) static SAVE: LazyLock<Script> = LazyLock::new(|| Script::new(SAVE_SOURCE));

/// The fenced load: reads the token only if the caller still holds the lock, so a
/// holder whose lease lapsed learns it before it spends a refresh token that another
/// replica may already have spent.
///
/// A value of another type than a string under the key (another program's hash, list,
/// …) is no record: it is reported as `foreign` rather than failing the `GET`, so the
/// holder can move it aside like any other undecodable value.
///
/// KEYS: token, lock. ARGV: our lock value. Returns {"lease_lost"}, {"none"},
/// {"foreign"} or {"ok", record}.
pub(crate) const LOAD_FENCED_SOURCE: &str = r"
if redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return {'lease_lost'}
end
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind == 'none' then
  return {'none'}
end
if kind ~= 'string' then
  return {'foreign'}
end
return {'ok', redis.call('GET', KEYS[1])}
";

/// [`LOAD_FENCED_SOURCE`] as a script (EVALSHA, falling back to EVAL).
pub(crate) static LOAD_FENCED: LazyLock<Script> = LazyLock::new(|| Script::new(LOAD_FENCED_SOURCE));

/// Moves an undecodable value out of the token key, under the lock: renamed to a side
/// key (same hash tag, so same Cluster slot) that expires after a while. Only if the
/// caller still holds the lock and the value is still the one it read (a string equal
/// to `ARGV[3]`, or a value of another type when `ARGV[2]` is `foreign`), so nothing
/// written meanwhile is moved unseen. `RENAME` moves any type and keeps nothing
/// behind, so the save that follows finds the key empty.
///
/// KEYS: token, lock, side key. ARGV: our lock value, `string` or `foreign`, the value
/// read, how long to keep it in ms. Returns "moved", "changed" or "lease_lost".
pub(crate) const MOVE_ASIDE_SOURCE: &str = r"
if redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return 'lease_lost'
end
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind == 'none' then
  return 'changed'
end
if ARGV[2] == 'string' then
  if kind ~= 'string' or redis.call('GET', KEYS[1]) ~= ARGV[3] then
    return 'changed'
  end
elseif kind == 'string' then
  return 'changed'
end
redis.call('RENAME', KEYS[1], KEYS[3])
redis.call('PEXPIRE', KEYS[3], ARGV[4])
return 'moved'
";

/// [`MOVE_ASIDE_SOURCE`] as a script (EVALSHA, falling back to EVAL).
pub(crate) static MOVE_ASIDE: LazyLock<Script> = LazyLock::new(|| Script::new(MOVE_ASIDE_SOURCE));

/// `EVAL source` with `keys` and `args`: for scripts sent in a batch with `WAIT`, where
/// a `NOSCRIPT` from EVALSHA (a new primary after a failover has an empty script cache)
/// could not fall back.
pub(crate) fn eval(source: &str, keys: &[&str], args: &[&str]) -> redis::Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(source).arg(keys.len()).arg(keys).arg(args);
    cmd
}
