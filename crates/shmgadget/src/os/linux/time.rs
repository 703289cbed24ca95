//! Time: a monotonic clock for deadlines. Linux: `clock_gettime(2)` with `CLOCK_MONOTONIC`.

/// The monotonic clock's reading, `clock_gettime(2)` with `CLOCK_MONOTONIC` (the clock that
/// timed lock waits measure against). Never goes back; unrelated to the wall clock.
pub fn monotonic_now() -> std::time::Duration {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    std::time::Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}
