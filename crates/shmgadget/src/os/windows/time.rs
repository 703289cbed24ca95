//! Time: a monotonic clock for deadlines. Windows: `QueryPerformanceCounter`.

use windows_sys::Win32::System::Performance::{QueryPerformanceCounter, QueryPerformanceFrequency};

/// The performance counter's reading as a duration since boot (`QueryPerformanceCounter`,
/// system-wide, so readings from different processes compare). Never goes back.
pub fn monotonic_now() -> std::time::Duration {
    let (mut ticks, mut freq) = (0i64, 0i64);
    // SAFETY: both calls write one i64 each into valid locals; they cannot fail on XP or later.
    unsafe {
        QueryPerformanceCounter(&mut ticks);
        QueryPerformanceFrequency(&mut freq);
    }
    let (ticks, freq) = (ticks.max(0) as u64, freq.max(1) as u64);
    let secs = ticks / freq;
    let nanos = ((ticks % freq) as u128 * 1_000_000_000 / freq as u128) as u32;
    std::time::Duration::new(secs, nanos)
}
