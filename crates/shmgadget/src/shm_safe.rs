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
///
/// Leave [`KIND`](ShmSafe::KIND) at its default: shmgadget's synchronisation types set it.
pub unsafe trait ShmSafe {
    /// What a heap records about a named object of this type ([`Heap::named_objects`] and
    /// `shmgadget heap` show a sync object's state by it). A constant of the type, so no type
    /// names are compared.
    ///
    /// [`Heap::named_objects`]: crate::heap::Heap::named_objects
    #[doc(hidden)]
    const KIND: crate::heap::ObjectKind = crate::heap::ObjectKind::Data;
}

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
);

macro_rules! shm_safe_sync {
    ($($t:ty => $kind:ident),* $(,)?) => { $(
        // SAFETY: repr(C) atomics (and a robust mutex behind the robust-lock protocol), no
        // pointers, validated by its header before use.
        unsafe impl ShmSafe for $t {
            const KIND: crate::heap::ObjectKind = crate::heap::ObjectKind::$kind;
        }
    )* };
}

shm_safe_sync!(
    crate::sync::Semaphore => Semaphore,
    crate::sync::Event => Event,
    crate::sync::Condvar => Condvar,
    crate::sync::RawMutex => Mutex,
);

// SAFETY: an array of shared-memory-safe elements is laid out contiguously with no pointers.
unsafe impl<T: ShmSafe, const N: usize> ShmSafe for [T; N] {}
// SAFETY: the mutex is repr(C) atomics (its robust lock too) + `T`, itself ShmSafe.
unsafe impl<T: ShmSafe> ShmSafe for crate::sync::Mutex<T> {
    // Its raw mutex comes first, so inspectors read it as one.
    const KIND: crate::heap::ObjectKind = crate::heap::ObjectKind::Mutex;
}

/// Defines a `#[repr(C)]` struct that may live in shared memory and implements [`ShmSafe`]
/// for it, after checking at compile time that every field's type is `ShmSafe` itself. This is
/// the way to write your own shared types without an `unsafe impl` of your own:
///
/// ```
/// use std::sync::atomic::AtomicU64;
/// shmgadget::shm_struct! {
///     /// Counters shared by every worker.
///     pub struct Stats {
///         pub requests: AtomicU64,
///         pub errors: AtomicU64,
///         pub last_code: [u8; 16],
///     }
/// }
/// fn needs_shm_safe<T: shmgadget::ShmSafe>() {}
/// needs_shm_safe::<Stats>();
/// ```
///
/// A field that may not be shared (a `Box`, a `String`, a reference) does not compile:
///
/// ```compile_fail
/// shmgadget::shm_struct! {
///     struct Bad { name: String }
/// }
/// ```
///
/// The struct must not implement `Drop` in a way other processes rely on (a crashed process
/// skips it): rule 4 of [`ShmSafe`].
#[macro_export]
macro_rules! shm_struct {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident {
            $( $(#[$fmeta:meta])* $fvis:vis $field:ident : $fty:ty ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[repr(C)]
        $vis struct $name {
            $( $(#[$fmeta])* $fvis $field : $fty ),*
        }

        // SAFETY: `#[repr(C)]` gives a stable layout (rule 1) and every field is `ShmSafe`
        // (checked just below, at compile time), so the struct holds no process-private pointer
        // and is shared only as its fields allow (rules 2 and 3).
        unsafe impl $crate::ShmSafe for $name {}

        const _: fn() = || {
            fn field_is_shm_safe<T: $crate::ShmSafe + ?Sized>() {}
            $( field_is_shm_safe::<$fty>(); )*
        };
    };
}
