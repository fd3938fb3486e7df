//! A deterministic scenario runner for the coordinator: many callers share one
//! [`SingleFlight`] behind an [`AuthPolicy`], and a [`Scenario`] says, step by step,
//! who starts, which woken caller is polled next, what the fake API server answers, what
//! the token source returns, which store call fails, hangs or panics, who logs in, who is
//! cancelled, how the clocks move (monotonic time, and wall-clock steps both ways) and
//! which tokens the store pushes ([`Op::Push`], issue 20: `TokenStore::watch`).
//!
//! There is no runtime: a tiny executor keeps the callers' futures in a `Vec` and polls
//! only the ones whose waker fired, in the order the scenario picks, so a lost wake-up
//! shows up as a hang instead of being papered over by polling everything. Time is a
//! [`ManualClock`], used as the coordinator's clock and (through a wrapper that counts
//! live sleeps) its timer: flight budgets, attempt timeouts and retry pauses.
//!
//! After every step the runner checks the contracts it can see from outside (C1–C6, C9,
//! C10, C13, C15–C18; see [`run`]); at the end it answers every request on the wire and lets time
//! pass until every caller has finished, and reports a hang if one has not. The property
//! tests (`tests/tests/all/properties.rs`) generate scenarios with proptest; the
//! `flight_ops` fuzz target decodes them with `arbitrary`. Keyed policies, whose
//! coordinators are evicted while requests are in flight, have a second, smaller runner:
//! [`keyed`] (issue 26). A policy with DPoP on, in front of a server that demands and
//! rotates nonces and rejects tokens or proofs, has a third: [`dpop`].
//!
//! ## Pushed tokens (issue 20): planted bugs and what caught them
//!
//! Each bug was planted alone in `core/src/flight/` (never committed) and the
//! properties run at the CI count (256 cases each): `python3 run.py` with the plants
//! in the session's scratch harness. "First case" is the earliest failing case of the
//! property that failed first; all were shrunk to a few steps.
//!
//! | plant | caught by | first case | contract, shrunk |
//! |---|---|---|---|
//! | `adopt_pushed` without the generation check | 11 of 19 properties | 1/256 | C3: another token with the current generation replaced it (step 4); C9: an older push / an own echo took it back |
//! | `adopt_pushed` over an unsaved login | 11 properties | 2/256 | C17: a push replaced the unsaved initial token (step 1) |
//! | no `superseded` check after the retry pause, the unlocked read or under the lock | 4 properties (`c2_c3_c17_pushed_…` first) | 1–2/256 | C2: a source call started though a pushed newer usable token was current (step 9–26) |
//! | ... only after the retry pause | not caught: equivalent (the next attempt's check ends the flight the same way) | – | – |
//! | `adopt_pushed` accepts generations above `MAX_GENERATION` | 11 properties | 1/256 | C17 (step 1) |
//! | `adopt_pushed` without the usability check | 11 properties | 1/256 | C16: an expired push replaced the current token (step 1) |
//! | adopting does not end "re-authentication required" | 11 properties | 1/256 | C17 (step 4–6) |
//! | pushes never adopted | 14 properties | 1/256 | C2: a newer usable push not adopted (step 1) |
//! | only compared with the current token, not the last generation numbered | `c2_c3_c17_pushed_…` and `c3_a_push_of_a_generation_…` | 26–39/256 | C3: a push took a generation the coordinator had given its own (saving) token (step 10) |
//! | `last_generation` not raised by a push | 9 properties | 1–12/256 | C4: a request resent with the same token |
//! | failure count (backoff) kept after a push | `c5_c18_…` (1 run in 2) | 142/256 | C9: backoff did not hold as the model expects (step 7) |
//!
//! The model also found a bug in the core: a flight that saved the refresh of an
//! unsaved login (its save had failed) left the login marked unsaved for good, so
//! pushes, the unlocked read and the stored token under the lock were never adopted
//! again (the coordinator spent its own refresh token instead). Fixed in `attempt_locked`;
//! `c2_c17_a_login_whose_save_failed_is_saved_by_its_refresh_and_pushes_are_adopted_again`
//! pins it (reverting the fix: that test, and `c2_c3_c17_pushed_…` at case 112–157).

//!
//! ## Stores, keys and leeway (issue 26): planted bugs and what caught them
//!
//! New operations: [`Op::IntoLeeway`] (the clocks move to half the current token's
//! leeway before its expiry), [`Op::Stray`] (another program writes the store's record:
//! one that does not decode, a usable token numbered 2^53, one numbered above it) and
//! [`Op::UnlockHangs`] (the next unlock hangs until the flight's budget drops it; a
//! login's, until the runner cancels the login). The
//! model store keeps the store contract for them: an undecodable record fails an
//! unlocked load with `Corrupt`, counts as no token under the lock and is replaced by
//! the next save; a save overwrites a generation above the maximum; a dropped guard
//! releases the lock. New checks: C16 (a caller that found the current token, not
//! rejected and not expired, gets it after any failure, inside its leeway too), C13 (a
//! flight that read an undecodable record under the lock does not fail without calling
//! its source), and, once every caller and flight has ended, C10 (the lock is free for
//! the next holder) and C1 across processes (a save attempted over a generation above
//! the maximum replaced it). Keyed coordinators have their own runner, [`keyed`] (C1 per
//! key, C22, C12 per key, C4), where eviction is deterministic (a zero idle timeout, or
//! one on the policy's manual clock); the `keyed_ops` fuzz target decodes its scenarios.
//!
//! Items 9, 4 and 5 were bugs on main when this began; their fixes were merged while it
//! ran. Item 5 was measured on the unfixed main (first row), then every core bug again
//! on the merged main with its fix reverted (never committed). The Redis items (1–3)
//! are planted in the model store with `TOKENFLIGHT_MODEL_PLANT=<name>` (off by default;
//! never set in CI). All at the CI count and seed (256 cases,
//! `TOKENFLIGHT_SCENARIO_SEED=1`). "First case" is the earliest failing case of each
//! property that failed; "ops" counts the shrunk scenario's operations.
//!
//! | plant | caught by | first case | contract, shrunk |
//! |---|---|---|---|
//! | item 9: `join_or_start`'s "re-authentication required" fail-fast path serves no still-valid token (the fix reverted) | `c16_a_usable_token_is_served_until_it_really_expires_whatever_the_failure`; `c9_backoff_holds_through_wall_steps_and_huge_retry_after` (wall steps put a login 5 s from expiry); the scenario `c16_after_invalid_grant_inside_the_leeway_…` | 1/256; 186/256 | C16: login, wall step back 40 s, 35 s, wall step forward 1 h, a send's flight gets `invalid_grant`, the next send fails with "re-authentication required" although the login is valid 5 s more (11 ops) |
//! | item 5, on the unfixed main: eviction while a request holds the key's coordinator | `c1_c22_a_key_evicted_while_its_requests_are_in_flight_gets_no_second_coordinator` (its first version: without the eviction-point check); the scenario `c22_a_401_on_an_evicted_coordinator_…` | 38/256 | C1 per key: key 0's request on the wire, `evict_idle`, key 0 again (a second coordinator fetches), the first request's 401: its old coordinator refreshes beside the new one (14 ops) |
//! | item 5 (the fix reverted: "in use" ignores the handles held outside the map) | `c1_c22_…`; the scenario `c22_a_401_on_an_evicted_coordinator_…` | 17/256 | C22: two sends of key 1, one polled and given its token, `evict_idle` while it is on the wire, a send of key 0: "coordinator 2 of key 1 was evicted although in use" (7 ops) |
//! | item 4 (the fix reverted in effect: a lookup does not move the key's last use) | `c1_c22_…` (its idle-timeout setups); the scenario `c22_a_key_in_constant_use_is_never_evicted_as_idle` | 44/256 | C22: a 60 s idle timeout, a send of key 0, an hour, another send of key 0 looks it up, `evict_idle` evicts it as idle (7 ops) |
//! | `corrupt-under-lock` (item 1): a load under the lock fails with `Corrupt` on an undecodable record | `c1_c10_c13_undecodable_records_hostile_generations_and_hanging_unlocks` (the only property that writes such records); the scenario `c13_an_undecodable_record_…` | 1/256 | C13: a send, an undecodable record, 250 ms: the flight fails without a source call (3 ops); in other cases C9: a login cannot repair it ("installing a login failed: stored token is corrupt") |
//! | `hostile-generation-newer` (item 3): a save refuses ("newer", `LeaseLost`) over a stored generation above the maximum | 11 properties: `c1_c10_c13_…` 1, `c6_cancelling_any_caller_…` 2, `c2_c3_c17_pushed_…` 3, `c16_a_usable_token_…` 5, `c17_logins_win_…` 8, `c5_c18_…` 8, `c5_c9_…` 10, `c3_c4_…` 11, `c1_c2_c5_…` 15 (their stale sessions numbered `u64::MAX - 1` and 2^53 + 1 are hostile too); the scenarios `c1_a_save_replaces_…` and `c17_a_stale_stored_session_…` | 1–15/256 | C9: a send, a record numbered 2^53 + 1, a login: "installing a login failed: refresh lock lease lost" (3 ops); C1: the store still holds the hostile generation after the flight's save |
//! | `cancelled-unlock-keeps-lock` (item 2): an unlock the budget (or a cancelled login) cut short never releases the lock | `c1_c10_c13_…` 1, `c2_c3_c17_pushed_…` 10, `c5_c18_…` 14 (their hang faults land on an unlock); the scenarios `c10_an_unlock_cut_short_…` and `c10_a_login_cancelled_while_its_unlock_hangs_…` | 1–14/256 | C10: a send, the unlock hangs, the flight ends at its budget: "every flight has ended but the store's refresh lock is still held" (3 ops) |
//! | item 6: a redirect carries key A's token to key B's origin | not modelled: the hop is the adapter's (reqwest's redirect policy), below the core's `send` | – | – |
//!
//! The model also found a boundary bug nobody planted: a usable token numbered exactly
//! `MAX_GENERATION` (2^53, then accepted as sane) in the store made the coordinator
//! number its next token (a login's renumbering, a refresh) 2^53 + 1, which every reader
//! of the store, itself included, then ignored as corrupt (C17, and C1 across
//! processes); the Redis store's script already counted 2^53 as out of range (doubles
//! cannot tell it from 2^53 + 1). Fixed in the core: 2^53 is the first corrupt
//! generation, as in the script. `c17_a_stored_generation_at_the_maximum_is_never_exceeded`
//! pins it (fails without the fix).

// Indices below come from the runner's own vectors (positions found in them, or taken
// modulo their length), never from raw input.
#![allow(clippy::indexing_slicing)]

pub mod dpop;
pub mod keyed;

use std::collections::{BTreeSet, HashMap};
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Once, PoisonError, Weak};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, SystemTime};

use arbitrary::Arbitrary;
use futures::FutureExt as _;
use futures::future::BoxFuture;
use tokenflight::{
    AuthPolicy, Error, RefreshContext, RefreshError, RefreshReason, SingleFlight, Token,
    TokenSource, adapter::AuthError, adapter::AuthRequest, adapter::AuthResponse, adapter::Clock,
    adapter::InvalidHeader, adapter::RequestOptions, adapter::ResponseView, adapter::Spawn,
    adapter::Timer, store::MemoryStore, store::StoreError, store::StoreGuard, store::StoreWatcher,
    store::TokenStore, test_util::ManualClock,
};
use url::Url;

/// Cap on the clock-skew allowance of the coordinator under test (scaled down to a
/// tenth of short lifetimes by the coordinator).
pub const LEEWAY: Duration = Duration::from_secs(10);
/// Cap on the refresh-ahead window, when a scenario turns it on.
pub const REFRESH_AHEAD: Duration = Duration::from_secs(60);
/// The budget of one whole flight (store lock, load, every attempt, save, unlock).
pub const REFRESH_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on one source call inside the budget.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// A token younger than this is usable even if expired: expiry-driven source calls are
/// at least this far apart (C15).
pub const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(1);
/// Fail-fast backoff of the scenarios that turn it on: 5 s, doubling, capped at 20 s,
/// no jitter.
pub const BACKOFF_INITIAL: Duration = Duration::from_secs(5);
/// See [`BACKOFF_INITIAL`].
pub const BACKOFF_MAX: Duration = Duration::from_secs(20);
/// Cap on a server's `Retry-After`.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);
/// Highest generation a sane store holds: one below `tokenflight::store::MAX_GENERATION`
/// (2^53, the first one counted as corrupt).
pub const MAX_GENERATION: u64 = (1 << 53) - 1;
/// At most this many callers are started; further start operations are ignored.
pub const MAX_CALLERS: usize = 64;
/// Longest token lifetime the runner issues (a day); longer ones are clamped.
pub const MAX_LIFETIME_SECS: u32 = 86_400;
/// Polls one `Settle` may make before the runner calls it a livelock.
const SETTLE_LIMIT: usize = 20_000;
/// Rounds of "answer the wire, let time pass" the final drain may take.
const DRAIN_ROUNDS: usize = 200;
/// Starts the message of every panic the runner plants (a quiet panic hook hides them).
const PLANTED: &str = "planted by the model";
/// Access secret of the stale session a scenario may leave in the store.
const STALE_ACCESS: &str = "stale-session";

/// A generated run: how the coordinator is set up and what happens, in order.
#[derive(Clone, Debug, Arbitrary)]
pub struct Scenario {
    /// The coordinator's configuration.
    pub setup: Setup,
    /// The steps, applied in order.
    pub ops: Vec<Op>,
}

/// How the coordinator under test is built.
#[derive(Clone, Copy, Debug, Arbitrary)]
pub struct Setup {
    /// The token it starts with.
    pub initial: Initial,
    /// With a spawner, refreshes run as background tasks of the manual executor too.
    pub spawner: bool,
    /// Refresh ahead ([`REFRESH_AHEAD`]) instead of only on expiry.
    pub refresh_ahead: bool,
    /// Fail-fast backoff ([`BACKOFF_INITIAL`]..[`BACKOFF_MAX`]) after a failed flight.
    pub backoff: bool,
    /// Up to three source attempts per flight instead of one.
    pub retries: bool,
    /// A session from an earlier run (another account's secrets) left in the store.
    pub stale: Option<Stale>,
    /// The `auth_lost` observer panics.
    pub hook_panics: bool,
}

/// The generation of the stale session a scenario leaves in the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Arbitrary)]
pub enum Stale {
    /// A sane generation (7), above the coordinator's first ones.
    Small,
    /// `u64::MAX - 1`: a corrupt or hostile store.
    NearMax,
    /// Just above [`MAX_GENERATION`].
    AboveMax,
}

impl Stale {
    fn generation(self) -> u64 {
        match self {
            Stale::Small => 7,
            Stale::NearMax => u64::MAX - 1,
            Stale::AboveMax => MAX_GENERATION + 1,
        }
    }
}

/// The token the coordinator starts with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Arbitrary)]
pub enum Initial {
    /// None: the first caller triggers the initial fetch.
    NoToken,
    /// A token valid for an hour.
    Valid,
    /// A token obtained two hours ago that expired a second ago.
    Expired,
}

/// One step of a scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Arbitrary)]
pub enum Op {
    /// A new caller sends a request through [`AuthPolicy::send`].
    Send {
        /// Whether the request's body can be replayed (C4).
        replayable: bool,
    },
    /// A new caller asks for a token ([`SingleFlight::token`]).
    Token,
    /// A new caller reports that a server rejected a token
    /// ([`SingleFlight::token_after_rejection`]) of the given generation.
    Reject(Which),
    /// A new caller forces a refresh ([`SingleFlight::force_refresh`]).
    Force,
    /// Polls the n-th woken task (modulo their number): the interleaving.
    Poll(u8),
    /// Polls woken tasks in order until none is woken.
    Settle,
    /// The API server answers the n-th request on the wire (modulo their number).
    Respond {
        /// Which pending request.
        n: u8,
        /// 200 if true, 401 if false.
        accept: bool,
    },
    /// The token source answers its pending call, if any (an unanswered call hangs until
    /// the attempt timeout or the flight's budget).
    Source(Outcome),
    /// Drops the n-th live caller (modulo their number), wherever it is waiting; the one
    /// driving the refresh included.
    Cancel(u8),
    /// Moves monotonic and wall-clock time forward.
    Advance(Step),
    /// Steps only the wall clock (an NTP step), forward or back.
    WallStep {
        /// Forward if true.
        forward: bool,
        /// An hour if true, 40 s if false.
        big: bool,
    },
    /// A new login installs a token ([`SingleFlight::install`]), possibly while a flight
    /// runs.
    Login,
    /// Another replica sharing the store logs in: a newer token appears in the store
    /// (written by someone else, under the store's lock: skipped while a flight runs).
    ReplicaLogin,
    /// Arms a fault: the store call after the next `skip % 4` ones fails, hangs or panics
    /// (logins excepted).
    StoreFault {
        /// Store calls to let through first.
        skip: u8,
        /// What happens to the armed call.
        fault: Fault,
    },
    /// The store pushes a saved token to the coordinator ([`TokenStore::watch`],
    /// issue 20), between any two steps: while a flight runs, while a login is unsaved,
    /// while re-authentication is required or a backoff holds.
    Push(Push),
    /// Moves monotonic and wall-clock time into the current token's leeway (issue 26,
    /// item 9): to half its scaled leeway before its expiry, where it counts as expired
    /// for sending but is still valid. Nothing if it has no expiry or is past that point.
    IntoLeeway,
    /// Another program writes the store's record, outside its lock (issue 26, items 1
    /// and 3).
    Stray(Stray),
    /// The next `unlock` hangs until the flight's budget drops it (issue 26, item 2):
    /// the dropped guard must leave the lock free for the next holder (a replica). A
    /// login's unlock hangs too, and the login is then cancelled (`install()` dropped).
    UnlockHangs,
}

/// What [`Op::Stray`] writes into the store (issue 26).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Arbitrary)]
pub enum Stray {
    /// A value that does not decode (a stray `SET`, a truncated write, another
    /// program's value). The store's contract: an unlocked load fails with
    /// `StoreError::Corrupt`, a load under the lock counts it as no token, and the next
    /// save replaces it.
    Undecodable,
    /// A usable token of another replica numbered exactly at the core's bound
    /// (`tokenflight::store::MAX_GENERATION`, 2^53, one above this model's
    /// [`MAX_GENERATION`]): the first generation counted as corrupt, ignored like any
    /// above it, and overwritten by the next save.
    AtMax,
    /// A usable token numbered just above [`MAX_GENERATION`] (a hostile or damaged
    /// store): ignored by the coordinator, and the store's contract is that the next
    /// save overwrites it.
    AboveMax,
}

/// What [`Op::Push`] pushes, and what the coordinator must do with it (it adopts a
/// pushed token by the rule of its unlocked read of the store).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Arbitrary)]
pub enum Push {
    /// Another replica saved a usable token (an hour) numbered above every generation
    /// so far. Written to the store too when no flight of this coordinator holds the
    /// store's lock (no live source call or sleep); else only pushed (a save the
    /// store's pub/sub delivers out of order). Adopted at once, unless a login is
    /// unsaved (C17: an unsaved login is newer than anything stored).
    Newer,
    /// A different token with the current token's generation (a duplicate or a
    /// corrupt record): ignored (a generation names one token: C3).
    Equal,
    /// A token one generation below the current one (a late push): ignored (C9: the
    /// current token never goes back).
    Older,
    /// Another token with the generation this coordinator last gave a token of its own
    /// (one it is saving, not current yet: its save hangs), when that is above the
    /// current one: ignored (C3: a generation names one token here; the coordinator
    /// adopts only what is newer than anything it numbered).
    Numbered,
    /// A usable token numbered above [`MAX_GENERATION`] (a corrupt store): ignored (C17).
    AboveMax,
    /// A token numbered above every generation so far but expired an hour ago:
    /// ignored (C16: only a usable token replaces the current one).
    Expired,
    /// The store's push of this coordinator's own oldest save not pushed back yet
    /// (Redis pushes every save to every watcher, the saver included): it changes
    /// nothing the contracts see.
    Echo,
}

/// Which generation a [`Op::Reject`] caller reports as rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Arbitrary)]
pub enum Which {
    /// The current token's.
    Current,
    /// The one before the current token (a late, stale rejection).
    Previous,
    /// One the coordinator has not issued yet.
    Newer,
}

/// What the token source answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Arbitrary)]
pub enum Outcome {
    /// A new token with the given lifetime.
    Ok(Lifetime),
    /// A transient failure (network, 5xx, 429), maybe with a `Retry-After`.
    Transient(Option<RetryAfter>),
    /// A permanent failure (`invalid_grant`).
    Permanent,
    /// The source panics.
    Panic,
}

/// A `Retry-After` sent with a transient failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Arbitrary)]
pub enum RetryAfter {
    /// 2 s: fits in the flight's budget.
    Short,
    /// 10 min: above the cap ([`MAX_RETRY_AFTER`]).
    Long,
    /// `u64::MAX` seconds: absurd (an overflow if added to a clock reading).
    Huge,
}

impl RetryAfter {
    fn duration(self) -> Duration {
        match self {
            RetryAfter::Short => Duration::from_secs(2),
            RetryAfter::Long => Duration::from_secs(600),
            RetryAfter::Huge => Duration::from_secs(u64::MAX),
        }
    }
}

/// A new token's lifetime.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Arbitrary)]
pub enum Lifetime {
    /// `expires_in` this many seconds (clamped to 1 s..=1 day).
    In(u32),
    /// An absolute `exp` of `secs - skew` seconds from now, as from a server whose clock
    /// is behind: with `skew >= secs` the token arrives already expired.
    Skewed {
        /// The lifetime the server meant (clamped to 1 s..=1 day).
        secs: u32,
        /// How far the server's clock is behind (clamped to 2 days).
        skew: u32,
    },
    /// No expiry known.
    Unknown,
}

impl Lifetime {
    /// An hour.
    pub const HOUR: Lifetime = Lifetime::In(3600);

    /// The token the source returns at `now`, and its lifetime as the coordinator sees
    /// it (expiry minus arrival, negative when it arrives expired).
    fn token(self, token: Token, now: SystemTime) -> (Token, Option<i64>) {
        match self {
            Lifetime::In(secs) => {
                let secs = secs.clamp(1, MAX_LIFETIME_SECS);
                (
                    token.expires_in(Duration::from_secs(u64::from(secs)), now),
                    Some(i64::from(secs)),
                )
            }
            Lifetime::Skewed { secs, skew } => {
                let secs = i64::from(secs.clamp(1, MAX_LIFETIME_SECS));
                let skew = i64::from(skew.min(2 * MAX_LIFETIME_SECS));
                let offset = secs - skew;
                let magnitude = Duration::from_secs(offset.unsigned_abs());
                let at = if offset >= 0 {
                    now + magnitude
                } else {
                    now - magnitude
                };
                (token.expires_at(at), Some(offset))
            }
            Lifetime::Unknown => (token, None),
        }
    }
}

/// How far [`Op::Advance`] moves the clocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Arbitrary)]
pub enum Step {
    /// 250 ms: a retry pause inside a flight.
    Quarter,
    /// One second.
    Second,
    /// 35 s: past the flight's budget.
    PastTimeout,
    /// An hour: every token issued so far but the long-lived ones expires.
    Hour,
}

impl Step {
    fn duration(self) -> Duration {
        match self {
            Step::Quarter => Duration::from_millis(250),
            Step::Second => Duration::from_secs(1),
            Step::PastTimeout => REFRESH_TIMEOUT + Duration::from_secs(5),
            Step::Hour => Duration::from_secs(3600),
        }
    }
}

/// A store fault armed by [`Op::StoreFault`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Arbitrary)]
pub enum Fault {
    /// The call fails (`StoreError::Unavailable`; `unlock` cannot fail and goes through).
    Fail,
    /// The call never completes (only the flight's budget ends it).
    Hang,
    /// The call panics.
    Panic,
    /// A `save` is refused with `StoreError::LeaseLost` (other calls: as `Fail`).
    LeaseLost,
}

/// A contract the coordinator broke, with where and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The contract, e.g. `"C4"`.
    pub contract: &'static str,
    /// The index of the operation being applied (`ops.len()` and up: the final drain).
    pub step: usize,
    /// What went wrong.
    pub message: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} violated at step {}: {}",
            self.contract, self.step, self.message
        )
    }
}

impl std::error::Error for Violation {}

/// What a run did, for coverage figures and sanity checks of the generators.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Callers started.
    pub callers: usize,
    /// Callers cancelled.
    pub cancelled: usize,
    /// Token-source calls.
    pub source_calls: usize,
    /// Source calls that returned a token.
    pub source_successes: usize,
    /// Requests that reached the fake API server.
    pub requests: usize,
    /// Requests sent a second time after a rejection.
    pub resends: usize,
    /// Callers that ended with an error.
    pub errors: usize,
    /// Tasks polled.
    pub polls: usize,
    /// Logins installed.
    pub logins: usize,
    /// Logins installed while a flight was running.
    pub logins_during_flights: usize,
    /// Store faults that fired.
    pub store_faults: usize,
    /// Calls of the `auth_lost` observer.
    pub hook_calls: usize,
    /// Wall-clock steps.
    pub wall_steps: usize,
    /// Tokens issued that had expired on arrival.
    pub expired_on_arrival: usize,
    /// Logins of other replicas written to the shared store.
    pub replica_logins: usize,
    /// Tokens the store pushed ([`Op::Push`]).
    pub pushes: usize,
    /// Pushed tokens the coordinator adopted.
    pub pushes_adopted: usize,
    /// Pushes that arrived while a flight ran (a live source call or sleep).
    pub pushes_during_flights: usize,
    /// Newer pushes that arrived while a login was unsaved (and had to be ignored).
    pub pushes_over_unsaved_logins: usize,
    /// Records written by another program ([`Op::Stray`]).
    pub strays: usize,
    /// Flights that ended in "re-authentication required" while the current token was
    /// inside its leeway, not expired (issue 26, item 9).
    pub auth_lost_inside_leeway: usize,
}

/// Runs `scenario` and checks the contracts after every step:
///
/// - **C1** at most one token-source call is in flight, at any instant.
/// - **C2** a source call happens only for a stale token (missing, expired, rejected,
///   forced or due for refresh-ahead), and no two successful calls replace the same
///   generation.
/// - **C3** a rejection of a token older than a usable current one is answered with the
///   current token at once, with no source call.
/// - **C4** a request the server rejected is sent again exactly once, with a newer token,
///   when its body is replayable (never twice, never with the same token); otherwise the
///   original response is returned.
/// - **C5** every waiter of a flight gets that flight's outcome, and all of them the same
///   one (or, after a failure, a usable newer token); a waiting caller that nothing will
///   wake (no source call, no timer) is a hang.
/// - **C6** cancelling any caller never hangs the others, and a token the source returned
///   is never lost.
/// - **C9** the current token never goes back or away, and a caller that found a usable
///   token never gets an error; fail-fast backoff is never stretched by a wall-clock step
///   nor switched off by a huge `Retry-After` (it lasts at least `min(Retry-After, cap)`
///   of monotonic time, or less than half the remaining life of a current token without
///   a `Retry-After`; at most the larger of its cap and the `Retry-After` cap).
/// - **C15** a source call for expiry or refresh-ahead replaces a token at least
///   [`MIN_REFRESH_INTERVAL`] and half its lifetime old: never a call per request.
/// - **C16** no caller waits or fails while a usable token exists (refresh-ahead without
///   a spawner excepted: its one caller drives the refresh).
/// - **C17** a login is never replaced by a token of a flight that started before it,
///   never followed by auth-lost, the hook or backoff from such a flight; a stale stored
///   session is never adopted (or its refresh token spent) over a login or initial token;
///   generations strictly increase, never above [`MAX_GENERATION`].
/// - **C18** nobody panics: not a caller, not a login, whatever the store or hook does.
/// - **Pushed tokens** (issue 20, [`Op::Push`], checked as each push is delivered): a
///   usable token newer than everything is adopted at once (C2) and ends
///   re-authentication required (C17), unless a login (or its refresh) is unsaved, when
///   it is never adopted over the login (C17); a push with the current generation or
///   one the coordinator numbered (C3), an older one or an own echo (C9), a corrupt one
///   (C17) or an expired one (C16) changes nothing; and a flight whose token to replace
///   a push superseded makes no further source call (C2).
/// - **Issue 26**: a caller that found the current token, not rejected and not yet
///   expired (its leeway aside), never fails while it stays current and valid, whatever
///   the failure (C16); a flight that read an undecodable record under the lock does not
///   fail without calling its source (C13); once every caller and flight has ended, the
///   store's lock is free (C10) and a generation above the maximum that a save was
///   attempted over is gone (C1 across processes).
///
/// At the end every request on the wire is answered and time moves until every caller
/// has finished; a caller still pending then is a hang (C5/C6).
pub fn run(scenario: &Scenario) -> Result<Summary, Violation> {
    run_traced(scenario, false)
}

/// [`run`], printing every step to stderr when `trace` is set (to read a failing
/// scenario).
pub fn run_traced(scenario: &Scenario, trace: bool) -> Result<Summary, Violation> {
    quiet_planted_panics();
    let mut world = World::new(scenario.setup)?;
    world.trace = trace;
    let result = (|| {
        for (step, op) in scenario.ops.iter().enumerate() {
            world.step = step;
            world.apply(*op)?;
            if trace {
                world.trace(op);
            }
            world.check_step()?;
        }
        world.step = scenario.ops.len();
        world.drain()?;
        world.check_end()
    })();
    world.shutdown();
    result.map(|()| world.summary)
}

/// Hides the panics the runner plants (they are expected, and caught); others print.
fn quiet_planted_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let payload = info.payload();
            let message = payload
                .downcast_ref::<&str>()
                .copied()
                .or_else(|| payload.downcast_ref::<String>().map(String::as_str));
            if !message.is_some_and(|m| m.starts_with(PLANTED)) {
                default(info);
            }
        }));
    });
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string panic".to_owned())
}

// ---------------------------------------------------------------------------------------
// Fakes: token source, store, timer, API server, request and response.

/// State shared by the fakes and the runner (behind one mutex; it is never held while a
/// task is polled or dropped).
#[derive(Default)]
struct Shared {
    calls: Vec<SourceCall>,
    wire: Vec<Wire>,
    /// Set when a second source call starts while one is in flight (C1).
    overlapping_call: Option<String>,
    /// Access secret → generation of every token saved to the store.
    saved: HashMap<String, u64>,
    /// Every save, in order: access secret, generation, logins before it (C17:
    /// generations increase; no flight a login superseded persists its token).
    saves: Vec<(String, u64, usize)>,
    /// The coordinator, to number flights (`stats().flights` when a call starts); taken
    /// out at the end of a run to break the cycle.
    flight: Option<SingleFlight>,
    /// Monotonic time since the start of the run.
    mono: Duration,
    /// Bumped by every wall-clock step (wall and monotonic ages then differ).
    wall_epoch: u32,
    /// `stats().flights` at each login, in order.
    login_flights: Vec<u64>,
    /// Logins are in progress: no fault applies to their store calls.
    installing: bool,
    /// The armed store fault: calls to let through first, and the fault.
    armed: Option<(u8, Fault)>,
    /// Store faults that fired.
    faults_fired: usize,
    /// Live sleeps of the timer (budgets, attempt timeouts, retry pauses).
    live_sleeps: usize,
    /// The last failed flight that must cause a backoff (C9).
    last_failure: Option<FailureSeen>,
    /// Tokens the source issued since the runner last looked.
    issued: Vec<(String, Issued)>,
    /// Calls of the `auth_lost` observer: the error message, and the number of logins
    /// so far.
    hook_calls: Vec<(String, usize)>,
    /// The highest sane generation of a token this coordinator tried to save (every
    /// token it numbers, it saves at once; the save may fail or hang).
    max_numbered: u64,
    /// This coordinator's saves the store has not pushed back yet ([`Push::Echo`]).
    echoes: std::collections::VecDeque<Token>,
    /// The store's record does not decode ([`Stray::Undecodable`]); a save clears it.
    undecodable: bool,
    /// A load under the lock found the undecodable record: source calls, store faults
    /// fired and `stats().failures` then (a flight that fails after it without a source
    /// call or a fault was stopped by the record).
    undecodable_locked_read: Option<(usize, usize, u64)>,
    /// The next `unlock` hangs ([`Op::UnlockHangs`]).
    unlock_hangs: bool,
    /// A login's unlock hung: the runner cancels the login (drops `install()`).
    unlock_hung_in_install: bool,
    /// Guards whose cancelled unlock never released the lock (planted:
    /// [`StorePlant::CancelledUnlockKeepsLock`]); taken out at shutdown.
    leaked_guards: Vec<Box<dyn StoreGuard>>,
    /// Saves attempted (no fault) while the store held a generation above
    /// [`MAX_GENERATION`] ([`Stray::AboveMax`] or a stale session): one must replace it.
    saves_over_hostile: usize,
}

impl Shared {
    fn flights_started(&self) -> u64 {
        self.flight.as_ref().map_or(0, |f| f.stats().flights)
    }
}

struct SourceCall {
    reason: RefreshReason,
    previous: Option<Arc<Token>>,
    now: SystemTime,
    state: CallState,
    waker: Option<Waker>,
    /// The flight it belongs to (`stats().flights` when it started).
    flight: u64,
    /// Logins before it started.
    logins_before: usize,
    /// Monotonic time and wall epoch when it started.
    mono: Duration,
    wall_epoch: u32,
    /// The last failed flight when it started (C9: its backoff must hold).
    failure_before: Option<FailureSeen>,
    /// A store call hung or panicked after it returned: its token may be lost.
    at_risk: bool,
    /// The step whose checks already looked at this call.
    checked: bool,
    /// The coordinator's current token when it started (a pushed token that makes the
    /// call needless: C2).
    current: Option<Arc<Token>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CallState {
    Pending,
    Answered(Outcome),
    Returned(Outcome),
    Dropped,
}

impl CallState {
    fn live(self) -> bool {
        matches!(self, CallState::Pending | CallState::Answered(_))
    }
}

fn access_of_call(n: usize) -> String {
    format!("token-{}", n + 1)
}

/// The source call that issued `access`, if a source call did.
fn call_of_access(access: &str) -> Option<usize> {
    access
        .strip_prefix("token-")?
        .parse::<usize>()
        .ok()?
        .checked_sub(1)
}

/// The source call named in a refresh error's message ("transient failure 3").
fn call_of_error(message: &str) -> Option<usize> {
    message
        .rsplit(' ')
        .next()?
        .parse::<usize>()
        .ok()?
        .checked_sub(1)
}

/// A token source whose calls stay pending until the scenario answers them.
struct ModelSource {
    shared: Arc<Mutex<Shared>>,
    clock: ManualClock,
}

impl TokenSource for ModelSource {
    fn fetch(&self, cx: RefreshContext) -> BoxFuture<'_, Result<Token, RefreshError>> {
        let mut shared = lock(&self.shared);
        if let Some(live) = shared.calls.iter().position(|c| c.state.live()) {
            shared.overlapping_call = Some(format!(
                "source call {} started while call {} was in flight",
                shared.calls.len() + 1,
                live + 1
            ));
        }
        let index = shared.calls.len();
        let flight = shared.flights_started();
        let current = shared.flight.as_ref().and_then(SingleFlight::current);
        let (logins_before, mono, wall_epoch, failure_before) = (
            shared.login_flights.len(),
            shared.mono,
            shared.wall_epoch,
            shared.last_failure,
        );
        shared.calls.push(SourceCall {
            reason: cx.reason,
            previous: cx.previous.clone(),
            now: cx.now,
            state: CallState::Pending,
            waker: None,
            flight,
            logins_before,
            mono,
            wall_epoch,
            failure_before,
            at_risk: false,
            checked: false,
            current,
        });
        drop(shared);
        Box::pin(SourceFuture {
            shared: self.shared.clone(),
            clock: self.clock.clone(),
            index,
        })
    }
}

struct SourceFuture {
    shared: Arc<Mutex<Shared>>,
    clock: ManualClock,
    index: usize,
}

impl Future for SourceFuture {
    type Output = Result<Token, RefreshError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut shared = lock(&self.shared);
        let n = self.index;
        let Some(call) = shared.calls.get_mut(n) else {
            return Poll::Ready(Err(RefreshError::transient("unknown call")));
        };
        match call.state {
            CallState::Answered(outcome) => {
                call.state = CallState::Returned(outcome);
                drop(shared);
                Poll::Ready(match outcome {
                    Outcome::Ok(lifetime) => {
                        let access = access_of_call(n);
                        let (token, lifetime) =
                            lifetime.token(Token::new(access.clone()), self.clock.now());
                        let mut shared = lock(&self.shared);
                        let issued = Issued {
                            mono: shared.mono,
                            wall_epoch: shared.wall_epoch,
                            lifetime,
                        };
                        shared.issued.push((access, issued));
                        Ok(token)
                    }
                    Outcome::Transient(after) => {
                        let error = RefreshError::transient(format!("transient failure {}", n + 1));
                        Err(match after {
                            Some(after) => error.with_retry_after(after.duration()),
                            None => error,
                        })
                    }
                    Outcome::Permanent => {
                        Err(RefreshError::permanent(format!("invalid_grant {}", n + 1)))
                    }
                    Outcome::Panic => panic!("{PLANTED}: source panic"),
                })
            }
            _ => {
                call.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl Drop for SourceFuture {
    fn drop(&mut self) {
        let mut shared = lock(&self.shared);
        if let Some(call) = shared.calls.get_mut(self.index) {
            if call.state.live() {
                call.state = CallState::Dropped;
            }
        }
    }
}

/// The memory store with planted faults: records the generation of every token saved (a
/// refresh's token gets its generation before it is handed out, even when it never
/// becomes current), and makes the armed call fail, hang or panic. It keeps its
/// watchers (issue 20) and pushes tokens to them when the scenario says so
/// ([`Op::Push`]); its own saves are queued for [`Push::Echo`].
struct ModelStore {
    inner: MemoryStore,
    shared: Arc<Mutex<Shared>>,
    watchers: Mutex<Vec<Weak<dyn StoreWatcher>>>,
    /// Guards alive: holders of the store's refresh lock (issue 26, item 2: after every
    /// flight ended, none).
    held: Arc<std::sync::atomic::AtomicUsize>,
}

impl ModelStore {
    /// The fault for the store call starting now, if one is armed and due.
    fn fault(&self) -> Option<Fault> {
        fault(&self.shared)
    }
}

/// The fault for the store call (on the store or a guard) starting now, if one is armed
/// and due.
fn fault(shared: &Mutex<Shared>) -> Option<Fault> {
    let mut shared = lock(shared);
    if shared.installing {
        return None;
    }
    let (skip, fault) = shared.armed.as_mut()?;
    if *skip > 0 {
        *skip -= 1;
        return None;
    }
    let fault = *fault;
    shared.armed = None;
    shared.faults_fired += 1;
    if matches!(fault, Fault::Hang | Fault::Panic) {
        mark_at_risk(&mut shared);
    }
    Some(fault)
}

/// The flight may now end without saving or handing out a token it got.
fn mark_at_risk(shared: &mut Shared) {
    for call in &mut shared.calls {
        if matches!(call.state, CallState::Returned(Outcome::Ok(_))) {
            call.at_risk = true;
        }
    }
}

/// A store bug planted in the model's store (issue 26's Redis items), named by
/// `TOKENFLIGHT_MODEL_PLANT` to measure which property catches it; none by default.
/// Never set in CI: with a plant, the properties must fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StorePlant {
    /// `corrupt-under-lock`: a load under the lock fails with `Corrupt` on an
    /// undecodable record instead of counting it as no token (issue 26, item 1).
    CorruptUnderLock,
    /// `hostile-generation-newer`: a save compares a stored generation above
    /// [`MAX_GENERATION`] as a number and refuses as if a newer token were stored
    /// (`LeaseLost`) instead of overwriting it (item 3).
    HostileGenerationNewer,
    /// `cancelled-unlock-keeps-lock`: an unlock dropped before it completed (the
    /// flight's budget ran out) never releases the lock (item 2).
    CancelledUnlockKeepsLock,
}

fn store_plant() -> Option<StorePlant> {
    static PLANT: std::sync::OnceLock<Option<StorePlant>> = std::sync::OnceLock::new();
    *PLANT.get_or_init(
        || match std::env::var("TOKENFLIGHT_MODEL_PLANT").ok()?.as_str() {
            "corrupt-under-lock" => Some(StorePlant::CorruptUnderLock),
            "hostile-generation-newer" => Some(StorePlant::HostileGenerationNewer),
            "cancelled-unlock-keeps-lock" => Some(StorePlant::CancelledUnlockKeepsLock),
            _ => None,
        },
    )
}

fn corrupt_record_error() -> StoreError {
    StoreError::Corrupt("the stored record does not decode (written by the model)".into())
}

fn planted_store_error() -> StoreError {
    StoreError::Unavailable(format!("{PLANTED}: store failure").into())
}

impl ModelStore {
    /// Pushes `token` to every live watcher, as a store's pub/sub does.
    fn push(&self, token: &Token) {
        let live: Vec<Arc<dyn StoreWatcher>> = {
            let mut watchers = lock(&self.watchers);
            watchers.retain(|w| w.strong_count() > 0);
            watchers.iter().filter_map(Weak::upgrade).collect()
        };
        for watcher in live {
            watcher.token_saved(token.clone());
        }
    }
}

impl TokenStore for ModelStore {
    fn watch(&self, watcher: Weak<dyn StoreWatcher>) {
        lock(&self.watchers).push(watcher);
    }
    fn load(&self) -> BoxFuture<'_, Result<Option<Token>, StoreError>> {
        match self.fault() {
            None if lock(&self.shared).undecodable => {
                Box::pin(async { Err(corrupt_record_error()) })
            }
            None => self.inner.load(),
            Some(Fault::Fail | Fault::LeaseLost) => Box::pin(async { Err(planted_store_error()) }),
            Some(Fault::Hang) => Box::pin(futures::future::pending()),
            Some(Fault::Panic) => Box::pin(async { panic!("{PLANTED}: store load panic") }),
        }
    }
    fn lock(&self) -> BoxFuture<'_, Result<Box<dyn StoreGuard>, StoreError>> {
        match self.fault() {
            None => {
                let inner = self.inner.lock();
                let shared = Arc::clone(&self.shared);
                let held = Arc::clone(&self.held);
                Box::pin(async move {
                    let inner = inner.await?;
                    held.fetch_add(1, Ordering::SeqCst);
                    let guard: Box<dyn StoreGuard> = Box::new(ModelGuard {
                        inner,
                        shared,
                        _held: Held(held),
                    });
                    Ok(guard)
                })
            }
            Some(Fault::Fail | Fault::LeaseLost) => Box::pin(async { Err(planted_store_error()) }),
            Some(Fault::Hang) => Box::pin(futures::future::pending()),
            Some(Fault::Panic) => Box::pin(async { panic!("{PLANTED}: store lock panic") }),
        }
    }
}

/// The memory store's guard with the same planted faults (one armed fault counts store
/// and guard calls alike, in the order the flight makes them).
struct ModelGuard {
    inner: Box<dyn StoreGuard>,
    shared: Arc<Mutex<Shared>>,
    _held: Held,
}

/// One holder of the model store's lock; dropping it releases the lock (the
/// `StoreGuard` contract: dropping a guard releases it as well as it can).
struct Held(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// An unlock that hangs ([`Op::UnlockHangs`], or a hang fault on `unlock`) until the
/// flight's budget drops it: the guard is dropped with it (the lock is free), unless
/// [`StorePlant::CancelledUnlockKeepsLock`] keeps it held.
struct HangingUnlock {
    guard: Option<Box<ModelGuard>>,
}

impl Future for HangingUnlock {
    type Output = ();

    fn poll(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<()> {
        Poll::Pending
    }
}

impl Drop for HangingUnlock {
    fn drop(&mut self) {
        if let Some(guard) = self.guard.take() {
            if store_plant() == Some(StorePlant::CancelledUnlockKeepsLock) {
                let shared = Arc::clone(&guard.shared);
                lock(&shared).leaked_guards.push(guard);
            }
        }
    }
}

impl StoreGuard for ModelGuard {
    fn load(&self) -> BoxFuture<'_, Result<Option<Token>, StoreError>> {
        match fault(&self.shared) {
            None if lock(&self.shared).undecodable => {
                let mut shared = lock(&self.shared);
                let failures = shared.flight.as_ref().map_or(0, |f| f.stats().failures);
                shared.undecodable_locked_read =
                    Some((shared.calls.len(), shared.faults_fired, failures));
                drop(shared);
                if store_plant() == Some(StorePlant::CorruptUnderLock) {
                    Box::pin(async { Err(corrupt_record_error()) })
                } else {
                    // The contract: an undecodable record counts as no token under the
                    // lock, so the flight's save (or a login) replaces it.
                    Box::pin(async { Ok(None) })
                }
            }
            None => self.inner.load(),
            Some(Fault::Fail | Fault::LeaseLost) => Box::pin(async { Err(planted_store_error()) }),
            Some(Fault::Hang) => Box::pin(futures::future::pending()),
            Some(Fault::Panic) => Box::pin(async { panic!("{PLANTED}: store load panic") }),
        }
    }
    fn save<'a>(&'a self, token: &'a Token) -> BoxFuture<'a, Result<(), StoreError>> {
        {
            // The coordinator numbered this token, whether or not the save goes through:
            // a flight whose save hangs or fails still hands it to its waiters.
            let mut shared = lock_shared(&self.shared);
            let access = token.access().expose().to_owned();
            shared.saved.insert(access, token.generation());
            if token.generation() <= MAX_GENERATION {
                shared.max_numbered = shared.max_numbered.max(token.generation());
            }
        }
        match fault(&self.shared) {
            None => {
                let stored = self
                    .inner
                    .load()
                    .now_or_never()
                    .and_then(Result::ok)
                    .flatten()
                    .map(|t| t.generation());
                let mut shared = lock_shared(&self.shared);
                if stored.is_some_and(|g| g > MAX_GENERATION) && !shared.undecodable {
                    shared.saves_over_hostile += 1;
                    if store_plant() == Some(StorePlant::HostileGenerationNewer)
                        && stored.is_some_and(|g| g >= token.generation())
                    {
                        return Box::pin(async { Err(StoreError::LeaseLost) });
                    }
                }
                let access = token.access().expose().to_owned();
                let logins = shared.login_flights.len();
                shared.saves.push((access, token.generation(), logins));
                shared.echoes.push_back(token.clone());
                shared.undecodable = false;
                drop(shared);
                self.inner.save(token)
            }
            Some(Fault::Fail) => Box::pin(async { Err(planted_store_error()) }),
            Some(Fault::LeaseLost) => Box::pin(async { Err(StoreError::LeaseLost) }),
            Some(Fault::Hang) => Box::pin(futures::future::pending()),
            Some(Fault::Panic) => Box::pin(async { panic!("{PLANTED}: store save panic") }),
        }
    }
    fn unlock(self: Box<Self>) -> BoxFuture<'static, ()> {
        let hangs = {
            // A login's unlock hangs too: the runner then cancels the login (item 2: a
            // cancelled `install()` during unlock must release the lock as well).
            let mut shared = lock(&self.shared);
            let hangs = std::mem::take(&mut shared.unlock_hangs);
            if hangs {
                shared.faults_fired += 1;
                shared.unlock_hung_in_install |= shared.installing;
                mark_at_risk(&mut shared);
            }
            hangs
        };
        let fault = if hangs {
            Some(Fault::Hang)
        } else {
            fault(&self.shared)
        };
        match fault {
            None | Some(Fault::Fail | Fault::LeaseLost) => {
                // Released when the unlock starts (the memory store's own is immediate).
                let ModelGuard { inner, .. } = *self;
                inner.unlock()
            }
            Some(Fault::Hang) => Box::pin(HangingUnlock { guard: Some(self) }),
            Some(Fault::Panic) => Box::pin(async move {
                drop(self);
                panic!("{PLANTED}: store unlock panic")
            }),
        }
    }
}

fn lock_shared(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    lock(shared)
}

/// The manual clock's timer, counting live sleeps: a waiting caller needs a live source
/// call or a live sleep to be woken one day (C5).
struct ModelTimer {
    clock: ManualClock,
    shared: Arc<Mutex<Shared>>,
}

impl Timer for ModelTimer {
    fn sleep(&self, duration: Duration) -> BoxFuture<'static, ()> {
        lock(&self.shared).live_sleeps += 1;
        Box::pin(ModelSleep {
            inner: self.clock.sleep(duration),
            shared: self.shared.clone(),
            live: true,
        })
    }
}

struct ModelSleep {
    inner: BoxFuture<'static, ()>,
    shared: Arc<Mutex<Shared>>,
    live: bool,
}

impl ModelSleep {
    fn end(&mut self) {
        if std::mem::take(&mut self.live) {
            let mut shared = lock(&self.shared);
            shared.live_sleeps = shared.live_sleeps.saturating_sub(1);
        }
    }
}

impl Future for ModelSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let polled = self.inner.as_mut().poll(cx);
        if polled.is_ready() {
            self.end();
        }
        polled
    }
}

impl Drop for ModelSleep {
    fn drop(&mut self) {
        self.end();
    }
}
/// One request as the fake API server saw it.
struct Wire {
    caller: usize,
    access: Option<String>,
    generation: Option<u64>,
    answer: Option<bool>,
    dropped: bool,
    waker: Option<Waker>,
}

impl Wire {
    fn pending(&self) -> bool {
        self.answer.is_none() && !self.dropped
    }
}

/// The fake client's request.
#[derive(Debug)]
struct ModelRequest {
    url: Url,
    authorization: Option<String>,
    replayable: bool,
}

impl AuthRequest for ModelRequest {
    fn method(&self) -> http::Method {
        http::Method::GET
    }
    fn url(&self) -> &Url {
        &self.url
    }
    fn url_mut(&mut self) -> &mut Url {
        &mut self.url
    }
    fn set_sensitive_header(&mut self, name: &str, value: &str) -> Result<(), InvalidHeader> {
        if name.eq_ignore_ascii_case("authorization") {
            self.authorization = Some(value.to_owned());
        }
        Ok(())
    }
    fn try_clone(&self) -> Option<Self> {
        self.replayable.then(|| ModelRequest {
            url: self.url.clone(),
            authorization: self.authorization.clone(),
            replayable: true,
        })
    }
}

/// The fake server's response: a status and which request it answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ModelResponse {
    status: u16,
    wire: usize,
}

impl ResponseView for ModelResponse {
    fn status(&self) -> u16 {
        self.status
    }
    fn header(&self, _name: &http::HeaderName) -> Option<&str> {
        None
    }
}

impl AuthResponse for ModelResponse {}

/// The future a send returns: pending until the scenario answers the request.
struct WireFuture {
    shared: Arc<Mutex<Shared>>,
    index: usize,
}

impl Future for WireFuture {
    type Output = Result<ModelResponse, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut shared = lock(&self.shared);
        let slot = shared
            .wire
            .get_mut(self.index)
            .map(|wire| (wire.answer, &mut wire.waker));
        answer_or_park(slot, self.index, cx)
    }
}

/// What the future of the request on wire `index` answers: the scenario's verdict
/// (200, or 401 for a rejection), a 500 for a wire the runner no longer has, or pending
/// until the scenario answers (the waker kept in the wire's slot).
fn answer_or_park(
    slot: Option<(Option<bool>, &mut Option<Waker>)>,
    index: usize,
    cx: &mut Context<'_>,
) -> Poll<Result<ModelResponse, Infallible>> {
    match slot {
        None => Poll::Ready(Ok(ModelResponse {
            status: 500,
            wire: index,
        })),
        Some((Some(accept), _)) => Poll::Ready(Ok(ModelResponse {
            status: if accept { 200 } else { 401 },
            wire: index,
        })),
        Some((None, waker)) => {
            *waker = Some(cx.waker().clone());
            Poll::Pending
        }
    }
}

impl Drop for WireFuture {
    fn drop(&mut self) {
        let mut shared = lock(&self.shared);
        if let Some(wire) = shared.wire.get_mut(self.index) {
            if wire.answer.is_none() {
                wire.dropped = true;
            }
        }
    }
}

/// Queues spawned refreshes; the executor adopts them as tasks after every step.
#[derive(Clone, Default)]
struct QueueSpawner {
    queue: Arc<Mutex<Vec<BoxFuture<'static, ()>>>>,
}

impl Spawn for QueueSpawner {
    fn spawn(&self, task: BoxFuture<'static, ()>) -> bool {
        lock(&self.queue).push(task);
        true
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

// ---------------------------------------------------------------------------------------
// The executor.

/// A waker that only raises a flag: the scenario decides when the task is polled.
struct Flag(AtomicBool);

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.0.store(true, Ordering::SeqCst);
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[derive(Debug)]
enum Finished {
    Response(Result<ModelResponse, AuthError<Infallible>>),
    Token(Result<Arc<Token>, Error>),
    Spawned,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Send { replayable: bool },
    Token,
    Reject(u64),
    Force,
    Spawned,
}

struct Task {
    kind: Kind,
    future: Option<Pin<Box<dyn Future<Output = Finished> + Send>>>,
    flag: Arc<Flag>,
    waker: Waker,
    polls: usize,
    done: bool,
    cancelled: bool,
    /// Whether a usable token existed when the task was first polled (C9, C16).
    usable_at_first_poll: bool,
    /// The current token's generation then (a refresh ahead that fails falls back to it).
    current_at_first_poll: Option<u64>,
    /// Logins before its first poll (C17).
    logins_at_first_poll: usize,
    /// Per waiting phase (a send waits for its first token, then maybe for a newer one):
    /// the source call it was seen waiting on (C5).
    waited_on: Vec<Option<usize>>,
    /// The first response's rejection was already processed by a poll (C3).
    rejection_seen: bool,
    /// Polls since its last request went out (more than one: it waited).
    phase_polls: usize,
    /// The wall epoch at its first poll (C16: a token valid now was valid all along
    /// only if the wall clock did not step since).
    wall_epoch_at_first_poll: u32,
}

impl Task {
    fn live(&self) -> bool {
        !self.done && !self.cancelled
    }
    fn woken(&self) -> bool {
        self.flag.0.load(Ordering::SeqCst)
    }
}

/// When a token was issued (monotonic time, wall epoch) and its lifetime in seconds as
/// the coordinator sees it, if known (C15, C16).
#[derive(Clone, Copy, Debug)]
struct Issued {
    mono: Duration,
    wall_epoch: u32,
    lifetime: Option<i64>,
}

/// What the model knows about tokens, independent of the coordinator's own view.
#[derive(Default)]
struct Knowledge {
    /// Access secret → generation, for every token seen as current or saved.
    generations: HashMap<String, u64>,
    /// Access secrets of the tokens seen as current (C6: a refreshed token is not lost).
    became_current: BTreeSet<String>,
    /// Access secret → when it was issued.
    issued: HashMap<String, Issued>,
    /// Highest generation reported rejected so far (issued, maybe not yet processed; so
    /// at least the coordinator's own value).
    rejected: u64,
    /// The current token when last observed (after a poll or a step).
    observed: Option<(String, u64)>,
    /// Renumbered logins: (old generation, new generation).
    aliases: Vec<(u64, u64)>,
    /// Generations observed as current, in order.
    history: Vec<u64>,
    /// A caller reported a rejection of a generation never seen handed out: what it
    /// concerns is the coordinator's guess (C2 cannot judge rejection-driven calls).
    unseen_rejections: bool,
    /// The current token at the end of the last step (C9).
    last_current: Option<Arc<Token>>,
    /// Generations that successful source calls replaced (C2).
    replaced: BTreeSet<u64>,
    /// Highest sane generation seen (C17: generations strictly increase).
    max_generation: u64,
    /// (access, generation) of every save seen.
    saved_pairs: BTreeSet<(String, u64)>,
    /// (access, generation) of every token seen as current.
    current_pairs: BTreeSet<(String, u64)>,
    /// Saves already checked.
    saves_checked: usize,
    /// Hook calls already checked.
    hooks_checked: usize,
    /// "Re-authentication required" at the end of the last step.
    auth_lost: bool,
    /// `mono` at the end of the step where "re-authentication required" last began.
    auth_lost_since: Duration,
    /// `stats().failures` at the end of the last poll.
    failures: u64,
    /// Per failed flight: the generation of the usable current token when it failed.
    usable_at_failure: HashMap<u64, Option<u64>>,
    /// Source calls whose start was checked.
    start_checked: BTreeSet<usize>,
    /// Other replicas' logins: access secret, monotonic time, store faults fired then.
    replica_logins: Vec<(String, Duration, usize)>,
    /// Per flight: the error its waiters got, and whether one got its own token (C5).
    flight_outcomes: HashMap<u64, FlightSeen>,
    /// Generations of pushed tokens adopted while a flight ran (C4: see `check_send`).
    pushed_mid_flight: BTreeSet<u64>,
    /// `Shared::saves` when the last login was installed: a save after it saved the
    /// login or a refresh of it (a flight that started before it saves nothing: C17).
    login_saves_from: usize,
}

#[derive(Clone, Copy, Debug)]
struct FailureSeen {
    mono: Duration,
    retry_after: Option<Duration>,
    /// Half the remaining life of the current token then, if it has an expiry.
    token_cap: Option<Duration>,
    /// Logins when it was seen: a login ends the backoff.
    logins: usize,
}

#[derive(Clone, Debug, Default)]
struct FlightSeen {
    error: Option<String>,
    own_token: bool,
}

struct World {
    setup: Setup,
    clock: ManualClock,
    auth: AuthPolicy,
    flight: SingleFlight,
    shared: Arc<Mutex<Shared>>,
    spawner: QueueSpawner,
    tasks: Vec<Task>,
    known: Knowledge,
    summary: Summary,
    step: usize,
    /// Monotonic time since the start.
    mono: Duration,
    /// `mono` at the last wall-clock step: a step can make a stored token usable or
    /// not, so what a reload found before it says nothing of now.
    last_wall_step: Duration,
    /// Print every step.
    trace: bool,
    /// The store, to write other replicas' logins into it.
    store: Option<Arc<ModelStore>>,
}

impl World {
    fn new(setup: Setup) -> Result<Self, Violation> {
        let clock = ManualClock::at_fixed_point();
        let shared = Arc::new(Mutex::new(Shared::default()));
        let spawner = QueueSpawner::default();
        let now = clock.now();
        let mut known = Knowledge::default();
        let store = Arc::new(ModelStore {
            inner: MemoryStore::new(),
            shared: shared.clone(),
            watchers: Mutex::new(Vec::new()),
            held: Arc::default(),
        });
        if let Some(stale) = setup.stale {
            // Another account's session from an earlier run, straight into the store.
            let token = Token::new(STALE_ACCESS)
                .with_refresh("stale-refresh")
                .expires_in(Duration::from_secs(86_400), now)
                .with_generation(stale.generation());
            let _ = futures::executor::block_on(crate::save_locked(&store.inner, &token));
            known
                .generations
                .insert(STALE_ACCESS.to_owned(), stale.generation());
            if stale.generation() <= MAX_GENERATION {
                known.max_generation = stale.generation();
            }
        }
        let hook_shared = shared.clone();
        let hook_panics = setup.hook_panics;
        let mut builder = AuthPolicy::builder()
            .source(ModelSource {
                shared: shared.clone(),
                clock: clock.clone(),
            })
            .store(store.clone())
            .clock(Arc::new(clock.clone()))
            .timer(Arc::new(ModelTimer {
                clock: clock.clone(),
                shared: shared.clone(),
            }))
            .config(compat::config(&setup))
            .observer(crate::on_auth_lost(move |error: &RefreshError| {
                let mut shared = lock(&hook_shared);
                let logins = shared.login_flights.len();
                shared.hook_calls.push((error.message().to_owned(), logins));
                drop(shared);
                if hook_panics {
                    panic!("{PLANTED}: auth-lost hook panic");
                }
            }))
            .allowed_origin("https://api.test");
        if setup.spawner {
            builder = builder.spawner(Arc::new(spawner.clone()));
        }
        builder = match setup.initial {
            Initial::NoToken => builder,
            Initial::Valid => {
                known.issued.insert(
                    "initial".to_owned(),
                    Issued {
                        mono: Duration::ZERO,
                        wall_epoch: 0,
                        lifetime: Some(3600),
                    },
                );
                builder.initial_token(
                    Token::new("initial")
                        .with_refresh("initial-refresh")
                        .expires_in(Duration::from_secs(3600), now),
                )
            }
            Initial::Expired => builder.initial_token(compat::obtained_at(
                Token::new("initial")
                    .with_refresh("initial-refresh")
                    .expires_at(now - Duration::from_secs(1)),
                now - Duration::from_secs(7200),
            )),
        };
        let auth = builder.build().map_err(|error| Violation {
            contract: "setup",
            step: 0,
            message: format!("the model's configuration was refused: {error}"),
        })?;
        let flight = auth.flight().cloned().ok_or_else(|| Violation {
            contract: "setup",
            step: 0,
            message: "the model's policy is keyed".into(),
        })?;
        lock(&shared).flight = Some(flight.clone());
        let mut world = World {
            setup,
            clock,
            auth,
            flight,
            shared,
            spawner,
            tasks: Vec::new(),
            known,
            summary: Summary::default(),
            step: 0,
            mono: Duration::ZERO,
            last_wall_step: Duration::ZERO,
            trace: false,
            store: Some(store),
        };
        world.observe_current();
        world.known.last_current = world.flight.current();
        Ok(world)
    }

    /// Drops every task and breaks the coordinator ↔ source cycle.
    fn shutdown(&mut self) {
        let tasks = std::mem::take(&mut self.tasks);
        for task in tasks {
            let _ = std::panic::catch_unwind(AssertUnwindSafe(move || drop(task)));
        }
        let _ = std::panic::catch_unwind(AssertUnwindSafe(|| {
            drop(std::mem::take(&mut *lock(&self.spawner.queue)))
        }));
        let flight = self.shared().flight.take();
        drop(flight);
        let leaked = std::mem::take(&mut self.shared().leaked_guards);
        drop(leaked);
        self.store = None;
    }

    fn violation(&self, contract: &'static str, message: impl Into<String>) -> Violation {
        Violation {
            contract,
            step: self.step,
            message: message.into(),
        }
    }

    fn shared(&self) -> MutexGuard<'_, Shared> {
        lock(&self.shared)
    }

    fn now(&self) -> SystemTime {
        self.clock.now()
    }

    fn logins(&self) -> usize {
        self.shared().login_flights.len()
    }

    /// Whether a login happened after flight `flight` started (it must then lose: C17).
    fn superseded_by_login(&self, flight: u64) -> bool {
        self.shared().login_flights.iter().any(|&f| f >= flight)
    }

    /// Whether the stale stored session must never be used: a login or an initial token
    /// is newer, or its generation is corrupt.
    fn stale_forbidden(&self) -> bool {
        self.setup.stale.is_some_and(|stale| {
            self.setup.initial != Initial::NoToken
                || self.logins() > 0
                || stale.generation() > MAX_GENERATION
        })
    }

    /// Whether the coordinator must consider `token` usable now, as far as the model can
    /// tell: not reported rejected, and not expired with the leeway scaled to its
    /// lifetime, or younger than [`MIN_REFRESH_INTERVAL`] (no wall-clock step since it
    /// was issued).
    fn surely_usable(&self, token: &Token) -> bool {
        if token.generation() <= self.known.rejected
            || token.generation() > MAX_GENERATION
            || (token.access().expose() == STALE_ACCESS && self.stale_forbidden())
        {
            return false;
        }
        !token.is_expired(self.now(), self.leeway_for(token)) || self.young(token)
    }

    /// Whether `token` is valid now, the leeway aside (C16: served after any failure
    /// until it really expires): not reported rejected, sane, not a forbidden stale
    /// session, and not expired.
    fn really_valid(&self, token: &Token) -> bool {
        token.generation() > self.known.rejected
            && token.generation() <= MAX_GENERATION
            && !(token.access().expose() == STALE_ACCESS && self.stale_forbidden())
            && !token.is_expired(self.now(), Duration::ZERO)
    }

    /// The documented leeway for `token` (C15): the cap, scaled down to a tenth of the
    /// lifetime the runner issued it with plus the second of `expires_in`'s granularity
    /// (the cap when unknown).
    fn leeway_for(&self, token: &Token) -> Duration {
        let lifetime = self
            .known
            .issued
            .get(token.access().expose())
            .and_then(|issued| issued.lifetime)
            .and_then(|l| u64::try_from(l).ok())
            .filter(|&l| l > 0);
        match lifetime {
            Some(l) => LEEWAY.min(Duration::from_secs(l) / 10 + Duration::from_secs(1)),
            None => LEEWAY,
        }
    }

    fn young(&self, token: &Token) -> bool {
        let Some(issued) = self.known.issued.get(token.access().expose()) else {
            return false;
        };
        issued.wall_epoch == self.shared().wall_epoch
            && self.mono.saturating_sub(issued.mono) < MIN_REFRESH_INTERVAL
    }

    /// The current token if the coordinator must consider it usable.
    fn usable_current(&self) -> Option<Arc<Token>> {
        self.flight
            .current()
            .filter(|token| self.surely_usable(token))
    }

    fn observe_current(&mut self) {
        if let Some(token) = self.flight.current() {
            // A login renumbered above a stored session keeps its secret: a rejection of
            // its old number is a rejection of the new one.
            if let Some((access, generation)) = self.known.observed.clone() {
                if token.access().expose() == access && token.generation() > generation {
                    self.known.aliases.push((generation, token.generation()));
                    if self.known.rejected >= generation {
                        self.known.rejected = self.known.rejected.max(token.generation());
                    }
                }
            }
            self.known.observed = Some((token.access().expose().to_owned(), token.generation()));
            if self.known.history.last() != Some(&token.generation()) {
                self.known.history.push(token.generation());
            }
            let access = token.access().expose().to_owned();
            self.known.became_current.insert(access.clone());
            self.known.generations.insert(access, token.generation());
        }
        let (saved, issued) = {
            let mut shared = self.shared();
            (
                std::mem::take(&mut shared.saved),
                std::mem::take(&mut shared.issued),
            )
        };
        self.known.generations.extend(saved);
        for (access, at) in issued {
            if at.lifetime.is_some_and(|l| l <= 0) {
                self.summary.expired_on_arrival += 1;
            }
            self.known.issued.insert(access, at);
        }
    }

    /// A server rejected `generation`: a renumbered login's old number stands for its
    /// new one.
    fn raise_rejected(&mut self, mut generation: u64) {
        while let Some(&(_, to)) = self
            .known
            .aliases
            .iter()
            .find(|(from, to)| *from == generation && *to > generation)
        {
            generation = to;
        }
        self.known.rejected = self.known.rejected.max(generation);
    }

    fn current_generation(&self) -> u64 {
        self.flight.current().map_or(0, |t| t.generation())
    }

    // ----- operations

    fn apply(&mut self, op: Op) -> Result<(), Violation> {
        match op {
            Op::Send { replayable } => self.start(Kind::Send { replayable }),
            Op::Token => self.start(Kind::Token),
            Op::Reject(which) => {
                let current = self.current_generation();
                // The token current before this one, as seen: a generation some
                // request may really have carried.
                let previous = self
                    .known
                    .history
                    .iter()
                    .rev()
                    .find(|&&g| g < current)
                    .copied()
                    .unwrap_or(current.saturating_sub(1));
                let generation = match which {
                    Which::Current => current,
                    Which::Previous => previous,
                    Which::Newer => current.saturating_add(1),
                };
                self.start(Kind::Reject(generation));
            }
            Op::Force => self.start(Kind::Force),
            Op::Poll(n) => {
                let woken: Vec<usize> = (0..self.tasks.len())
                    .filter(|&i| self.tasks[i].live() && self.tasks[i].woken())
                    .collect();
                if !woken.is_empty() {
                    let index = woken[usize::from(n) % woken.len()];
                    self.poll(index)?;
                }
            }
            Op::Settle => self.settle()?,
            Op::Respond { n, accept } => {
                let target = {
                    let shared = self.shared();
                    let pending: Vec<usize> = (0..shared.wire.len())
                        .filter(|&i| shared.wire[i].pending())
                        .collect();
                    (!pending.is_empty()).then(|| pending[usize::from(n) % pending.len()])
                };
                if let Some(index) = target {
                    self.respond(index, accept);
                }
            }
            Op::Source(outcome) => {
                let waker = {
                    let mut shared = self.shared();
                    shared
                        .calls
                        .iter_mut()
                        .find(|c| c.state == CallState::Pending)
                        .and_then(|call| {
                            call.state = CallState::Answered(outcome);
                            call.waker.take()
                        })
                };
                if let Some(waker) = waker {
                    waker.wake();
                }
            }
            Op::Cancel(n) => {
                let live: Vec<usize> = (0..self.tasks.len())
                    .filter(|&i| self.tasks[i].live() && self.tasks[i].kind != Kind::Spawned)
                    .collect();
                if !live.is_empty() {
                    let index = live[usize::from(n) % live.len()];
                    self.tasks[index].cancelled = true;
                    // Dropped outside any lock: the drop may drop the refresh and the
                    // source call with it.
                    let future = self.tasks[index].future.take();
                    if let Err(panic) =
                        std::panic::catch_unwind(AssertUnwindSafe(move || drop(future)))
                    {
                        return Err(self.violation(
                            "C18",
                            format!("dropping task {index} panicked: {}", panic_message(&*panic)),
                        ));
                    }
                    self.summary.cancelled += 1;
                }
            }
            Op::Advance(step) => self.advance(step.duration()),
            Op::WallStep { forward, big } => {
                let by = Duration::from_secs(if big { 3600 } else { 40 });
                self.summary.wall_steps += 1;
                compat::step_wall(&self.clock, forward, by);
                self.shared().wall_epoch += 1;
                self.last_wall_step = self.mono;
            }
            Op::Login => self.login()?,
            Op::StoreFault { skip, fault } => self.shared().armed = Some((skip % 4, fault)),
            Op::ReplicaLogin => self.replica_login(),
            Op::Push(push) => self.store_push(push)?,
            Op::IntoLeeway => self.advance_into_leeway(),
            Op::Stray(stray) => self.stray(stray),
            Op::UnlockHangs => self.shared().unlock_hangs = true,
        }
        self.adopt_spawned();
        Ok(())
    }

    /// [`Op::IntoLeeway`].
    fn advance_into_leeway(&mut self) {
        let Some(token) = self.flight.current() else {
            return;
        };
        let Some(expiry) = token.expiry() else {
            return;
        };
        let Some(target) = expiry.checked_sub(self.leeway_for(&token) / 2) else {
            return;
        };
        if let Ok(by) = target.duration_since(self.now()) {
            if !by.is_zero() && by <= Duration::from_secs(u64::from(MAX_LIFETIME_SECS)) {
                self.advance(by);
            }
        }
    }

    /// [`Op::Stray`]: another program writes the store's record.
    fn stray(&mut self, stray: Stray) {
        let Some(store) = self.store.clone() else {
            return;
        };
        self.summary.strays += 1;
        let generation = match stray {
            Stray::Undecodable => {
                let mut shared = self.shared();
                shared.undecodable = true;
                shared.undecodable_locked_read = None;
                drop(shared);
                self.forget_stored_generation();
                return;
            }
            Stray::AtMax => {
                self.forget_stored_generation();
                MAX_GENERATION + 1
            }
            Stray::AboveMax => {
                self.forget_stored_generation();
                MAX_GENERATION + 2
            }
        };
        let access = format!("stray-{}", self.summary.strays);
        let token = Token::new(access.clone())
            .with_refresh(format!("stray-refresh-{}", self.summary.strays))
            .expires_in(Duration::from_secs(3600), self.now())
            .with_generation(generation);
        let _ = futures::executor::block_on(crate::save_locked(&store.inner, &token));
        {
            let mut shared = self.shared();
            shared.undecodable = false;
            if generation > MAX_GENERATION {
                shared.saves_over_hostile = 0;
            }
        }
        self.known.generations.insert(access.clone(), generation);
        if generation <= MAX_GENERATION {
            self.known.max_generation = self.known.max_generation.max(generation);
        }
        let issued = Issued {
            mono: self.mono,
            wall_epoch: self.shared().wall_epoch,
            lifetime: Some(3600),
        };
        self.known.issued.insert(access, issued);
    }

    /// A record that does not decode or is corrupt replaced the store's: its
    /// generation counter is gone with it, so the next save needs to be above only what
    /// this coordinator numbered or holds (a stored generation it never read is lost
    /// to everyone).
    fn forget_stored_generation(&mut self) {
        let numbered = self.shared().max_numbered;
        let current = self.flight.current().map_or(0, |t| t.generation());
        self.known.max_generation = numbered.max(current.min(MAX_GENERATION));
    }

    fn advance(&mut self, by: Duration) {
        self.mono += by;
        self.shared().mono = self.mono;
        self.clock.advance(by);
    }

    fn start(&mut self, kind: Kind) {
        let callers = self
            .tasks
            .iter()
            .filter(|t| t.kind != Kind::Spawned)
            .count();
        if callers >= MAX_CALLERS {
            return;
        }
        let id = self.tasks.len();
        let future: Pin<Box<dyn Future<Output = Finished> + Send>> = match kind {
            Kind::Send { replayable } => {
                let auth = self.auth.clone();
                let shared = self.shared.clone();
                let flight = self.flight.clone();
                #[allow(clippy::expect_used)] // a constant, valid URL
                let url = Url::parse("https://api.test/resource").expect("valid URL");
                let request = ModelRequest {
                    url,
                    authorization: None,
                    replayable,
                };
                Box::pin(async move {
                    let send = |request: ModelRequest| wire(&shared, &flight, id, request);
                    Finished::Response(auth.send(request, RequestOptions::default(), send).await)
                })
            }
            Kind::Token => {
                let flight = self.flight.clone();
                Box::pin(async move { Finished::Token(flight.token().await) })
            }
            Kind::Reject(generation) => {
                self.raise_rejected(generation);
                let flight = self.flight.clone();
                Box::pin(
                    async move { Finished::Token(flight.token_after_rejection(generation).await) },
                )
            }
            Kind::Force => {
                let flight = self.flight.clone();
                Box::pin(async move { Finished::Token(flight.force_refresh().await) })
            }
            Kind::Spawned => return,
        };
        self.push(kind, future);
        self.summary.callers += 1;
    }

    fn push(&mut self, kind: Kind, future: Pin<Box<dyn Future<Output = Finished> + Send>>) {
        let flag = Arc::new(Flag(AtomicBool::new(true)));
        let waker = Waker::from(flag.clone());
        self.tasks.push(Task {
            kind,
            future: Some(future),
            flag,
            waker,
            polls: 0,
            done: false,
            cancelled: false,
            usable_at_first_poll: false,
            current_at_first_poll: None,
            logins_at_first_poll: 0,
            waited_on: vec![None],
            rejection_seen: false,
            phase_polls: 0,
            wall_epoch_at_first_poll: 0,
        });
    }

    fn adopt_spawned(&mut self) {
        let spawned = std::mem::take(&mut *lock(&self.spawner.queue));
        for task in spawned {
            self.push(
                Kind::Spawned,
                Box::pin(async move {
                    task.await;
                    Finished::Spawned
                }),
            );
        }
    }

    fn respond(&mut self, index: usize, accept: bool) {
        let waker = {
            let mut shared = self.shared();
            let Some(wire) = shared.wire.get_mut(index) else {
                return;
            };
            wire.answer = Some(accept);
            let generation = wire.generation;
            let waker = wire.waker.take();
            drop(shared);
            if !accept {
                // The server rejected this generation: from now on the model treats it
                // as rejected (the coordinator learns it when the caller is polled).
                if let Some(g) = generation {
                    self.raise_rejected(g);
                }
            }
            waker
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Whether a flight is running, as far as the model can see (a live source call or
    /// a live sleep: budget, timeout or retry pause).
    fn flight_running(&self) -> bool {
        let shared = self.shared();
        shared.live_sleeps > 0 || shared.calls.iter().any(|c| c.state.live())
    }

    fn login(&mut self) -> Result<(), Violation> {
        let n = self.logins() + 1;
        self.summary.logins += 1;
        if self.flight_running() {
            self.summary.logins_during_flights += 1;
        }
        let access = format!("login-{n}");
        let token = Token::new(access.clone())
            .with_refresh(format!("login-refresh-{n}"))
            .expires_in(Duration::from_secs(3600), self.now());
        let issued = Issued {
            mono: self.mono,
            wall_epoch: self.shared().wall_epoch,
            lifetime: Some(3600),
        };
        self.known.issued.insert(access, issued);
        {
            let mut shared = self.shared();
            let flights = shared.flights_started();
            shared.login_flights.push(flights);
            shared.installing = true;
        }
        let saves = self.shared().saves.len();
        self.known.login_saves_from = saves;
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let flight = self.flight.clone();
        let polled = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let mut install = std::pin::pin!(flight.install(token));
            install.as_mut().poll(&mut cx)
        }));
        self.shared().installing = false;
        self.adopt_spawned();
        match polled {
            Err(panic) => Err(self.violation(
                "C18",
                format!("installing a login panicked: {}", panic_message(&*panic)),
            )),
            Ok(Poll::Ready(Ok(installed))) => {
                self.known.generations.insert(
                    installed.access().expose().to_owned(),
                    installed.generation(),
                );
                Ok(())
            }
            Ok(Poll::Ready(Err(error))) => {
                Err(self.violation("C9", format!("installing a login failed: {error}")))
            }
            // Its unlock hung and the login was cancelled (the future is dropped): it was
            // installed and saved before the unlock.
            Ok(Poll::Pending) if std::mem::take(&mut self.shared().unlock_hung_in_install) => {
                if let Some(installed) = self.flight.current() {
                    self.known.generations.insert(
                        installed.access().expose().to_owned(),
                        installed.generation(),
                    );
                }
                Ok(())
            }
            Ok(Poll::Pending) => Err(self.violation(
                "C6",
                "install() with a memory store did not complete at once",
            )),
        }
    }

    /// Another replica's login lands in the shared store, numbered above what it holds.
    fn replica_login(&mut self) {
        // The replica takes the store's refresh lock: it waits while a flight holds it
        // (the runner then skips the login).
        let Some(store) = self.store.clone().filter(|_| !self.flight_running()) else {
            return;
        };
        let n = self.known.replica_logins.len() + 1;
        let access = format!("replica-{n}");
        let stored = futures::executor::block_on(store.inner.load())
            .ok()
            .flatten()
            .map_or(0, |t| t.generation());
        // A corrupt stored generation is ignored, as the coordinator must.
        let stored = if stored > MAX_GENERATION { 0 } else { stored };
        let generation = stored.max(self.known.max_generation).saturating_add(1);
        let token = Token::new(access.clone())
            .with_refresh(format!("replica-refresh-{n}"))
            .expires_in(Duration::from_secs(3600), self.now())
            .with_generation(generation);
        let _ = futures::executor::block_on(crate::save_locked(&store.inner, &token));
        self.shared().undecodable = false;
        self.known.max_generation = generation;
        self.known.generations.insert(access.clone(), generation);
        let issued = Issued {
            mono: self.mono,
            wall_epoch: self.shared().wall_epoch,
            lifetime: Some(3600),
        };
        self.known.issued.insert(access.clone(), issued);
        let faults = self.shared().faults_fired;
        self.known.replica_logins.push((access, self.mono, faults));
        self.summary.replica_logins += 1;
    }

    /// Whether the current token is the last login (or the initial token) and neither
    /// it nor a refresh of it is in the store yet: nothing pushed may replace it (C17).
    /// Logins through [`Op::Login`] are saved at once (the memory store's lock is
    /// free); the initial token waits for the first flight, and a store fault can keep
    /// it unsaved. (Once a refresh of it is saved, the store's session is its
    /// successor, and a newer push is a refresh of that.)
    fn login_unsaved(&self) -> bool {
        let Some(current) = self.flight.current() else {
            return false;
        };
        Some(current.access().expose()) == self.last_login().as_deref()
            && self.login_maybe_unsaved()
    }

    /// The access secret of the last login, or of the initial token if none.
    fn last_login(&self) -> Option<String> {
        match self.logins() {
            0 if self.setup.initial == Initial::NoToken => None,
            0 => Some("initial".to_owned()),
            n => Some(format!("login-{n}")),
        }
    }

    /// Whether the last login (or the initial token) may still be unsaved: neither it
    /// nor a refresh of it has been saved since it was installed. A push may then be
    /// ignored (the session here is newer than anything stored) even when the current
    /// token is a refresh of the login that failed to save.
    fn login_maybe_unsaved(&self) -> bool {
        let Some(login) = self.last_login() else {
            return false;
        };
        let shared = self.shared();
        !shared.saves[self.known.login_saves_from.min(shared.saves.len())..]
            .iter()
            .any(|(access, ..)| *access == login || call_of_access(access).is_some())
    }

    /// [`Op::Push`]: the store pushes a token to the coordinator; checks at once what
    /// the coordinator did with it (the steps' checks then look at the rest).
    fn store_push(&mut self, push: Push) -> Result<(), Violation> {
        let Some(store) = self.store.clone() else {
            return Ok(());
        };
        let before = self.flight.current();
        let current = before.as_ref().map_or(0, |t| t.generation());
        let n = self.summary.pushes + 1;
        let now = self.now();
        let during_flight = self.flight_running();
        let unsaved = self.login_unsaved();
        let maybe_unsaved = self.login_maybe_unsaved();
        // Above everything the coordinator can have numbered, adopted or seen rejected.
        let stored = futures::executor::block_on(store.inner.load())
            .ok()
            .flatten()
            .map(|t| t.generation())
            .filter(|&g| g <= MAX_GENERATION)
            .unwrap_or(0);
        let saved = self.shared().max_numbered;
        let top = self
            .known
            .max_generation
            .max(current)
            .max(self.known.rejected)
            .max(stored)
            .max(saved);
        let access = format!("pushed-{n}");
        let fresh = |generation: u64| {
            Token::new(access.clone())
                .with_refresh(format!("pushed-refresh-{n}"))
                .expires_in(Duration::from_secs(3600), now)
                .with_generation(generation)
        };
        let (token, lifetime) = match push {
            Push::Newer => (fresh(top.saturating_add(1)), 3600),
            Push::Equal if current > 0 => (fresh(current), 3600),
            Push::Older if current > 1 => (fresh(current - 1), 3600),
            Push::Numbered if self.shared().max_numbered > current => {
                (fresh(self.shared().max_numbered), 3600)
            }
            Push::Equal | Push::Older | Push::Numbered => return Ok(()),
            Push::AboveMax => (fresh(MAX_GENERATION + 1), 3600),
            Push::Expired => (
                compat::obtained_at(
                    Token::new(access.clone())
                        .with_refresh(format!("pushed-refresh-{n}"))
                        .expires_at(now - Duration::from_secs(3600)),
                    now - Duration::from_secs(7200),
                )
                .with_generation(top.saturating_add(1)),
                -3600,
            ),
            Push::Echo => match self.shared().echoes.pop_front() {
                Some(token) => (token, 0),
                None => return Ok(()),
            },
        };
        let generation = token.generation();
        if push != Push::Echo {
            let issued = Issued {
                mono: self.mono,
                wall_epoch: self.shared().wall_epoch,
                lifetime: Some(lifetime),
            };
            self.known.issued.insert(access.clone(), issued);
            self.known.generations.insert(access.clone(), generation);
        }
        if push == Push::Newer && !during_flight {
            // Another replica saved it under the store's lock (free: no flight here).
            let _ = futures::executor::block_on(crate::save_locked(&store.inner, &token));
            self.shared().undecodable = false;
            self.known.max_generation = generation;
        }
        self.summary.pushes += 1;
        if during_flight {
            self.summary.pushes_during_flights += 1;
        }
        if push == Push::Newer && unsaved {
            self.summary.pushes_over_unsaved_logins += 1;
        }
        if let Err(panic) = std::panic::catch_unwind(AssertUnwindSafe(|| store.push(&token))) {
            return Err(self.violation(
                "C18",
                format!("a pushed token panicked: {}", panic_message(&*panic)),
            ));
        }
        let after = self.flight.current();
        let changed = match (&before, &after) {
            (Some(a), Some(b)) => !Arc::ptr_eq(a, b),
            (None, None) => false,
            _ => true,
        };
        let adopted = changed
            && after
                .as_ref()
                .is_some_and(|t| t.access().expose() == token.access().expose());
        if adopted {
            self.summary.pushes_adopted += 1;
            if during_flight {
                self.known.pushed_mid_flight.insert(generation);
            }
            // A pushed token ends the backoff, as a flight that adopted the same token
            // from the store would (documented on the coordinator's `adopt_pushed`).
            self.shared().last_failure = None;
        }
        let now_gen = after.as_ref().map_or(0, |t| t.generation());
        let broken = match push {
            _ if changed && !adopted => Some((
                "C9",
                format!(
                    "a push of generation {generation} changed the current token to another one (generation {now_gen})"
                ),
            )),
            Push::Equal if changed => Some((
                "C3",
                format!(
                    "a different token with the current generation {generation} replaced the current token"
                ),
            )),
            Push::Numbered if changed => Some((
                "C3",
                format!(
                    "a pushed token took generation {generation}, which this coordinator had \
                     already given a token of its own"
                ),
            )),
            Push::Older if changed => Some((
                "C9",
                format!(
                    "a push of generation {generation} took the current token back from generation {current}"
                ),
            )),
            Push::AboveMax if changed => Some((
                "C17",
                format!(
                    "a pushed token of generation {generation}, above the maximum, was adopted"
                ),
            )),
            Push::Expired if changed => Some((
                "C16",
                format!(
                    "an expired pushed token (generation {generation}) replaced generation {current}"
                ),
            )),
            Push::Echo if changed && generation <= current => Some((
                "C9",
                format!(
                    "the echo of an own save (generation {generation}) replaced generation {current}"
                ),
            )),
            Push::Newer if changed && unsaved => Some((
                "C17",
                format!(
                    "a pushed token (generation {generation}) replaced a login not saved yet (generation {current})"
                ),
            )),
            Push::Newer if !changed && !maybe_unsaved && self.surely_usable(&token) => Some((
                "C2",
                format!(
                    "a pushed usable token newer than everything (generation {generation}) \
                         was not adopted (current: generation {current}): every replica would \
                         refresh on its own"
                ),
            )),
            Push::Newer if adopted && self.flight.is_auth_lost() => Some((
                "C17",
                "a pushed token was adopted but re-authentication is still required".to_owned(),
            )),
            _ => None,
        };
        match broken {
            Some((contract, message)) => Err(self.violation(contract, message)),
            None => Ok(()),
        }
    }

    fn settle(&mut self) -> Result<(), Violation> {
        for _ in 0..SETTLE_LIMIT {
            let Some(index) =
                (0..self.tasks.len()).find(|&i| self.tasks[i].live() && self.tasks[i].woken())
            else {
                return Ok(());
            };
            self.poll(index)?;
            self.adopt_spawned();
        }
        Err(self.violation(
            "C6",
            format!("still waking tasks after {SETTLE_LIMIT} polls (livelock)"),
        ))
    }

    fn source_calls(&self) -> usize {
        self.shared().calls.len()
    }

    /// Task `caller`'s requests: (index, generation carried, accepted).
    fn wires_of(&self, caller: usize) -> Vec<(usize, Option<u64>, Option<bool>)> {
        self.shared()
            .wire
            .iter()
            .enumerate()
            .filter(|(_, w)| w.caller == caller)
            .map(|(i, w)| {
                let generation = w.generation.or_else(|| {
                    let access = w.access.as_deref()?;
                    self.known.generations.get(access).copied()
                });
                (i, generation, w.answer)
            })
            .collect()
    }

    fn poll(&mut self, index: usize) -> Result<(), Violation> {
        let usable_before = self.usable_current();
        let current_before = self.flight.current().map(|t| t.generation());
        let calls_before = self.source_calls();
        let wires_before = self.wires_of(index);
        let logins = self.logins();
        // Refresh ahead without a spawner: the one caller that starts it drives it.
        let drives_ahead = !self.setup.spawner
            && self.setup.refresh_ahead
            && usable_before
                .as_ref()
                .is_some_and(|t| t.is_expired(self.now(), REFRESH_AHEAD));
        let task = &mut self.tasks[index];
        let Some(future) = task.future.as_mut() else {
            return Ok(());
        };
        task.flag.0.store(false, Ordering::SeqCst);
        let first_poll = task.polls == 0;
        if first_poll {
            task.wall_epoch_at_first_poll = lock(&self.shared).wall_epoch;
            task.usable_at_first_poll = usable_before.is_some();
            task.current_at_first_poll = current_before;
            task.logins_at_first_poll = logins;
        }
        task.polls += 1;
        task.phase_polls += 1;
        self.summary.polls += 1;
        let mut cx = Context::from_waker(&task.waker);
        let polled = std::panic::catch_unwind(AssertUnwindSafe(|| future.as_mut().poll(&mut cx)));
        let kind = task.kind;
        let polled = match polled {
            Ok(polled) => polled,
            Err(panic) => {
                task.done = true;
                task.future = None;
                return Err(self.violation(
                    "C18",
                    format!(
                        "task {index} ({kind:?}) panicked: {}",
                        panic_message(&*panic)
                    ),
                ));
            }
        };
        if polled.is_ready() {
            task.done = true;
            task.future = None;
        }
        self.observe_current();
        self.track_failures();
        self.check_undecodable()?;
        let new_calls = self.source_calls() > calls_before;
        let wires_after = self.wires_of(index);
        if let Some(&(w, None, _)) = wires_after.last() {
            return Err(self.violation(
                "C6",
                format!("request {w} carried a token that was never saved"),
            ));
        }
        if let [(first, ..), (second, ..)] = wires_after.as_slice() {
            if wires_before.len() == 1 {
                let shared = self.shared();
                let same = shared.wire[*first].access == shared.wire[*second].access;
                drop(shared);
                if same {
                    return Err(self.violation(
                        "C4",
                        format!("task {index} resent its request with the same token"),
                    ));
                }
            }
        }
        if wires_after.len() > wires_before.len() {
            // A new request went out: the waiting phase before it has ended.
            self.end_phase(index, wires_after.last().and_then(|w| w.1), None)?;
            self.tasks[index].waited_on.push(None);
            self.tasks[index].phase_polls = 0;
        }
        // C16: a caller that found a usable token does not wait.
        if let (true, Some(usable), false, true) = (
            first_poll,
            &usable_before,
            drives_ahead,
            polled.is_pending(),
        ) {
            let waits = match kind {
                Kind::Token => true,
                Kind::Send { .. } => wires_after.len() == wires_before.len(),
                _ => false,
            };
            if waits {
                return Err(self.violation(
                    "C16",
                    format!(
                        "task {index} ({kind:?}) waits although generation {} is usable",
                        usable.generation()
                    ),
                ));
            }
        }

        // C3: a rejection of an older generation while a newer usable token exists.
        let stale = |g: u64| usable_before.as_ref().filter(|t| t.generation() > g);
        // A rejection of a generation never seen handed out (a generator's guess) may
        // name a login's number before it was renumbered above a stored session: the
        // coordinator may then treat the current token as rejected.
        let unseen =
            matches!(kind, Kind::Reject(g) if first_poll && !self.known.history.contains(&g));
        if unseen {
            self.known.rejected = self.known.rejected.max(self.current_generation());
            self.known.unseen_rejections = true;
        }
        if let (Kind::Reject(g), true, false) = (kind, first_poll, unseen) {
            if let Some(current) = stale(g) {
                if new_calls {
                    return Err(self.violation(
                        "C3",
                        format!("a stale rejection of generation {g} started a source call"),
                    ));
                }
                match &polled {
                    Poll::Ready(Finished::Token(Ok(t))) if Arc::ptr_eq(t, current) => {}
                    _ => {
                        return Err(self.violation(
                            "C3",
                            format!(
                                "a stale rejection of generation {g} was not answered at once \
                                 with the current token (generation {})",
                                current.generation()
                            ),
                        ));
                    }
                }
            }
        }
        if let Kind::Send { replayable } = kind {
            let task = &mut self.tasks[index];
            if let [(_, Some(g), Some(false))] = wires_before.as_slice() {
                if !task.rejection_seen {
                    task.rejection_seen = true;
                    if let Some(current) = stale(*g) {
                        if new_calls {
                            return Err(self.violation(
                                "C3",
                                format!(
                                    "a 401 for generation {g} started a source call although \
                                     generation {} was usable",
                                    current.generation()
                                ),
                            ));
                        }
                        let resent_with = wires_after.get(1).and_then(|w| w.1);
                        if replayable && resent_with != Some(current.generation()) {
                            return Err(self.violation(
                                "C3",
                                format!(
                                    "a stale 401 for generation {g} was not resent at once with \
                                     the current generation {} (resent with {resent_with:?})",
                                    current.generation()
                                ),
                            ));
                        }
                    }
                }
            }
        }
        if let Poll::Ready(finished) = polled {
            if self.trace {
                eprintln!("  task {index} finished: {finished:?}");
            }
            self.finished(index, finished, &usable_before, &wires_after)?;
        }
        Ok(())
    }

    /// Issue 26, item 1: an undecodable record counts as no token under the lock, so a
    /// flight that read it there goes on to its source (whose token's save replaces
    /// it); a flight that failed after that read without a source call or a store
    /// fault was stopped by the record.
    fn check_undecodable(&mut self) -> Result<(), Violation> {
        let mut shared = self.shared();
        let Some((calls, faults, failures)) = shared.undecodable_locked_read else {
            return Ok(());
        };
        let failed = shared
            .flight
            .as_ref()
            .is_some_and(|f| f.stats().failures > failures);
        if !failed {
            return Ok(());
        }
        shared.undecodable_locked_read = None;
        let stopped = shared.calls.len() == calls && shared.faults_fired == faults;
        drop(shared);
        if stopped {
            return Err(self.violation(
                "C13",
                "a flight failed after its load under the lock found an undecodable record, \
                 without calling its source: the record must count as no token (the save \
                 then replaces it)",
            ));
        }
        Ok(())
    }

    /// Notices a failed flight (`stats().failures` grew) that must be followed by a
    /// backoff: transient, not auth-lost, and not of a flight a login superseded.
    fn track_failures(&mut self) {
        let failures = self.flight.stats().failures;
        if failures == self.known.failures {
            return;
        }
        self.known.failures = failures;
        if self.flight.is_auth_lost() {
            if let Some(t) = self.flight.current() {
                if self.really_valid(&t) && !self.surely_usable(&t) {
                    self.summary.auth_lost_inside_leeway += 1;
                }
            }
        }
        let usable = self.usable_current().map(|t| t.generation());
        let flight = self.shared().flights_started();
        self.known.usable_at_failure.insert(flight, usable);
        let (flight, retry_after, logins) = {
            let shared = self.shared();
            let flight = shared.flights_started();
            let retry_after = match shared.calls.iter().rev().find(|c| c.flight == flight) {
                Some(SourceCall {
                    state: CallState::Returned(Outcome::Transient(after)),
                    ..
                }) => after.map(RetryAfter::duration),
                _ => None,
            };
            (flight, retry_after, shared.login_flights.len())
        };
        // While the current token may still work, the backoff ends before half its
        // remaining life (without a Retry-After): the next try comes before it expires.
        let now = self.now();
        let token_cap = self
            .flight
            .current()
            .filter(|_| retry_after.is_none())
            .and_then(|t| t.expiry())
            .map(|at| at.duration_since(now).unwrap_or_default() / 2);
        let failure = (!self.flight.is_auth_lost() && !self.superseded_by_login(flight)).then_some(
            FailureSeen {
                mono: self.mono,
                retry_after,
                token_cap,
                logins,
            },
        );
        self.shared().last_failure = failure;
    }

    /// The generation a finished task wanted replaced: the one it reported rejected, the
    /// one its first request carried if that was rejected, or the current one when it
    /// started.
    fn replaced_by(&self, index: usize, wires: &[(usize, Option<u64>, Option<bool>)]) -> u64 {
        let task = &self.tasks[index];
        match (task.kind, wires.first()) {
            (Kind::Reject(g), _) => g,
            (Kind::Send { .. }, Some((_, Some(g), Some(false)))) => *g,
            _ => task.current_at_first_poll.unwrap_or(0),
        }
    }

    /// Ends the current waiting phase of task `index`, which produced a token of
    /// `generation` or `error`: it must be the outcome of the flight it waited on, the
    /// same for every waiter of that flight (C5), or after a failure a usable newer token.
    fn end_phase(
        &mut self,
        index: usize,
        generation: Option<u64>,
        error: Option<&Error>,
    ) -> Result<(), Violation> {
        let task = &self.tasks[index];
        let Some(Some(call)) = task.waited_on.last().copied() else {
            return Ok(());
        };
        // C8/C9: a caller that drove a refresh ahead keeps its valid token if it fails.
        let ahead_fallback = self.setup.refresh_ahead
            && task.waited_on.len() == 1
            && error.is_none()
            && generation.is_some()
            && generation == task.current_at_first_poll;
        let forced = task.kind == Kind::Force;
        let (flight, states): (u64, Vec<(usize, CallState)>) = {
            let shared = self.shared();
            let mut flight = shared.calls[call].flight;
            // A waiter whose flight lost to a login joins the next flight: its outcome
            // is that flight's.
            let named = error
                .and_then(|e| call_of_error(e.refresh_error().message()))
                .and_then(|n| shared.calls.get(n))
                .map(|c| c.flight);
            let lost_to_login = shared.login_flights.iter().any(|&f| f >= flight);
            if lost_to_login && matches!(error, Some(Error::BackingOff { .. })) {
                // It joined again after the next flight had failed: failing fast is
                // that flight's backoff, not an outcome of its own flight.
                return Ok(());
            }
            if lost_to_login && error.is_some() {
                match named {
                    Some(later) if later > flight => flight = later,
                    Some(same) if same == flight => {}
                    // Budget, store or panic of a flight it joined later: unattributable.
                    _ => return Ok(()),
                }
            }
            let states = shared
                .calls
                .iter()
                .enumerate()
                // A waiter whose flight lost to a login may get the token of a later
                // flight it joined (which a push may have kept from becoming current).
                .filter(|(_, c)| c.flight == flight || (lost_to_login && c.flight > flight))
                .map(|(i, c)| (i, c.state))
                .collect();
            (flight, states)
        };
        let own_generations: Vec<u64> = states
            .iter()
            .filter(|(_, s)| matches!(s, CallState::Returned(Outcome::Ok(_))))
            .filter_map(|(i, _)| self.known.generations.get(&access_of_call(*i)).copied())
            .collect();
        let returned = |n: Option<usize>, want: fn(Outcome) -> bool| {
            states
                .iter()
                .any(|(i, s)| Some(*i) == n && matches!(s, CallState::Returned(o) if want(*o)))
        };
        let ok = match (generation, error) {
            (Some(g), None) => {
                let own = own_generations.contains(&g);
                // After a failure (or a login that won), a newer token it fell back to.
                // A forced caller that joined a flight for another reason gets that
                // flight's outcome, which may be a token already there.
                let flight_forced = self
                    .shared()
                    .calls
                    .iter()
                    .find(|c| c.flight == flight)
                    .is_some_and(|c| c.reason == RefreshReason::Forced);
                let fallback = (!forced || !flight_forced || self.superseded_by_login(flight))
                    && self.known.generations.iter().any(|(access, &known)| {
                        known == g && self.known.became_current.contains(access)
                    });
                if own {
                    self.known
                        .flight_outcomes
                        .entry(flight)
                        .or_default()
                        .own_token = true;
                }
                own || ahead_fallback || fallback
            }
            (_, Some(error)) => {
                let e = error.refresh_error();
                let n = call_of_error(e.message());
                let matches_flight = match error {
                    Error::Refresh(e) => match kind_of(e) {
                        RefreshErrorKind::Transient => {
                            returned(n, |o| matches!(o, Outcome::Transient(_)))
                        }
                        // Budget, attempt timeout, store failure, contained panic.
                        _ => true,
                    },
                    Error::ReauthenticationRequired { .. } => {
                        returned(n, |o| o == Outcome::Permanent) || self.superseded_by_login(flight)
                    }
                    // Its flight lost to a login: it joined the next one, which may fail
                    // fast.
                    Error::BackingOff { .. } => self.superseded_by_login(flight),
                    _ => false,
                };
                let seen = self.known.flight_outcomes.entry(flight).or_default();
                let text = error.to_string();
                let same = seen.error.get_or_insert_with(|| text.clone()) == &text;
                let seen = seen.clone();
                if !same || (seen.own_token && !forced) {
                    return Err(self.violation(
                        "C5",
                        format!(
                            "task {index} got {error}, another waiter of the same flight got \
                             {:?}{}",
                            seen.error,
                            if seen.own_token { " / its token" } else { "" }
                        ),
                    ));
                }
                matches_flight
            }
            (None, None) => false,
        };
        if ok {
            Ok(())
        } else {
            let state = states.iter().find(|(i, _)| *i == call).map(|(_, s)| *s);
            Err(self.violation(
                "C5",
                format!(
                    "task {index} waited on source call {} ({state:?}) but got generation \
                     {generation:?} / error {error:?} (the flight's tokens: generations \
                     {own_generations:?})",
                    call + 1
                ),
            ))
        }
    }

    fn finished(
        &mut self,
        index: usize,
        finished: Finished,
        usable_before: &Option<Arc<Token>>,
        wires: &[(usize, Option<u64>, Option<bool>)],
    ) -> Result<(), Violation> {
        let kind = self.tasks[index].kind;
        let usable_at_first_poll = self.tasks[index].usable_at_first_poll;
        let error = match &finished {
            Finished::Token(Err(error)) => Some(error.clone()),
            Finished::Response(Err(AuthError::Token(error))) => Some(error.clone()),
            _ => None,
        };
        if let Some(error) = &error {
            self.check_failed_caller(index, error, wires)?;
        }
        match finished {
            Finished::Spawned => Ok(()),
            Finished::Token(result) => {
                match &result {
                    Ok(token) => {
                        self.end_phase(index, Some(token.generation()), None)?;
                        let access = token.access().expose();
                        // Forbidden to a caller that started after a login (one that
                        // waited before may get what its flight adopted then).
                        let forbidden = self.setup.stale.is_some_and(|stale| {
                            self.setup.initial != Initial::NoToken
                                || self.tasks[index].logins_at_first_poll > 0
                                || stale.generation() > MAX_GENERATION
                        });
                        if access == STALE_ACCESS && forbidden {
                            return Err(self.violation(
                                "C17",
                                format!("task {index} got the stale stored session"),
                            ));
                        }
                        let known = self.known.generations.get(access);
                        if known != Some(&token.generation()) {
                            return Err(self.violation(
                                "C6",
                                format!(
                                    "task {index} got generation {} that was never saved",
                                    token.generation()
                                ),
                            ));
                        }
                    }
                    Err(error) => {
                        self.summary.errors += 1;
                        self.end_phase(index, None, Some(error))?;
                        if usable_at_first_poll && kind == Kind::Token {
                            return Err(self.violation(
                                "C9",
                                format!(
                                    "task {index} found a usable token but got an error: {error}"
                                ),
                            ));
                        }
                    }
                }
                Ok(())
            }
            Finished::Response(result) => {
                let Kind::Send { replayable } = kind else {
                    return Ok(());
                };
                self.check_send(index, replayable, result, usable_before, wires)
            }
        }
    }

    /// C9, C16, C17 for a caller that ended with `error`.
    fn check_failed_caller(
        &self,
        index: usize,
        error: &Error,
        wires: &[(usize, Option<u64>, Option<bool>)],
    ) -> Result<(), Violation> {
        let task = &self.tasks[index];
        // C16 (issue 26, item 9): a usable token is served until it really expires,
        // whatever the failure (transient, permanent, budget, store): a caller that
        // found the current token, not rejected and not expired (its leeway aside),
        // gets it, not an error, while it stays current and valid (no wall step since
        // the caller began: then it was valid all along). A forced refresh may fail.
        if task.kind != Kind::Force && task.wall_epoch_at_first_poll == self.shared().wall_epoch {
            if let Some(valid) = self.flight.current().filter(|t| {
                Some(t.generation()) == task.current_at_first_poll && self.really_valid(t)
            }) {
                return Err(self.violation(
                    "C16",
                    format!(
                        "task {index} ({:?}) failed with {error} although generation {} \
                         it found current has not expired (it is {}inside its leeway)",
                        task.kind,
                        valid.generation(),
                        if self.surely_usable(&valid) {
                            "not "
                        } else {
                            ""
                        },
                    ),
                ));
            }
        }
        // C16: no failure while a usable token newer than the one to replace exists.
        if task.kind != Kind::Force {
            let replaced = self.replaced_by(index, wires);
            // A caller that waited got its flight's outcome, settled when the flight
            // failed: a token that became usable later (a login, a wall-clock step back)
            // came too late for it. A caller that failed fast decided now.
            let waited = task.phase_polls > 1;
            // The failure it got is named after a source call, which tells the flight;
            // a budget, store or panic failure is not (then only fail-fast is judged).
            let failed_flight = {
                let shared = self.shared();
                call_of_error(error.refresh_error().message())
                    .and_then(|n| shared.calls.get(n))
                    .map(|c| c.flight)
            };
            let usable_then = failed_flight
                .and_then(|f| self.known.usable_at_failure.get(&f).copied())
                .flatten();
            let settled = |t: &Token| !waited || usable_then == Some(t.generation());
            if let Some(usable) = self
                .usable_current()
                .filter(|t| t.generation() > replaced && settled(t))
            {
                return Err(self.violation(
                    "C16",
                    format!(
                        "task {index} ({:?}) failed with {error} although generation {} \
                         (newer than {replaced}) is usable",
                        task.kind,
                        usable.generation()
                    ),
                ));
            }
        }
        // C17: "re-authentication required" notices a login another replica saved to
        // the shared store (a reload at most once per minimum interval).
        if let (Error::ReauthenticationRequired { .. }, Some((access, at, faults))) =
            (error, self.known.replica_logins.last())
        {
            // (Not if another program wrote an undecodable record over it since.)
            let undecodable = self.shared().undecodable;
            let stored = self
                .store
                .as_ref()
                .filter(|_| !undecodable)
                .and_then(|store| {
                    futures::executor::block_on(store.inner.load())
                        .ok()
                        .flatten()
                });
            let shared = self.shared();
            // A caller that waited got its flight's settled outcome; one that failed
            // fast decided now.
            let undisturbed = shared.faults_fired == *faults
                && shared.armed.is_none()
                && self.tasks[index].phase_polls <= 1;
            drop(shared);
            // Newer than the token whose loss it is (that one may be the replica's).
            let lost = self.current_generation();
            if let Some(stored) = stored.filter(|t| {
                t.access().expose() == access
                    && t.generation() > lost
                    && self.surely_usable(t)
                    && undisturbed
            }) {
                // Usable for two reload intervals: since the login, since the last
                // wall step (a reload just before it may have found the login expired,
                // and reloads are throttled to one per interval), and since
                // "re-authentication required" began (the throttle counts from there:
                // a flight that found the login expired before a wall step back fails
                // after it, and the next reload comes an interval later). Began in this
                // step if the last step did not end in it.
                let lost_since = if self.known.auth_lost {
                    self.known.auth_lost_since
                } else {
                    self.mono
                };
                let since = (*at).max(self.last_wall_step).max(lost_since);
                if self.mono.saturating_sub(since) >= 2 * MIN_REFRESH_INTERVAL {
                    return Err(self.violation(
                        "C17",
                        format!(
                            "task {index} got {error} although another replica's login (generation {}) has been in the shared store for {:?}",
                            stored.generation(),
                            self.mono.saturating_sub(*at)
                        ),
                    ));
                }
            }
        }
        if let Error::BackingOff { last, remaining } = error {
            // C9: the backoff lasts at most its cap (or the capped Retry-After) of
            // monotonic time: a wall-clock step back does not stretch it.
            let cap = BACKOFF_MAX.max(MAX_RETRY_AFTER);
            let last_failure = self.shared().last_failure;
            let limit = match last_failure {
                Some(f) => (BACKOFF_MAX
                    .max(f.retry_after.unwrap_or_default().min(MAX_RETRY_AFTER)))
                .saturating_sub(self.mono.saturating_sub(f.mono)),
                None => cap,
            };
            if *remaining > limit.max(Duration::ZERO) + Duration::from_millis(1)
                && *remaining > Duration::ZERO
            {
                return Err(self.violation(
                    "C9",
                    format!(
                        "task {index} was told to back off for {remaining:?}, more than the \
                         {limit:?} left of the backoff"
                    ),
                ));
            }
            // C17: a flight that started before a login causes no backoff after it.
            if let Some(call) = call_of_error(last.message()) {
                let flight = self.shared().calls.get(call).map(|c| c.flight);
                let logins = self.shared().login_flights.clone();
                if let Some(flight) = flight {
                    if logins[..task.logins_at_first_poll.min(logins.len())]
                        .iter()
                        .any(|&f| f >= flight)
                    {
                        return Err(self.violation(
                            "C17",
                            format!(
                                "task {index} started after a login but backs off after a \
                                 failure of a flight that started before it: {error}"
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
    /// C4 for a finished send.
    fn check_send(
        &mut self,
        index: usize,
        replayable: bool,
        result: Result<ModelResponse, AuthError<Infallible>>,
        usable_before: &Option<Arc<Token>>,
        wires: &[(usize, Option<u64>, Option<bool>)],
    ) -> Result<(), Violation> {
        let first = wires.first().copied();
        match result {
            Ok(response) => {
                // A flight numbers its token when it arrives; a token pushed while its
                // save is under way may be newer, and a caller that saw that one
                // rejected and joined the flight is resent with the flight's token:
                // another token, though an older generation.
                let rejected_pushed_mid_flight = first
                    .and_then(|f| f.1)
                    .is_some_and(|g0| self.known.pushed_mid_flight.contains(&g0));
                let expected = match (first, wires.get(1)) {
                    (Some((w, _, Some(true))), None) => Some(w),
                    (Some((w, _, Some(false))), None) if !replayable => Some(w),
                    (Some((_, Some(g0), Some(false))), Some(&(w, Some(g1), _)))
                        if replayable
                            && (g1 > g0 || (rejected_pushed_mid_flight && g1 != g0))
                            && wires.len() == 2 =>
                    {
                        Some(w)
                    }
                    _ => None,
                };
                if expected != Some(response.wire) {
                    return Err(self.violation(
                        "C4",
                        format!(
                            "task {index} (replayable: {replayable}) returned the response to \
                             request {} after requests {wires:?} (generation, accepted)",
                            response.wire
                        ),
                    ));
                }
                Ok(())
            }
            Err(AuthError::Token(error)) => {
                self.summary.errors += 1;
                self.end_phase(index, None, Some(&error))?;
                match wires {
                    [] => {
                        if self.tasks[index].usable_at_first_poll {
                            return Err(self.violation(
                                "C9",
                                format!("task {index} found a usable token but got {error}"),
                            ));
                        }
                        Ok(())
                    }
                    [(_, Some(g), Some(false))] if replayable => {
                        // Fail-fast (backoff, auth lost) is fine only if no newer usable
                        // token existed; a refresh's error was checked by `end_phase`.
                        // A caller that waited got its flight's outcome (C16 checks it).
                        if self.tasks[index].phase_polls <= 1 {
                            if let Some(t) = usable_before.as_ref().filter(|t| t.generation() > *g)
                            {
                                return Err(self.violation(
                                    "C4",
                                    format!(
                                        "task {index} got {error} after a 401 for generation \
                                         {g} although generation {} was usable",
                                        t.generation()
                                    ),
                                ));
                            }
                        }
                        Ok(())
                    }
                    _ => Err(self.violation(
                        "C4",
                        format!("task {index} got {error} after requests {wires:?}"),
                    )),
                }
            }
            Err(other) => {
                Err(self.violation("C4", format!("task {index} failed unexpectedly: {other}")))
            }
        }
    }

    fn trace(&self, op: &Op) {
        let shared = self.shared();
        let calls: Vec<String> = shared
            .calls
            .iter()
            .map(|c| {
                format!(
                    "f{}:{:?}<-{:?}:{:?}",
                    c.flight,
                    c.reason,
                    c.previous.as_ref().map(|t| t.generation()),
                    c.state
                )
            })
            .collect();
        let wires: Vec<String> = shared
            .wire
            .iter()
            .enumerate()
            .map(|(i, w)| {
                format!(
                    "{i}:t{}:{}:{:?}{}",
                    w.caller,
                    w.access.as_deref().unwrap_or("-"),
                    w.answer,
                    if w.dropped { ":dropped" } else { "" }
                )
            })
            .collect();
        let (sleeps, logins, armed) = (
            shared.live_sleeps,
            shared.login_flights.clone(),
            shared.armed,
        );
        drop(shared);
        let tasks: Vec<String> = self
            .tasks
            .iter()
            .enumerate()
            .filter(|(_, t)| t.live())
            .map(|(i, t)| {
                let state = if t.cancelled {
                    "x"
                } else if t.done {
                    "done"
                } else if t.woken() {
                    "woken"
                } else {
                    "wait"
                };
                format!("{i}:{:?}:{state}", t.kind)
            })
            .collect();
        eprintln!(
            "step {} {op:?} mono {:?}\n  current {:?} rejected(model) {} auth-lost {} sleeps \
             {sleeps} logins(at flight) {logins:?} armed {armed:?}\n  calls {calls:?}\n  \
             wires {wires:?}\n  live tasks {tasks:?}",
            self.step,
            self.mono,
            self.flight
                .current()
                .map(|t| (t.access().expose().to_owned(), t.generation())),
            self.known.rejected,
            self.flight.is_auth_lost(),
        );
    }

    // ----- checks

    fn check_step(&mut self) -> Result<(), Violation> {
        self.observe_current();
        // C1
        if let Some(message) = self.shared().overlapping_call.clone() {
            return Err(self.violation("C1", message));
        }
        self.check_calls()?;
        self.check_logins()?;
        self.check_current()?;
        self.check_quiet_store()?;
        // C5/C6: a waiting caller that nothing will wake is a hang.
        let (live_call, live_sleeps) = {
            let shared = self.shared();
            (
                shared.calls.iter().position(|c| c.state.live()),
                shared.live_sleeps,
            )
        };
        let on_wire: BTreeSet<usize> = self
            .shared()
            .wire
            .iter()
            .filter(|w| w.pending())
            .map(|w| w.caller)
            .collect();
        for index in 0..self.tasks.len() {
            let task = &self.tasks[index];
            if !task.live() || task.woken() || task.polls == 0 || on_wire.contains(&index) {
                continue;
            }
            match live_call {
                None if live_sleeps == 0 => {
                    return Err(self.violation(
                        "C5",
                        format!(
                            "task {index} ({:?}) waits, but no source call or timer is live: \
                             nothing will wake it",
                            task.kind
                        ),
                    ));
                }
                None => {}
                Some(call) => {
                    // The latest flight it waits on: a waiter whose flight lost to a
                    // login waits for a flight started after it.
                    let task = &mut self.tasks[index];
                    if let Some(slot) = task.waited_on.last_mut() {
                        *slot = Some(call);
                    }
                }
            }
        }
        Ok(())
    }

    /// Issue 26, items 2 and 3, once every caller and flight has ended: the store's
    /// refresh lock is free for the next holder (a replica; a flight whose budget ran
    /// out during its unlock dropped its guard, and dropping a guard releases the
    /// lock), and a generation above [`MAX_GENERATION`] that a save was attempted over
    /// is gone (else every other replica ignores the record and refreshes on its own:
    /// C1 across processes).
    fn check_quiet_store(&mut self) -> Result<(), Violation> {
        if self.tasks.iter().any(Task::live) || !lock(&self.spawner.queue).is_empty() {
            return Ok(());
        }
        let Some(store) = self.store.clone() else {
            return Ok(());
        };
        let held = store.held.load(Ordering::SeqCst);
        if held > 0 {
            return Err(self.violation(
                "C10",
                format!(
                    "every flight has ended but the store's refresh lock is still held \
                     ({held} guard(s)): another replica would wait for nobody until the \
                     lease lapses"
                ),
            ));
        }
        let stored = store
            .inner
            .load()
            .now_or_never()
            .and_then(Result::ok)
            .flatten()
            .map(|t| t.generation());
        let shared = self.shared();
        let (undecodable, attempts) = (shared.undecodable, shared.saves_over_hostile);
        drop(shared);
        if let Some(g) = stored.filter(|&g| g > MAX_GENERATION && !undecodable && attempts > 0) {
            return Err(self.violation(
                "C1",
                format!(
                    "the store still holds generation {g}, above the maximum, after {attempts} \
                     save(s) over it: other replicas ignore the record and refresh on their own"
                ),
            ));
        }
        Ok(())
    }

    /// C2, C6, C9 (backoff holds), C15 and C17 for the source calls since the last step.
    fn check_calls(&mut self) -> Result<(), Violation> {
        struct Seen {
            index: usize,
            reason: RefreshReason,
            previous: Option<Arc<Token>>,
            at: SystemTime,
            state: CallState,
            flight: u64,
            first_of_flight: bool,
            logins_before: usize,
            mono: Duration,
            wall_epoch: u32,
            at_risk: bool,
            failure_before: Option<FailureSeen>,
            current: Option<Arc<Token>>,
            /// The generation the flight's first call replaced.
            flight_replaces: Option<u64>,
        }
        let calls: Vec<Seen> = {
            let mut shared = self.shared();
            let flights: Vec<u64> = shared.calls.iter().map(|c| c.flight).collect();
            let mut first_previous: HashMap<u64, Option<u64>> = HashMap::new();
            for call in &shared.calls {
                first_previous
                    .entry(call.flight)
                    .or_insert_with(|| call.previous.as_ref().map(|t| t.generation()));
            }
            shared
                .calls
                .iter_mut()
                .enumerate()
                .filter(|(_, c)| !c.checked)
                .map(|(i, c)| {
                    let done = matches!(c.state, CallState::Returned(_) | CallState::Dropped);
                    c.checked = done;
                    Seen {
                        index: i,
                        reason: c.reason,
                        previous: c.previous.clone(),
                        at: c.now,
                        state: c.state,
                        flight: c.flight,
                        first_of_flight: !flights[..i].contains(&c.flight),
                        logins_before: c.logins_before,
                        mono: c.mono,
                        wall_epoch: c.wall_epoch,
                        at_risk: c.at_risk,
                        failure_before: c.failure_before,
                        current: c.current.clone(),
                        flight_replaces: first_previous.get(&c.flight).copied().flatten(),
                    }
                })
                .collect()
        };
        for call in calls {
            let i = call.index;
            let reason = call.reason;
            let n = i + 1;
            if self.known.start_checked.insert(i) {
                // After a wall-clock step, a flight started for expiry may call the
                // source once the wall clock went back: expiry cannot be judged then.
                let wall_stepped = call.wall_epoch > 0
                    && matches!(reason, RefreshReason::Expired | RefreshReason::RefreshAhead);
                let unjudgeable = self.known.unseen_rejections && reason == RefreshReason::Rejected;
                if !wall_stepped && !unjudgeable {
                    self.check_call_start(
                        &call.previous,
                        n,
                        reason,
                        call.at,
                        call.first_of_flight,
                    )?;
                }
                // C2 (issue 20): a flight whose token to replace was superseded (by a
                // pushed token, most often while it paused between attempts) ends with
                // the newer usable token instead of calling the source.
                if reason != RefreshReason::Forced && !self.known.unseen_rejections {
                    if let Some(current) = call.current.as_ref().filter(|t| {
                        self.surely_usable(t)
                            && call.flight_replaces.is_none_or(|g| t.generation() > g)
                    }) {
                        return Err(self.violation(
                            "C2",
                            format!(
                                "source call {n} ({reason:?}, flight {}) started although \
                                 generation {} was current and usable, newer than the \
                                 generation {:?} the flight replaces",
                                call.flight,
                                current.generation(),
                                call.flight_replaces
                            ),
                        ));
                    }
                }
                let previous_access = call.previous.as_ref().map(|t| t.access().expose());
                // C17: the stale session's refresh token is never spent over a login.
                let forbidden = self.setup.stale.is_some_and(|stale| {
                    self.setup.initial != Initial::NoToken
                        || call.logins_before > 0
                        || stale.generation() > MAX_GENERATION
                });
                if forbidden && previous_access == Some(STALE_ACCESS) {
                    return Err(self.violation(
                        "C17",
                        format!(
                            "source call {n} spends the refresh token of the stale stored \
                             session"
                        ),
                    ));
                }
                if call.first_of_flight {
                    // C15: expiry-driven calls replace tokens old enough.
                    // A rejected token is replaced whatever the call's label says.
                    let previous = call
                        .previous
                        .as_ref()
                        .filter(|prev| prev.generation() > self.known.rejected);
                    if let (RefreshReason::Expired | RefreshReason::RefreshAhead, Some(prev)) =
                        (reason, previous)
                    {
                        if let Some(issued) = self.known.issued.get(prev.access().expose()) {
                            if issued.wall_epoch == call.wall_epoch {
                                let age = call.mono.saturating_sub(issued.mono);
                                let half = issued
                                    .lifetime
                                    .and_then(|l| u64::try_from(l).ok())
                                    .map_or(Duration::ZERO, |l| Duration::from_secs(l) / 2);
                                let required = MIN_REFRESH_INTERVAL.max(half);
                                if age < required {
                                    return Err(self.violation(
                                        "C15",
                                        format!(
                                            "source call {n} ({reason:?}) replaced generation \
                                             {} only {age:?} after it was issued (lifetime \
                                             {:?} s; at least {required:?} expected)",
                                            prev.generation(),
                                            issued.lifetime
                                        ),
                                    ));
                                }
                            }
                        }
                    }
                    // C9: a new flight waits out the backoff of the last failed one, on
                    // monotonic time, whatever its Retry-After and wall-clock steps.
                    let exempt = matches!(reason, RefreshReason::Forced | RefreshReason::Rejected);
                    if let (true, false, Some(f)) =
                        (self.setup.backoff, exempt, call.failure_before)
                    {
                        let required = BACKOFF_INITIAL
                            .max(f.retry_after.unwrap_or_default().min(MAX_RETRY_AFTER))
                            .min(f.token_cap.unwrap_or(Duration::MAX));
                        let elapsed = call.mono.saturating_sub(f.mono);
                        if f.logins == call.logins_before && elapsed < required {
                            return Err(self.violation(
                                "C9",
                                format!(
                                    "source call {n} ({reason:?}) started {elapsed:?} after a \
                                     failed flight (Retry-After {:?}): the backoff of at least \
                                     {required:?} did not hold",
                                    f.retry_after
                                ),
                            ));
                        }
                    }
                }
            }
            if let CallState::Returned(Outcome::Ok(_)) = call.state {
                let replaced = call.previous.as_ref().map_or(0, |t| t.generation());
                // Only a token that took over counts (one lost to a login or a store
                // fault replaced nothing).
                let took_over = self.known.became_current.contains(&access_of_call(i));
                if reason != RefreshReason::Forced
                    && took_over
                    && !self.known.replaced.insert(replaced)
                {
                    return Err(self.violation(
                        "C2",
                        format!("source call {n} is a second successful refresh of generation {replaced}"),
                    ));
                }
                let lost = !self.known.became_current.contains(&access_of_call(i));
                if lost && !call.at_risk && !self.superseded_by_login(call.flight) {
                    return Err(
                        self.violation("C6", format!("the token of source call {n} was lost"))
                    );
                }
            }
        }
        Ok(())
    }

    /// C2: a source call is needed: its token is missing, expired, rejected, forced or
    /// due for refresh-ahead.
    fn check_call_start(
        &self,
        previous: &Option<Arc<Token>>,
        n: usize,
        reason: RefreshReason,
        at: SystemTime,
        first_of_flight: bool,
    ) -> Result<(), Violation> {
        let justified = match previous {
            None => true,
            Some(prev) => {
                reason == RefreshReason::Forced
                    || prev.is_expired(at, LEEWAY)
                    || prev.generation() <= self.known.rejected
                    || (reason == RefreshReason::RefreshAhead
                        && self.setup.refresh_ahead
                        && prev.is_expired(at, REFRESH_AHEAD))
                    // Retries inside a flight: the first call was checked.
                    || !first_of_flight
            }
        };
        if justified {
            Ok(())
        } else {
            Err(self.violation(
                "C2",
                format!(
                    "source call {n} ({reason:?}) replaced generation {:?}, which was neither \
                     expired nor rejected",
                    previous.as_ref().map(|t| t.generation())
                ),
            ))
        }
    }

    /// C9 (the current token never goes back or away) and C17 (no flight that started
    /// before a login replaces it; no stale session over a login; sane generations).
    fn check_current(&mut self) -> Result<(), Violation> {
        let current = self.flight.current();
        if let Some(last) = &self.known.last_current {
            match &current {
                None => return Err(self.violation("C9", "the current token disappeared")),
                Some(now) if now.generation() < last.generation() => {
                    return Err(self.violation(
                        "C9",
                        format!(
                            "the current token went back from generation {} to {}",
                            last.generation(),
                            now.generation()
                        ),
                    ));
                }
                _ => {}
            }
        }
        if let Some(now) = &current {
            let access = now.access().expose();
            let changed = self
                .known
                .last_current
                .as_ref()
                .is_none_or(|last| last.access().expose() != access);
            if changed {
                if let Some(call) = call_of_access(access) {
                    let flight = self.shared().calls.get(call).map(|c| c.flight);
                    if flight.is_some_and(|f| self.superseded_by_login(f)) {
                        return Err(self.violation(
                            "C17",
                            format!(
                                "the token of source call {}, from a flight that started \
                                 before a login, replaced the login",
                                call + 1
                            ),
                        ));
                    }
                }
            }
            if access == STALE_ACCESS && self.stale_forbidden() {
                return Err(self.violation(
                    "C17",
                    "the stale stored session became current over a login or initial token",
                ));
            }
            if now.generation() > MAX_GENERATION {
                return Err(self.violation(
                    "C17",
                    format!(
                        "the current token has generation {}, above the maximum {MAX_GENERATION}",
                        now.generation()
                    ),
                ));
            }
            self.known.max_generation = self.known.max_generation.max(now.generation());
            self.known
                .current_pairs
                .insert((access.to_owned(), now.generation()));
        }
        self.known.last_current = current;
        Ok(())
    }

    /// C17: saves strictly increase the generation (never above the maximum) and never
    /// persist a flight that a login superseded; auth-lost and the hook come only from
    /// flights that started after the last login.
    fn check_logins(&mut self) -> Result<(), Violation> {
        let (saves, hooks, logins) = {
            let shared = self.shared();
            (
                shared.saves[self.known.saves_checked..].to_vec(),
                shared.hook_calls[self.known.hooks_checked..].to_vec(),
                shared.login_flights.clone(),
            )
        };
        self.known.saves_checked += saves.len();
        self.known.hooks_checked += hooks.len();
        self.summary.hook_calls += hooks.len();
        for (access, generation, logins_then) in saves {
            if let Some(call) = call_of_access(&access) {
                let flight = self.shared().calls.get(call).map(|c| c.flight);
                if flight.is_some_and(|flight| {
                    logins[..logins_then.min(logins.len())]
                        .iter()
                        .any(|&f| f >= flight)
                }) {
                    return Err(self.violation(
                        "C17",
                        format!(
                            "the token of source call {}, from a flight that started before a \
                             login, was saved over the login",
                            call + 1
                        ),
                    ));
                }
            }
            let pair = (access.clone(), generation);
            // Persisting a token that is (or was) current, unchanged, is no new generation.
            if self.known.saved_pairs.contains(&pair) || self.known.current_pairs.contains(&pair) {
                self.known.saved_pairs.insert(pair);
                continue;
            }
            if generation > MAX_GENERATION || generation <= self.known.max_generation {
                return Err(self.violation(
                    "C17",
                    format!(
                        "a token was saved with generation {generation}: not above every \
                         generation so far ({}) or above the maximum {MAX_GENERATION}",
                        self.known.max_generation
                    ),
                ));
            }
            self.known.max_generation = generation;
            self.known.saved_pairs.insert(pair);
        }
        let flight_of = |message: &str| {
            let call = call_of_error(message)?;
            self.shared().calls.get(call).map(|c| c.flight)
        };
        for (message, logins_then) in hooks {
            if let Some(flight) = flight_of(&message) {
                if logins[..logins_then.min(logins.len())]
                    .iter()
                    .any(|&f| f >= flight)
                {
                    return Err(self.violation(
                        "C17",
                        "the auth-lost hook fired for a flight that started before a login",
                    ));
                }
            }
        }
        let auth_lost = self.flight.is_auth_lost();
        if auth_lost && !self.known.auth_lost {
            let failing = self
                .shared()
                .calls
                .iter()
                .rev()
                .find(|c| c.state == CallState::Returned(Outcome::Permanent))
                .map(|c| c.flight);
            if failing.is_some_and(|f| self.superseded_by_login(f)) {
                return Err(self.violation(
                    "C17",
                    "re-authentication required after a login, from a flight that started \
                     before it",
                ));
            }
        }
        if auth_lost && !self.known.auth_lost {
            self.known.auth_lost_since = self.mono;
        }
        self.known.auth_lost = auth_lost;
        Ok(())
    }

    /// Answers every request on the wire and lets time pass until every task is done.
    fn drain(&mut self) -> Result<(), Violation> {
        for _ in 0..DRAIN_ROUNDS {
            self.settle()?;
            self.check_step()?;
            if self.tasks.iter().all(|t| !t.live()) {
                return Ok(());
            }
            let pending: Vec<usize> = {
                let shared = self.shared();
                (0..shared.wire.len())
                    .filter(|&i| shared.wire[i].pending())
                    .collect()
            };
            if pending.is_empty() {
                // Hanging source and store calls time out; retry pauses and backoffs end.
                self.advance(Step::PastTimeout.duration());
            } else {
                for index in pending {
                    self.respond(index, true);
                }
            }
            self.step += 1;
        }
        let stuck: Vec<(usize, Kind)> = (0..self.tasks.len())
            .filter(|&i| self.tasks[i].live())
            .map(|i| (i, self.tasks[i].kind))
            .collect();
        Err(self.violation(
            "C6",
            format!("tasks still pending after the final drain: {stuck:?}"),
        ))
    }

    fn check_end(&mut self) -> Result<(), Violation> {
        let shared = self.shared();
        let calls = shared.calls.len();
        let successes = shared
            .calls
            .iter()
            .filter(|c| matches!(c.state, CallState::Returned(Outcome::Ok(_))))
            .count();
        let requests = shared.wire.len();
        let mut per_caller: HashMap<usize, usize> = HashMap::new();
        for wire in &shared.wire {
            *per_caller.entry(wire.caller).or_default() += 1;
        }
        let live_calls = shared.calls.iter().filter(|c| c.state.live()).count();
        let faults = shared.faults_fired;
        drop(shared);
        if let Some((caller, n)) = per_caller.iter().find(|(_, n)| **n > 2) {
            return Err(self.violation("C4", format!("task {caller} sent its request {n} times")));
        }
        if live_calls > 0 && !self.setup.spawner {
            // Without a spawner nobody is left to drive a call.
            return Err(self.violation(
                "C6",
                "a source call is still in flight after every caller finished",
            ));
        }
        self.summary.source_calls = calls;
        self.summary.source_successes = successes;
        self.summary.requests = requests;
        self.summary.resends = per_caller.values().filter(|n| **n == 2).count();
        self.summary.store_faults = faults;
        Ok(())
    }
}

/// The fake API server receives a request from task `caller`.
fn wire(
    shared: &Arc<Mutex<Shared>>,
    flight: &SingleFlight,
    caller: usize,
    request: ModelRequest,
) -> WireFuture {
    let access = request
        .authorization
        .as_deref()
        .and_then(|a| a.strip_prefix("Bearer "))
        .map(str::to_owned);
    // The token was handed out in this very poll, so it is the current one unless a
    // newer token replaced it earlier; the runner then knows it from an earlier step.
    let generation = flight
        .current()
        .filter(|t| Some(t.access().expose()) == access.as_deref())
        .map(|t| t.generation());
    let handle = shared.clone();
    let mut shared = lock(shared);
    let index = shared.wire.len();
    shared.wire.push(Wire {
        caller,
        access,
        generation,
        answer: None,
        dropped: false,
        waker: None,
    });
    WireFuture {
        shared: handle,
        index,
    }
}

/// The few places where the model touches the coordinator's timing interface
/// (`FlightConfig`'s caps, budget and retries; wall-clock-only steps).
mod compat {
    use super::*;
    use tokenflight::{config::Backoff, config::FlightConfig};

    /// The configuration under test: the model's caps, budget and backoff.
    pub(super) fn config(setup: &Setup) -> FlightConfig {
        let mut config = FlightConfig::default();
        config.leeway = LEEWAY;
        config.refresh_ahead = setup.refresh_ahead.then_some(REFRESH_AHEAD);
        // The model predicts the exact start of refresh-ahead: no per-replica jitter.
        config.refresh_ahead_jitter = 0;
        config.refresh_timeout = REFRESH_TIMEOUT;
        config.attempt_timeout = ATTEMPT_TIMEOUT;
        config.min_refresh_interval = MIN_REFRESH_INTERVAL;
        config.retry.max_attempts = if setup.retries { 3 } else { 1 };
        config.retry.backoff =
            Backoff::new(Duration::from_millis(100), Duration::from_secs(1)).with_jitter(0.0);
        config.backoff = if setup.backoff {
            Backoff::new(BACKOFF_INITIAL, BACKOFF_MAX).with_jitter(0.0)
        } else {
            Backoff::none()
        };
        config.backoff.max_retry_after = MAX_RETRY_AFTER;
        config
    }

    pub(super) fn obtained_at(token: Token, at: SystemTime) -> Token {
        token.obtained_at(at)
    }

    /// Steps only the wall clock (monotonic time stays).
    pub(super) fn step_wall(clock: &ManualClock, forward: bool, by: Duration) {
        if forward {
            clock.step_wall_forward(by);
        } else {
            clock.step_wall_back(by);
        }
    }
}

/// A failure's severity and cause as one value, for the tables and assertions here
/// (the 0.1 API keeps them on two axes: `is_permanent()` and `cause()`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(dead_code)]
enum RefreshErrorKind {
    Transient,
    Permanent,
    Timeout,
    Store,
    Panicked,
}

#[allow(dead_code)]
fn kind_of(error: &tokenflight::RefreshError) -> RefreshErrorKind {
    match error.cause() {
        tokenflight::Cause::Timeout => RefreshErrorKind::Timeout,
        tokenflight::Cause::Store => RefreshErrorKind::Store,
        tokenflight::Cause::Panicked => RefreshErrorKind::Panicked,
        _ if error.is_permanent() => RefreshErrorKind::Permanent,
        _ => RefreshErrorKind::Transient,
    }
}
