//! Bounded waits for a [`RobustLock`]: sleep in slices, look at the holder between them, give up
//! with the reason when the holder is proven gone or past the caller's patience. Used by the
//! registry's lock and by [`super::RawMutex`]; depends only on the lock and `os`, so the
//! registry can use it without importing the domain layer.

use std::time::{Duration, Instant};

use super::robust::{Liveness, LockOutcome, RobustLock};
use crate::os;

/// How often a bounded waiter wakes up to look at who holds the lock.
pub(crate) const LOOK_EVERY: Duration = Duration::from_millis(200);

/// How long the library's bounded waits (registry, heaps) let a live holder keep a lock.
pub const LOCK_PATIENCE: Duration = Duration::from_secs(5);

/// Why [`lock_patiently`] gave up.
pub(crate) enum Stuck {
    /// The lock word names no live holder (the reason, from the `gone` callback), seen twice.
    Gone(String),
    /// Held past the patience by a holder not proven gone (its lock word).
    Slow(u32),
}

/// Locks `lock`, sleeping at most `patience` (see "Bounded waits"). `gone(word)` says why the
/// holder named by the lock word `word` is not alive, or `None` if it may be. Call it after the
/// caller's own spinning: it sleeps from the start.
/// `token` is the caller's process token recorded as the holder's; `alive` answers whether a
/// holder's token is alive, or its thread visible (so a dead holder is taken over with
/// `OwnerDied`, see `robust.rs`).
pub(crate) fn lock_patiently(
    lock: &RobustLock,
    token: u64,
    alive: &dyn Liveness,
    patience: Duration,
    mut gone: impl FnMut(u32) -> Option<String>,
) -> std::io::Result<std::result::Result<LockOutcome, Stuck>> {
    let start = Instant::now();
    let mut suspect: Option<u32> = None;
    loop {
        let slice = patience.saturating_sub(start.elapsed()).clamp(Duration::from_millis(1), LOOK_EVERY);
        if let Some(outcome) = lock.lock_timeout(token, Some(slice), alive)? {
            return Ok(Ok(outcome));
        }
        let word = lock.word();
        match gone(word) {
            Some(why) if suspect == Some(word) => return Ok(Err(Stuck::Gone(why))),
            Some(_) => suspect = Some(word),
            None => suspect = None,
        }
        // A suspect gets its second look even past the patience.
        if start.elapsed() >= patience && suspect.is_none() {
            return Ok(Err(Stuck::Slow(word)));
        }
    }
}

/// Why the holder named by lock word `word` cannot be alive, given its recorded token's
/// liveness (`token_alive`: `None` when no token is recorded or it cannot be asked) and its
/// description (`who`, from [`describe_holder`]). `None`: it may be alive.
pub(crate) fn holder_gone(word: u32, token_alive: Option<bool>, who: &str) -> Option<String> {
    let tid = RobustLock::owner_tid(word);
    if token_alive == Some(false) {
        return Some(format!("{who}, which is not alive"));
    }
    if tid == 0 {
        return Some(format!("nobody: its lock word {word:#010x} names no thread (the word is damaged)"));
    }
    if !os::thread_exists(tid) {
        return Some(format!("{who}, which does not exist"));
    }
    None
}

/// A holder's description for messages: its registry slot (from its token, when one is recorded)
/// and pid,
/// else the lock word's thread (and that thread's process, if it exists).
pub(crate) fn describe_holder(word: u32, slot: Option<u32>, pid: u32) -> String {
    let tid = RobustLock::owner_tid(word);
    match slot {
        Some(slot) if pid != 0 => format!("slot {slot}, pid {pid} (thread {tid})"),
        Some(slot) => format!("slot {slot} (thread {tid})"),
        None => match os::thread_group(tid) {
            Some(p) => format!("thread {tid} of pid {p} (no registration recorded)"),
            None => format!("thread {tid} (no registration recorded)"),
        },
    }
}
