//! Names of domains and sections, and the names of their backing objects.
//!
//! A user-visible name is 1 to 63 characters of `[A-Za-z0-9._-]`, not starting with `-` (a
//! command line would read it as an option: `shmgadget rm -dash` is `-d ash`) or `.` (a hidden
//! file, and `.`/`..`). Backing objects live in the
//! shm directory (`/dev/shm` unless `SHMGADGET_SHM_DIR` says otherwise):
//!
//! | object          | file name                                   |
//! |-----------------|---------------------------------------------|
//! | domain registry | `shmgadget.<domain>:registry`               |
//! | section         | `shmgadget.<domain>:<generation>:<section>` |
//!
//! `:` cannot appear in a name, so a file name always parses back unambiguously. The section's
//! generation (unique per registry) is part of the file name, so a section deleted and
//! re-created under the same name is a different object and a stale opener can never reach
//! the new one by accident.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, ErrorKind, Result};

/// Longest allowed name, in bytes.
pub const MAX_NAME_LEN: usize = 63;

/// Common prefix of every backing object.
pub const OBJECT_PREFIX: &str = "shmgadget.";
const REGISTRY_SUFFIX: &str = ":registry";

/// Checks a domain or section name; `what` is "domain" or "section" for the message. The C
/// interface, the Rust API and the CLI all check names here, so they accept the same ones.
pub fn validate(name: &str, what: &str) -> Result<()> {
    validate_chars(name, what)?;
    if let Some(first @ ('-' | '.')) = name.chars().next() {
        let why = if first == '-' { "a command line would read it as an option" } else { "it would be a hidden file" };
        return Err(Error::new(
            ErrorKind::InvalidName,
            format!(
                "invalid {what} name {name:?}: it starts with {first:?} ({why}); start it with a letter, a digit or '_'"
            ),
        ));
    }
    Ok(())
}

/// The alphabet and length rules alone: what [`parse_object`] accepts, so that objects made
/// before names could not start with `-` or `.` are still recognised (listed, cleaned up).
fn validate_chars(name: &str, what: &str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(Error::new(
            ErrorKind::InvalidName,
            format!("invalid {what} name {name:?}: it has {} bytes, expected 1 to {MAX_NAME_LEN}", name.len()),
        ));
    }
    if let Some(bad) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(Error::new(
            ErrorKind::InvalidName,
            format!(
                "invalid {what} name {name:?}: character {bad:?} is not allowed; use only A-Z, a-z, 0-9, '.', '_' and '-'"
            ),
        ));
    }
    if name == "." || name == ".." {
        return Err(Error::new(
            ErrorKind::InvalidName,
            format!("invalid {what} name {name:?}: '.' and '..' are reserved"),
        ));
    }
    Ok(())
}

/// A name as stored in shared memory: up to 64 bytes in eight little-endian words, zero-padded,
/// its length kept elsewhere by the owner (registry entries, the registry's domain name, a
/// heap's named objects). Words, so a record can be copied atomically word by word.
pub(crate) type PackedName = [AtomicU64; 8];

/// Stores `name` (at most 64 bytes; callers validated it) into `dst`, zero-padded.
/// Relaxed stores: every owner publishes the words with its own release (a seqlock's closing
/// `seq`, a header's `ready`, a heap lock's unlock).
pub(crate) fn pack(dst: &PackedName, name: &str) {
    let mut bytes = [0u8; 64];
    bytes[..name.len()].copy_from_slice(name.as_bytes());
    for (word, chunk) in dst.iter().zip(bytes.chunks_exact(8)) {
        word.store(u64::from_le_bytes(chunk.try_into().expect("8 bytes")), Ordering::Relaxed);
    }
}

/// The 64 bytes of `src` (Relaxed loads: the owner's seqlock, `ready` or lock orders them).
pub(crate) fn unpack(src: &PackedName) -> [u8; 64] {
    let mut bytes = [0u8; 64];
    for (word, chunk) in src.iter().zip(bytes.chunks_exact_mut(8)) {
        chunk.copy_from_slice(&word.load(Ordering::Relaxed).to_le_bytes());
    }
    bytes
}

/// File name of a domain's registry.
pub fn registry_object(domain: &str) -> String {
    format!("{OBJECT_PREFIX}{domain}{REGISTRY_SUFFIX}")
}

/// File name of a section's backing object.
pub fn section_object(domain: &str, generation: u64, section: &str) -> String {
    format!("{OBJECT_PREFIX}{domain}:{generation}:{section}")
}

/// What a file in the shm directory is, if it is one of ours.
#[derive(Debug, PartialEq, Eq)]
pub enum ObjectName<'a> {
    /// A domain registry.
    Registry { domain: &'a str },
    /// A section's backing object.
    Section { domain: &'a str, generation: u64, section: &'a str },
}

/// Parses a file name from the shm directory; `None` for anything that is not ours.
pub fn parse_object(file: &str) -> Option<ObjectName<'_>> {
    let rest = file.strip_prefix(OBJECT_PREFIX)?;
    if let Some(domain) = rest.strip_suffix(REGISTRY_SUFFIX) {
        return validate_chars(domain, "domain").is_ok().then_some(ObjectName::Registry { domain });
    }
    let mut parts = rest.splitn(3, ':');
    let domain = parts.next()?;
    let generation = parts.next()?.parse().ok()?;
    let section = parts.next()?;
    (validate_chars(domain, "domain").is_ok() && validate_chars(section, "section").is_ok())
        .then_some(ObjectName::Section { domain, generation, section })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_outside_the_alphabet_or_length_are_rejected() {
        for bad in ["", "a/b", "a:b", "é", "with space", ".", "..", "...", "-dash", ".hidden", "-", &"x".repeat(64)] {
            assert_eq!(validate(bad, "section").unwrap_err().kind(), ErrorKind::InvalidName, "{bad:?}");
        }
        for good in ["a", "A.b-c_9", &"x".repeat(63), "_x", "9-.", "a..b"] {
            validate(good, "section").unwrap();
        }
    }

    #[test]
    fn object_names_parse_back() {
        assert_eq!(parse_object(&registry_object("d.1")), Some(ObjectName::Registry { domain: "d.1" }));
        assert_eq!(
            parse_object(&section_object("d", 42, "s.x")),
            Some(ObjectName::Section { domain: "d", generation: 42, section: "s.x" })
        );
        assert_eq!(parse_object("other"), None);
        assert_eq!(parse_object("shmgadget.d:zz:s"), None);
    }
}
