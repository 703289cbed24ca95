//! Types that may live in shared memory.

/// A type whose values may be placed in shared memory and used from several processes.
///
/// # Safety
/// Implement it only for types that
/// 1. have a stable layout (`#[repr(C)]`, `#[repr(transparent)]` or a primitive), with
///    fixed-width fields;
/// 2. contain no pointer to process-private memory (`Box`, `&'static str`, `Vec`, `String`,
///    trait objects, function pointers): only plain data, and pointers into the same domain's
///    window;
/// 3. are accessed concurrently only through atomics or under a shared lock's guard
///    (`&mut T` exists only under the guard);
/// 4. need no `Drop` to clean up across processes (a crashed process skips it).
pub unsafe trait ShmSafe {}

macro_rules! shm_safe {
    ($($t:ty),* $(,)?) => { $(
        // SAFETY: a primitive (or atomic) of fixed size with no pointers.
        unsafe impl ShmSafe for $t {}
    )* };
}

shm_safe!(
    (),
    bool,
    u8,
    u16,
    u32,
    u64,
    u128,
    usize,
    i8,
    i16,
    i32,
    i64,
    i128,
    isize,
    f32,
    f64,
    std::sync::atomic::AtomicU8,
    std::sync::atomic::AtomicU16,
    std::sync::atomic::AtomicU32,
    std::sync::atomic::AtomicU64,
    std::sync::atomic::AtomicUsize,
    std::sync::atomic::AtomicI32,
    std::sync::atomic::AtomicI64,
    std::sync::atomic::AtomicBool,
    crate::sync::Semaphore,
    crate::sync::Event,
    crate::sync::Condvar,
    crate::sync::RawMutex,
);

// SAFETY: an array of shared-memory-safe elements is laid out contiguously with no pointers.
unsafe impl<T: ShmSafe, const N: usize> ShmSafe for [T; N] {}
// SAFETY: the mutex is repr(C) atomics + a robust pthread mutex + `T`, itself ShmSafe.
unsafe impl<T: ShmSafe> ShmSafe for crate::sync::Mutex<T> {}
