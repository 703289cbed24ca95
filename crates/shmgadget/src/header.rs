//! The prefix every shared header starts with, and the one check an opener runs on it.
//!
//! The registry (`RegistryShared`), a heap (`HeapShared`) and a queue (`QueueShared`) all
//! begin with the same four words:
//! ```text
//! 0   magic           u64  eight ASCII bytes naming the structure ("SHMHEAP1", ...)
//! 8   layout_version  u32  bumped whenever the structure's layout or meaning changes
//! 12  fingerprint     u32  `fnv::layout_fingerprint` of the build's sizes and offsets
//! 16  ready           u32  the structure's own READY value, once its header is initialised
//! ```
//! Each header type declares its expectations in [`SharedHeader`], and a const assertion
//! ([`assert_prefix!`]) proves at compile time that its first fields sit where
//! [`HeaderPrefix`] says. The prefix is not embedded as a field, so the three layouts stay
//! byte for byte what they were (a 20-byte prefix followed by each header's own `u32`).
//!
//! # Protocol
//! * The creator writes `magic`, `layout_version`, `fingerprint` and the rest of its header
//!   (Relaxed), then publishes `ready` with a Release store (pairs with the Acquire load in
//!   [`check_prefix`]). From then on the prefix is frozen: nobody writes it again.
//! * An opener calls [`validate`] with the bytes it knows are there (its mapping's length,
//!   which was checked against the backing object; a private copy's length). It checks, in
//!   this order and before any reference to the header exists: the size (a header cut short
//!   by a truncated object is `TooSmall`, never a read past the end), then `ready` (Acquire),
//!   `magic`, `layout_version` and `fingerprint`. Only then does it hand out `&T`.
//! * A [`Mismatch`] says what was expected and what was found; each owner wraps it into a
//!   `Corrupt` error that names the object and says what to do next.

use std::mem::offset_of;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// The first 20 bytes of every shared header. Never formed as a reference (its trailing
/// padding overlaps the owner's next field): it documents the offsets [`check_prefix`] reads.
#[repr(C)]
pub(crate) struct HeaderPrefix {
    pub(crate) magic: AtomicU64,
    pub(crate) layout_version: AtomicU32,
    pub(crate) fingerprint: AtomicU32,
    pub(crate) ready: AtomicU32,
}

/// Bytes of the prefix proper (without the padding `size_of` adds).
const PREFIX_LEN: usize = offset_of!(HeaderPrefix, ready) + size_of::<AtomicU32>();

/// What an opener expects of a header's prefix.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Expected {
    /// What the structure is, for messages ("heap", "queue", "registry").
    pub what: &'static str,
    pub magic: u64,
    pub layout_version: u32,
    pub fingerprint: u32,
    pub ready: u32,
    /// The fewest bytes an object of this kind can have (at least the header).
    pub min_size: u64,
}

/// A structure that lives at the start of a shared object and begins with [`HeaderPrefix`].
///
/// # Safety
/// The implementor is `#[repr(C)]`, made of atomics (and locks operated through atomics) only,
/// so that any bytes are a valid value and shared access from other processes is sound; its
/// first 20 bytes are the prefix (use [`assert_prefix!`]); `EXPECTED.min_size` is at least
/// `size_of::<Self>()`.
pub(crate) unsafe trait SharedHeader: Sized {
    const EXPECTED: Expected;
}

/// Proves at compile time that `$t`'s fields `$magic`, `$version`, `$fp`, `$ready` are the
/// prefix: same offsets as in [`HeaderPrefix`], same sizes.
macro_rules! assert_prefix {
    ($t:ty, $magic:ident, $version:ident, $fp:ident, $ready:ident) => {
        const _: () = {
            use std::mem::offset_of;
            use $crate::header::HeaderPrefix;
            assert!(offset_of!($t, $magic) == offset_of!(HeaderPrefix, magic));
            assert!(offset_of!($t, $version) == offset_of!(HeaderPrefix, layout_version));
            assert!(offset_of!($t, $fp) == offset_of!(HeaderPrefix, fingerprint));
            assert!(offset_of!($t, $ready) == offset_of!(HeaderPrefix, ready));
            assert!(align_of::<$t>() >= align_of::<HeaderPrefix>());
        };
    };
}
pub(crate) use assert_prefix;

/// Why a header was refused: what was expected and what was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Mismatch {
    /// Fewer bytes than the smallest object of the kind.
    TooSmall { what: &'static str, available: u64, needed: u64 },
    /// The header was never published (or its `ready` word was damaged).
    NotReady { what: &'static str, found: u32, expected: u32 },
    /// Not this structure, or a different family of it.
    Magic { what: &'static str, found: u64, expected: u64 },
    /// Made by a build with another layout version.
    Version { what: &'static str, found: u32, expected: u32 },
    /// Made by a build whose sizes or offsets differ.
    Fingerprint { what: &'static str, found: u32, expected: u32 },
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Mismatch::TooSmall { what, available, needed } => write!(
                f,
                "its {available} bytes are too few for a {what} header ({needed} bytes at least): it was truncated, \
                 or never made as a {what}"
            ),
            Mismatch::NotReady { what, found, expected } => {
                write!(
                    f,
                    "its {what} header was never initialised (ready word {found:#010x}, expected {expected:#010x})"
                )
            }
            Mismatch::Magic { what, found, expected } => write!(
                f,
                "bad magic {found:#018x} ({}), expected {expected:#018x} ({}): it does not hold a {what}",
                printable(found),
                printable(expected)
            ),
            Mismatch::Version { what, found, expected } => write!(
                f,
                "{what} layout version {found}, expected {expected} (a different shmgadget version created it)"
            ),
            Mismatch::Fingerprint { what, found, expected } => write!(
                f,
                "{what} layout fingerprint {found:#010x}, expected {expected:#010x} (built with a different layout)"
            ),
        }
    }
}

/// A magic number's bytes as text, `?` for unprintable ones.
fn printable(magic: u64) -> String {
    magic.to_le_bytes().iter().map(|&b| if b.is_ascii_graphic() { b as char } else { '?' }).collect()
}

/// Checks that `available` bytes can hold a `T` object.
pub(crate) fn check_size<T: SharedHeader>(available: u64) -> Result<(), Mismatch> {
    let e = T::EXPECTED;
    if available < e.min_size {
        return Err(Mismatch::TooSmall { what: e.what, available, needed: e.min_size });
    }
    Ok(())
}

/// Checks the prefix at `base` against `T`'s expectations: `ready` (Acquire), then magic,
/// version and fingerprint.
///
/// # Safety
/// `base` is aligned for `T` and its first 20 bytes are readable for the duration of the call
/// (only through atomics: other processes may write them).
unsafe fn check_prefix<T: SharedHeader>(base: *const u8) -> Result<(), Mismatch> {
    let e = T::EXPECTED;
    let word32 = |off: usize| {
        // SAFETY: inside the first PREFIX_LEN bytes (the caller's contract), 4-aligned (T is at
        // least 8-aligned and the offsets are multiples of 4), read atomically.
        unsafe { &*base.add(off).cast::<AtomicU32>() }
    };
    debug_assert!(offset_of!(HeaderPrefix, ready) + 4 <= PREFIX_LEN);
    // Acquire: pairs with the creator's Release store of `ready` (the `init` of each header
    // type); makes the frozen fields written before it visible.
    let ready = word32(offset_of!(HeaderPrefix, ready)).load(Ordering::Acquire);
    if ready != e.ready {
        return Err(Mismatch::NotReady { what: e.what, found: ready, expected: e.ready });
    }
    // SAFETY: offset 0, 8 bytes inside the prefix, aligned for T and so for u64.
    let magic_word = unsafe { &*base.cast::<AtomicU64>() };
    // Relaxed (the three): frozen before `ready` was published, made visible by the Acquire.
    let magic = magic_word.load(Ordering::Relaxed);
    if magic != e.magic {
        return Err(Mismatch::Magic { what: e.what, found: magic, expected: e.magic });
    }
    let version = word32(offset_of!(HeaderPrefix, layout_version)).load(Ordering::Relaxed);
    if version != e.layout_version {
        return Err(Mismatch::Version { what: e.what, found: version, expected: e.layout_version });
    }
    let fp = word32(offset_of!(HeaderPrefix, fingerprint)).load(Ordering::Relaxed);
    if fp != e.fingerprint {
        return Err(Mismatch::Fingerprint { what: e.what, found: fp, expected: e.fingerprint });
    }
    Ok(())
}

/// Validates the header of a `T` object at `base` of which `available` bytes are readable,
/// and only then gives a reference to it (see the module's protocol).
///
/// # Safety
/// `base` is aligned for `T` and its first `available` bytes stay readable (mapped, or a
/// private copy) for `'a`, written by others only through atomics.
pub(crate) unsafe fn validate<'a, T: SharedHeader>(base: *const u8, available: u64) -> Result<&'a T, Mismatch> {
    check_size::<T>(available)?;
    // SAFETY: `available >= min_size >= size_of::<T>() >= PREFIX_LEN` (checked just above and
    // by the trait's contract), so the prefix is readable; aligned by the caller's contract.
    unsafe { check_prefix::<T>(base)? };
    // SAFETY: `size_of::<T>()` bytes are readable for 'a and aligned (as above); T is atomics
    // only (the trait's contract), so any bytes are a valid T and sharing it is sound.
    Ok(unsafe { &*base.cast::<T>() })
}

/// The header a creator is about to initialise: only its size is checked.
///
/// # Safety
/// As for [`validate`].
#[cfg_attr(loom, allow(dead_code))]
pub(crate) unsafe fn unpublished<'a, T: SharedHeader>(base: *const u8, available: u64) -> Result<&'a T, Mismatch> {
    check_size::<T>(available)?;
    // SAFETY: as in `validate`.
    Ok(unsafe { &*base.cast::<T>() })
}

/// [`validate`]'s prefix checks on a header already in hand (a private copy the caller sized,
/// as the fuzz targets make).
#[cfg_attr(loom, allow(dead_code))]
pub(crate) fn check_ref<T: SharedHeader>(header: &T) -> Result<(), Mismatch> {
    // SAFETY: a live `&T`: aligned, and all its bytes (the prefix among them) readable.
    unsafe { check_prefix::<T>((header as *const T).cast()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[repr(C)]
    struct Toy {
        magic: AtomicU64,
        layout_version: AtomicU32,
        fingerprint: AtomicU32,
        ready: AtomicU32,
        other: AtomicU32,
    }
    assert_prefix!(Toy, magic, layout_version, fingerprint, ready);
    // SAFETY: repr(C), atomics only, prefix asserted above, min_size >= its size.
    unsafe impl SharedHeader for Toy {
        const EXPECTED: Expected = Expected {
            what: "toy",
            magic: u64::from_le_bytes(*b"SHMTOY01"),
            layout_version: 7,
            fingerprint: 0x1234_5678,
            ready: 0x5245_4459,
            min_size: 64,
        };
    }

    fn good() -> [u64; 8] {
        let mut w = [0u64; 8];
        w[0] = Toy::EXPECTED.magic;
        w[1] = Toy::EXPECTED.layout_version as u64 | (Toy::EXPECTED.fingerprint as u64) << 32;
        w[2] = Toy::EXPECTED.ready as u64 | 0xdead << 32;
        w
    }

    fn run(w: &[u64; 8], available: u64) -> Result<(), Mismatch> {
        // SAFETY: 64 readable, 8-aligned bytes that outlive the call; `available` <= 64.
        unsafe { validate::<Toy>(w.as_ptr().cast(), available) }.map(|t| {
            assert_eq!(t.other.load(Ordering::Relaxed), 0xdead);
        })
    }

    #[test]
    fn a_good_prefix_passes_and_each_damaged_word_is_named() {
        assert_eq!(run(&good(), 64), Ok(()));
        let mut w = good();
        w[0] ^= 1;
        assert!(matches!(run(&w, 64), Err(Mismatch::Magic { .. })));
        let mut w = good();
        w[1] ^= 1;
        assert!(matches!(run(&w, 64), Err(Mismatch::Version { found: 6, expected: 7, .. })));
        let mut w = good();
        w[1] ^= 1 << 32;
        assert!(matches!(run(&w, 64), Err(Mismatch::Fingerprint { .. })));
        let mut w = good();
        w[2] = 0;
        let e = run(&w, 64).unwrap_err();
        assert!(matches!(e, Mismatch::NotReady { found: 0, .. }));
        assert!(e.to_string().contains("never initialised"), "{e}");
    }

    #[test]
    fn too_few_bytes_are_refused_before_anything_is_read() {
        // A null base would fault if it were read: the size check must come first.
        // SAFETY: `validate` returns before dereferencing when `available` is too small.
        let e = unsafe { validate::<Toy>(std::ptr::null(), 63) }.map(|_| ()).unwrap_err();
        assert_eq!(e, Mismatch::TooSmall { what: "toy", available: 63, needed: 64 });
        assert!(e.to_string().contains("its 63 bytes are too few for a toy header (64 bytes at least)"), "{e}");
    }

    #[test]
    fn magics_are_shown_as_text() {
        let mut w = good();
        w[0] = u64::from_le_bytes(*b"NOTMAGIC");
        let e = run(&w, 64).unwrap_err().to_string();
        assert!(e.contains("(NOTMAGIC)") && e.contains("(SHMTOY01)"), "{e}");
    }
}
