//! # shmgadget: shared memory at the same address in every process
//!
//! shmgadget gives cooperating processes on one machine named shared-memory **sections** that
//! are mapped at the **same virtual address** in each of them, so plain pointers stored in
//! shared memory stay valid everywhere.
//!
//! * A **domain** is a namespace of sections plus an address **window** (1 TiB at
//!   `0x2000_0000_0000` by default) that every attached process reserves. Sections are placed
//!   inside the window; the placement table (the **registry**, or "pool list") lives in shared
//!   memory itself.
//! * Sections **reserve** large and **commit** on demand: a 64 GiB section costs nothing until
//!   its pages are touched or [committed](Section::commit); a full backing store is a clean
//!   [`ErrorKind::OutOfSpace`], and [`Section::decommit`] gives pages back for every process.
//!
//! ```
//! use shmgadget::{Domain, DomainOptions, SectionOptions};
//!
//! # fn main() -> shmgadget::Result<()> {
//! # let domain_name = format!("doc-{}", std::process::id());
//! // Attach (creating the domain if needed) and create a section of 1 MiB.
//! let domain = Domain::attach_with(&domain_name, &DomainOptions { window_size: 1 << 30, ..Default::default() })?;
//! let section = domain.create_section("greeting", 1 << 20, &SectionOptions::new().transient())?;
//! section.commit(4096)?;
//!
//! // Its address is the same in every process that opens it.
//! let p = section.as_ptr();
//! // SAFETY: the first page is committed and inside the section; nobody else writes it now.
//! unsafe { p.copy_from_nonoverlapping(b"hello".as_ptr(), 5) };
//!
//! let again = domain.open_section("greeting")?;
//! assert_eq!(again.as_ptr(), p);
//! drop((section, again));
//! domain.detach()?; // the last process to leave removes transient sections and the registry
//! # Ok(())
//! # }
//! ```
//!
//! Inspect domains from the command line with `shmgadget domains`, `shmgadget ls` and
//! `shmgadget info`; clean up after crashed processes with `shmgadget gc`.
//!
//! ## Environment
//! * `SHMGADGET_DOMAIN`: the domain used by [`Domain::attach_default`] (default `default`).
//! * `SHMGADGET_SHM_DIR`: directory of the backing objects (default `/dev/shm`); point it at a
//!   larger tmpfs or a hugetlbfs mount when `/dev/shm` is small (64 MiB in a default container).

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

pub mod admin;
mod attachment;
mod domain;
mod error;
mod fault;
mod file_section;
mod fnv;
#[doc(hidden)]
pub mod fuzzing;
mod header;
pub mod heap;
pub mod inspect;
pub mod mapped_file;
mod names;
mod os;
mod protect;
pub mod query;
pub mod queue;
mod registry;
mod section;
mod sharing;
mod shm_safe;
pub mod sync;
mod view;

pub use domain::{DEFAULT_SHM_DIR, Detached, Domain, DomainOptions, default_domain_name, ensure_mapped};
pub use error::{Error, ErrorKind, Result};
pub use fault::{MAX_ATTACHED_DOMAINS, first_touch_maps, handler_installed};
pub use mapped_file::{FlushMode, MappedFile};
pub use names::MAX_NAME_LEN;
pub use protect::Protection;
pub use query::{AddressInfo, Place, query};
pub use registry::{CHUNK, DEFAULT_WINDOW_BASE, DEFAULT_WINDOW_SIZE, Lifetime, SectionKind};
pub use section::{AnyBitPattern, InPlace, Section, SectionInfo, SectionOptions};
pub use sharing::Sharing;
pub use shm_safe::ShmSafe;
pub use view::{View, ViewKind};

/// The README's Rust snippets, compiled as doc tests (`cargo test --doc -p shmgadget`), so they
/// cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;

/// Hooks for shmgadget's own crash tests. Not part of the API; do not use.
#[doc(hidden)]
pub mod __testing {
    use crate::{Domain, Lifetime, Result, SectionKind};

    /// Takes the registry lock, starts creating section `name` (entry left `CREATING`) and then
    /// sleeps for ever, so a test can `kill -9` this process in the middle of a registry update.
    pub fn die_holding_registry_lock(domain: &Domain, name: &str) -> Result<()> {
        let guard = domain.inner.registry.lock()?;
        let creator = crate::registry::Creator { token: domain.peer_token(), ready: true };
        guard.begin_create(name, SectionKind::Raw, Lifetime::Persistent, 0o600, 4096, creator)?;
        println!("HOLDING");
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }

    /// Creates section `name` of `kind` and `size` bytes the way heaps and queues are created,
    /// `LIVE` but not ready, and never finishes it: the caller plays a creator that stops (or
    /// is killed) before its header is initialised.
    pub fn create_unfinished(
        domain: &Domain,
        name: &str,
        kind: SectionKind,
        size: u64,
    ) -> Result<(crate::Section, crate::registry::SectionRecord)> {
        let opts = crate::SectionOptions::new().kind(kind);
        domain.create_section_as(name, size, &opts, false)
    }

    /// Sets how long create-or-open waits for a live creator (default 10 s), for this process.
    pub fn set_creator_wait(wait: std::time::Duration) {
        // Relaxed: a setting, read on its own.
        crate::section::CREATOR_WAIT_MS.store(wait.as_millis() as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// Marks a section made by [`create_unfinished`] ready.
    pub fn finish_unfinished(domain: &Domain, rec: &crate::registry::SectionRecord) -> Result<()> {
        domain.finish_init(rec)
    }

    /// Unmaps section `name` from this process (back to a bare reservation) so the next touch
    /// is a first touch again. Fails if this process holds a handle to it.
    pub fn forget_mapping(domain: &Domain, name: &str) -> Result<()> {
        domain.forget_mapping(name)
    }
}
