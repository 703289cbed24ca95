//! The one hash of the crate: 64-bit FNV-1a over bytes.
//!
//! Used for the layout fingerprints of every shared header ([`layout_fingerprint`]), the
//! registry's name index (whose bucket of a name is in shared memory, so every build must hash
//! alike) and the type tags of a heap's named objects. `const`, so fingerprints are computed at
//! compile time.

const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a of `bytes`, continuing from `h` (start with [`fnv1a`]).
pub(crate) const fn fnv1a_from(mut h: u64, bytes: &[u8]) -> u64 {
    let mut i = 0;
    while i < bytes.len() {
        h = (h ^ bytes[i] as u64).wrapping_mul(PRIME);
        i += 1;
    }
    h
}

/// FNV-1a of `bytes`.
pub(crate) const fn fnv1a(bytes: &[u8]) -> u64 {
    fnv1a_from(OFFSET_BASIS, bytes)
}

/// A 32-bit fingerprint of a shared layout (sizes, offsets, constants): FNV-1a over the
/// little-endian bytes of the words, folded to 32 bits. Stored in a shared header by its
/// creator and compared by every opener ([`crate::header::validate`]), so builds that
/// disagree on the layout refuse each other's objects instead of misreading them.
pub(crate) const fn layout_fingerprint(parts: &[u64]) -> u32 {
    let mut h = OFFSET_BASIS;
    let mut i = 0;
    while i < parts.len() {
        h = fnv1a_from(h, &parts[i].to_le_bytes());
        i += 1;
    }
    (h ^ (h >> 32)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_the_published_test_vectors() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn a_fingerprint_changes_with_any_word_and_with_their_order() {
        let base = layout_fingerprint(&[1, 2, 3]);
        assert_ne!(base, layout_fingerprint(&[1, 2, 4]));
        assert_ne!(base, layout_fingerprint(&[2, 1, 3]));
        assert_ne!(base, layout_fingerprint(&[1, 2]));
    }
}
