//! Waiting on a shared word: sleep while a 32-bit word in shared memory holds a value, wake
//! sleepers in any process. Linux: `futex(2)` without `FUTEX_PRIVATE_FLAG`.

use std::io;

/// Why a futex wait returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FutexWait {
    /// Woken, or returned spuriously: re-check the condition.
    Woken,
    /// The word no longer held the expected value when the kernel looked.
    Changed,
    /// The timeout expired.
    TimedOut,
}

/// Sleeps while `*word == expected`, at most `timeout` (`futex(2)` `FUTEX_WAIT`, shared: no
/// `FUTEX_PRIVATE_FLAG`, so waiters and wakers may be in different processes).
pub fn futex_wait(
    word: &std::sync::atomic::AtomicU32,
    expected: u32,
    timeout: Option<std::time::Duration>,
) -> io::Result<FutexWait> {
    use rustix::thread::futex;
    let ts = timeout
        .map(|d| futex::Timespec { tv_sec: d.as_secs().min(i64::MAX as u64) as i64, tv_nsec: d.subsec_nanos() as _ });
    match futex::wait(word, futex::Flags::empty(), expected, ts.as_ref()) {
        Ok(()) => Ok(FutexWait::Woken),
        Err(rustix::io::Errno::AGAIN) => Ok(FutexWait::Changed),
        Err(rustix::io::Errno::TIMEDOUT) => Ok(FutexWait::TimedOut),
        Err(rustix::io::Errno::INTR) => Ok(FutexWait::Woken),
        Err(e) => Err(e.into()),
    }
}

/// Wakes at most `n` waiters of `word` in any process (`futex(2)` `FUTEX_WAKE`, shared).
/// `u32::MAX` means all of them.
pub fn futex_wake(word: &std::sync::atomic::AtomicU32, n: u32) -> usize {
    // The kernel reads the count as a C `int`: u32::MAX would be -1, which wakes only one.
    let n = n.min(i32::MAX as u32);
    rustix::thread::futex::wake(word, rustix::thread::futex::Flags::empty(), n).unwrap_or(0)
}
