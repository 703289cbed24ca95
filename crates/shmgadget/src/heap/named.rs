//! A heap's named objects (the classic region list): blocks of the heap found by name, with
//! the kind and type they were created as.
//!
//! # Protocol
//! The table is `HeapShared::names`, [`MAX_NAMED`] entries in the heap header. Every write
//! happens under the heap lock, whose acquire/release orders it between processes; the fields
//! are atomics only so that inspection may copy them out.
//!
//! | `state`       | meaning                                          | next                     |
//! |---------------|--------------------------------------------------|--------------------------|
//! | 0             | free                                             | `NAMED_INIT`             |
//! | `NAMED_INIT`  | reserved: block allocated, creator runs `init` without the lock | `NAMED_READY`, or 0 if `init` fails or panics |
//! | `NAMED_READY` | published: the object is initialised             | 0 (`remove_named`, reset)|
//!
//! * The creator fills `name`, `name_len`, `kind`, `offset`, `size` and `type_tag` and sets
//!   `NAMED_INIT` in one lock hold; runs `init` unlocked (it may allocate from the heap); then
//!   sets `NAMED_READY` under the lock, whose release publishes the initialised object. Others
//!   that find `NAMED_INIT` wait (bounded by `INIT_WAIT`): a creator that died leaves the entry
//!   reserved, to be removed with `remove_named`.
//! * `kind` is the type's [`ShmSafe::KIND`](crate::ShmSafe) (a constant of the type, not a
//!   comparison of type names), for inspectors that show a sync object's state; `type_tag`
//!   identifies the type exactly (FNV-1a of its name, size and alignment) so a lookup as another
//!   type is refused.
//! * Validate, then trust: an entry's offset must be a used block of the heap with room for its
//!   recorded size, and its name must be valid, before anything is read there; a violation is
//!   `Corrupt` (`check_named` reports the first).

use std::alloc::Layout;
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, Ordering};

use super::{AREA_OFFSET, Heap, Locked, map_tlsf, tlsf_reason};
use crate::error::{Error, ErrorKind, Result, bail};
use crate::names;

/// Named objects a heap can hold.
pub const MAX_NAMED: usize = 64;
pub(super) const NAMED_READY: u32 = 1;
pub(super) const NAMED_INIT: u32 = 2;

/// One named object: a block of the heap found by name. Written under the heap lock; fields are
/// atomics so inspection can copy them out.
#[repr(C)]
pub(crate) struct NamedEntry {
    pub(super) state: AtomicU32,
    pub(super) name_len: AtomicU16,
    /// [`ObjectKind`] as a number, so inspectors can show a sync object's state.
    pub(super) kind: AtomicU16,
    pub(super) offset: AtomicU64,
    pub(super) size: AtomicU64,
    pub(super) type_tag: AtomicU64,
    pub(super) name: [AtomicU64; 8],
}

const _: () = assert!(size_of::<NamedEntry>() == 96);

/// A named object, as listed by [`Heap::named_objects`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct NamedObject {
    /// Its name.
    pub name: String,
    /// Its address (the same in every process).
    pub address: u64,
    /// Its size in bytes.
    pub size: u64,
    /// What it is.
    pub kind: ObjectKind,
    /// For a synchronisation object, its state now (a snapshot).
    pub state: Option<ObjectState>,
}

/// What a named object is, recorded when it is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
#[repr(u16)]
pub enum ObjectKind {
    /// Any other type.
    Data = 0,
    /// A [`Semaphore`](crate::sync::Semaphore).
    Semaphore = 1,
    /// An [`Event`](crate::sync::Event).
    Event = 2,
    /// A [`Condvar`](crate::sync::Condvar).
    Condvar = 3,
    /// A [`RawMutex`](crate::sync::RawMutex) or a [`Mutex<T>`](crate::sync::Mutex) (whose raw
    /// mutex comes first).
    Mutex = 4,
}

impl ObjectKind {
    fn from_u16(v: u16) -> ObjectKind {
        match v {
            1 => ObjectKind::Semaphore,
            2 => ObjectKind::Event,
            3 => ObjectKind::Condvar,
            4 => ObjectKind::Mutex,
            _ => ObjectKind::Data,
        }
    }

    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            ObjectKind::Data => "data",
            ObjectKind::Semaphore => "semaphore",
            ObjectKind::Event => "event",
            ObjectKind::Condvar => "condvar",
            ObjectKind::Mutex => "mutex",
        }
    }
}

/// The state of a named synchronisation object (a snapshot).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum ObjectState {
    /// Units available and possible sleepers.
    Semaphore {
        /// Units available.
        count: u32,
        /// Processes that may be asleep in `wait`.
        waiters: u32,
    },
    /// Whether it is set, and possible sleepers.
    Event {
        /// Set (signalled).
        set: bool,
        /// Processes that may be asleep in `wait`.
        waiters: u32,
    },
    /// Possible sleepers.
    Condvar {
        /// Processes that may be asleep in `wait`.
        waiters: u32,
    },
    /// Who holds it, and whether that process is still alive.
    Mutex {
        /// Pid of the holder, if held.
        owner: Option<u32>,
        /// Whether the holder's process is alive, by its liveness token (a dead holder's lock
        /// is recovered by the next locker, who is told `OwnerDied`).
        owner_alive: Option<bool>,
        /// A holder died and the data was not marked consistent since.
        inconsistent: bool,
    },
}

/// The state of the object of `kind` at `addr`, if it is a sync object of the right size.
fn object_state(kind: ObjectKind, addr: u64, size: u64) -> Option<ObjectState> {
    fn at<T>(addr: u64, size: u64) -> Option<&'static T> {
        // SAFETY: the caller found a named object of this kind at `addr` (inside the mapped heap,
        // aligned, `size` bytes, checked by `named_objects`), created as a T (its kind says so);
        // sync objects are atomics only, read here as snapshots while the heap stays mapped.
        (size >= size_of::<T>() as u64 && addr % align_of::<T>() as u64 == 0).then(|| unsafe { &*(addr as *const T) })
    }
    match kind {
        ObjectKind::Data => None,
        ObjectKind::Semaphore => {
            let s = at::<crate::sync::Semaphore>(addr, size)?;
            Some(ObjectState::Semaphore { count: s.count().ok()?, waiters: s.waiters() })
        }
        ObjectKind::Event => {
            let e = at::<crate::sync::Event>(addr, size)?;
            Some(ObjectState::Event { set: e.is_set().ok()?, waiters: e.waiters() })
        }
        ObjectKind::Condvar => {
            Some(ObjectState::Condvar { waiters: at::<crate::sync::Condvar>(addr, size)?.waiters() })
        }
        ObjectKind::Mutex => {
            let m = at::<crate::sync::RawMutex>(addr, size)?;
            let owner = Some(m.owner_pid()).filter(|&p| p != 0);
            Some(ObjectState::Mutex {
                owner,
                owner_alive: owner.and_then(|_| m.owner_alive()),
                inconsistent: m.is_inconsistent(),
            })
        }
    }
}

/// A number for the type a named object was created as: its name's FNV-1a hash mixed with its
/// size and alignment. A lookup as another type is refused.
fn type_tag<T>() -> u64 {
    let h = crate::fnv::fnv1a(std::any::type_name::<T>().as_bytes());
    h ^ ((size_of::<T>() as u64) << 32) ^ align_of::<T>() as u64
}

/// The entry's name, if it is a valid one.
pub(super) fn entry_name(e: &NamedEntry) -> Option<String> {
    // Relaxed: read under the heap lock (or as a snapshot for listing).
    let len = e.name_len.load(Ordering::Relaxed) as usize;
    if len == 0 || len > crate::MAX_NAME_LEN {
        return None;
    }
    String::from_utf8(names::unpack(&e.name)[..len].to_vec()).ok()
}

/// Frees every entry (a heap reset; the caller holds the lock and frees the blocks).
pub(super) fn forget_all(entries: &[NamedEntry; MAX_NAMED]) {
    for e in entries {
        // Relaxed: under the heap lock.
        e.state.store(0, Ordering::Relaxed);
    }
}

impl Heap {
    /// The entry called `name`, published or still being initialised by its creator (so that a
    /// second creator waits instead of creating a duplicate).
    fn named_slot(&self, name: &str) -> Option<&NamedEntry> {
        // Relaxed: under the heap lock.
        self.shared().names.iter().find(|e| {
            matches!(e.state.load(Ordering::Relaxed), NAMED_READY | NAMED_INIT)
                && entry_name(e).as_deref() == Some(name)
        })
    }

    fn named_ref<T>(&self, locked: &Locked<'_>, e: &NamedEntry, name: &str) -> Result<&T> {
        // Relaxed: under the heap lock.
        let (size, tag) = (e.size.load(Ordering::Relaxed), e.type_tag.load(Ordering::Relaxed));
        if tag != type_tag::<T>() || size != size_of::<T>() as u64 {
            bail!(
                InvalidArgument,
                "named object {name:?} in heap {:?} holds another type ({size} bytes), not {} ({} bytes)",
                self.name(),
                std::any::type_name::<T>(),
                size_of::<T>()
            );
        }
        let addr = locked.named_block(e, name)?;
        if addr % align_of::<T>() as u64 != 0 {
            bail!(Corrupt, "named object {name:?} in heap {:?} is at {addr:#x}, misaligned for its type", self.name());
        }
        // SAFETY: the block is a used block of the mapped heap of at least `size` bytes (checked
        // by `named_block`), is aligned for T, was
        // allocated for a T (type tag and size match) and initialised before the entry was
        // published under the lock; it stays allocated until `remove_named`, whose contract forbids
        // outstanding references.
        Ok(unsafe { &*(addr as *const T) })
    }

    /// Finds the object called `name`, or creates it with `init()`. Exactly one process creates
    /// it however many race; the others wait for its `init` to finish. `init` runs without the
    /// heap lock, so it may allocate from this heap (a collection's first buffer). Returns the
    /// object and whether this call created it. The type must match the one it was created with.
    pub fn find_or_init<T: crate::ShmSafe + Sync>(&self, name: &str, init: impl FnOnce() -> T) -> Result<(&T, bool)> {
        self.find_or_create_raw::<T>(name, T::KIND, |p| {
            // SAFETY: `p` is a fresh, aligned block for a T, ours alone until published.
            unsafe { p.write(init()) };
            Ok(())
        })
    }

    /// Finds or creates a zero-initialised object for types that are initialised in place
    /// after creation, such as [`Semaphore`](crate::sync::Semaphore) (call its `init` next;
    /// that is safe when several processes race).
    pub fn find_or_zeroed<T: crate::InPlace + crate::ShmSafe>(&self, name: &str) -> Result<(&T, bool)> {
        self.find_or_create_raw::<T>(name, T::KIND, |p| {
            // SAFETY: `p` is a fresh, aligned block for a T; `InPlace` types are valid all-zero.
            unsafe { p.cast::<u8>().write_bytes(0, size_of::<T>()) };
            Ok(())
        })
    }

    /// Finds or creates a [`Mutex`](crate::sync::Mutex) holding `init()`, the way to share a
    /// collection between processes: every access goes through the robust lock.
    pub fn find_or_init_mutex<T: crate::ShmSafe + Send>(
        &self,
        name: &str,
        init: impl FnOnce() -> T,
    ) -> Result<(&crate::sync::Mutex<T>, bool)> {
        self.find_or_create_raw::<crate::sync::Mutex<T>>(name, ObjectKind::Mutex, |p| {
            // SAFETY: `p` is a fresh, aligned block for a Mutex<T>, ours alone until published;
            // all-zero bytes are an uninitialised mutex, which `init` then initialises in place
            // (the block never moves).
            unsafe {
                p.cast::<u8>().write_bytes(0, size_of::<crate::sync::Mutex<T>>());
                (*p).init(init())?;
            }
            Ok(())
        })
    }

    /// Named-entry states: 0 free, `NAMED_INIT` reserved while its creator runs `init`,
    /// `NAMED_READY` published.
    fn find_or_create_raw<T: Sync>(
        &self,
        name: &str,
        kind: ObjectKind,
        write: impl FnOnce(*mut T) -> Result<()>,
    ) -> Result<(&T, bool)> {
        crate::names::validate(name, "object")?;
        let deadline = std::time::Instant::now() + crate::sync::INIT_WAIT;
        let (entry, off) = loop {
            let locked = self.lock()?;
            if let Some(e) = self.named_slot(name) {
                // Relaxed: under the heap lock.
                if e.state.load(Ordering::Relaxed) == NAMED_READY {
                    return self.named_ref(&locked, e, name).map(|r| (r, false));
                }
                drop(locked);
                if std::time::Instant::now() > deadline {
                    bail!(
                        Timeout,
                        "named object {name:?} in heap {:?} is still being created after {:?}; its creator probably died \
                         (remove it with remove_named)",
                        self.name(),
                        crate::sync::INIT_WAIT
                    );
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
                continue;
            }
            // Relaxed: under the heap lock.
            let Some(e) = self.shared().names.iter().find(|e| e.state.load(Ordering::Relaxed) == 0) else {
                bail!(RegistryFull, "heap {:?} already holds {MAX_NAMED} named objects; remove one first", self.name());
            };
            let layout = Layout::new::<T>();
            let size = (layout.size() as u64).max(1);
            let off = locked.alloc(size, (layout.align() as u64).max(16), self.name(), &mut self.commit_fn())?;
            // Relaxed: under the heap lock; published to others by its release.
            names::pack(&e.name, name);
            e.name_len.store(name.len() as u16, Ordering::Relaxed);
            e.kind.store(kind as u16, Ordering::Relaxed);
            e.offset.store(off, Ordering::Relaxed);
            e.size.store(size_of::<T>() as u64, Ordering::Relaxed);
            e.type_tag.store(type_tag::<T>(), Ordering::Relaxed);
            e.state.store(NAMED_INIT, Ordering::Relaxed);
            break (e, off);
        };
        // Initialise without the heap lock; give the reservation back if `write` fails or
        // panics, so nobody waits for an object that will never exist.
        struct Undo<'h> {
            heap: &'h Heap,
            entry: &'h NamedEntry,
            off: u64,
            armed: bool,
        }
        impl Drop for Undo<'_> {
            fn drop(&mut self) {
                if self.armed {
                    if let Ok(locked) = self.heap.lock() {
                        // Relaxed: under the heap lock.
                        self.entry.state.store(0, Ordering::Relaxed);
                        let _ = locked.free(self.off, self.heap.name());
                    }
                }
            }
        }
        let mut undo = Undo { heap: self, entry, off, armed: true };
        write((self.base() + off) as *mut T)?;
        undo.armed = false;
        let locked = self.lock()?;
        // Relaxed: under the heap lock; its release publishes the initialised object.
        entry.state.store(NAMED_READY, Ordering::Relaxed);
        let r = self.named_ref(&locked, entry, name);
        drop(locked);
        r.map(|r| (r, true))
    }

    /// The object called `name`; `NotFound` if there is none.
    pub fn find<T: crate::ShmSafe + Sync>(&self, name: &str) -> Result<&T> {
        crate::names::validate(name, "object")?;
        let locked = self.lock()?;
        // Relaxed: under the heap lock. An object still being created is not found yet.
        let e = self.named_slot(name).filter(|e| e.state.load(Ordering::Relaxed) == NAMED_READY).ok_or_else(|| {
            Error::new(ErrorKind::NotFound, format!("heap {:?} has no named object {name:?}", self.name()))
        })?;
        let r = self.named_ref(&locked, e, name);
        drop(locked);
        r
    }

    /// Every named object (the classic region list). An entry whose name or block is damaged
    /// is left out (`check` reports it).
    pub fn named_objects(&self) -> Result<Vec<NamedObject>> {
        Ok(self.lock()?.named_objects())
    }

    /// Removes the object called `name` and frees its block.
    ///
    /// # Safety
    /// No process may still use a reference to it.
    pub unsafe fn remove_named(&self, name: &str) -> Result<()> {
        let locked = self.lock()?;
        let e = self.named_slot(name).ok_or_else(|| {
            Error::new(ErrorKind::NotFound, format!("heap {:?} has no named object {name:?}", self.name()))
        })?;
        // Relaxed: under the heap lock.
        e.state.store(0, Ordering::Relaxed);
        locked.tlsf().free(e.offset.load(Ordering::Relaxed)).map_err(|err| map_tlsf(err, self.name()))
    }
}

impl Locked<'_> {
    /// The address of named entry `e`'s block, after checking that its offset is a used block
    /// of the heap with room for the entry's size (a damaged entry is `Corrupt`).
    pub(super) fn named_block(&self, e: &NamedEntry, name: &str) -> Result<u64> {
        // Relaxed: under the heap lock.
        let (off, size) = (e.offset.load(Ordering::Relaxed), e.size.load(Ordering::Relaxed));
        match self.tlsf().usable_size(off) {
            Ok(usable) if usable >= size => Ok(self.section as u64 + AREA_OFFSET + off),
            Ok(usable) => bail!(
                Corrupt,
                "named object {name:?} records {size} bytes at offset {off:#x}, but the block there has {usable} usable bytes"
            ),
            Err(e) => bail!(
                Corrupt,
                "named object {name:?} records offset {off:#x}, which is not a used block of the heap ({})",
                tlsf_reason(&e)
            ),
        }
    }

    /// Every named object whose entry is intact (under the lock).
    pub(crate) fn named_objects(&self) -> Vec<NamedObject> {
        self.shared
            .names
            .iter()
            // Relaxed: under the heap lock.
            .filter(|e| e.state.load(Ordering::Relaxed) == NAMED_READY)
            .filter_map(|e| {
                let name = entry_name(e)?;
                let address = self.named_block(e, &name).ok()?;
                // Relaxed: under the heap lock.
                let size = e.size.load(Ordering::Relaxed);
                let kind = ObjectKind::from_u16(e.kind.load(Ordering::Relaxed));
                Some(NamedObject { name, address, size, kind, state: object_state(kind, address, size) })
            })
            .collect()
    }

    /// Checks the named-object table: every entry is free, or names a valid name and a used
    /// block large enough; no two blocks are shared. Returns the first violation.
    pub(crate) fn check_named(&self) -> Result<()> {
        let mut seen: Vec<u64> = Vec::new();
        for (i, e) in self.shared.names.iter().enumerate() {
            // Relaxed: under the heap lock.
            let state = e.state.load(Ordering::Relaxed);
            if state == 0 {
                continue;
            }
            if state != NAMED_READY && state != NAMED_INIT {
                bail!(Corrupt, "named-object entry {i} has state {state}, expected 0, {NAMED_INIT} or {NAMED_READY}");
            }
            let Some(name) = entry_name(e) else {
                // Relaxed: as above.
                let len = e.name_len.load(Ordering::Relaxed);
                bail!(
                    Corrupt,
                    "named-object entry {i} has no valid name (length {len}, at most {}, UTF-8)",
                    crate::MAX_NAME_LEN
                );
            };
            let addr = self
                .named_block(e, &name)
                .map_err(|err| Error::new(ErrorKind::Corrupt, format!("named-object entry {i}: {err}")))?;
            if seen.contains(&addr) {
                bail!(Corrupt, "named-object entry {i} ({name:?}) shares its block at {addr:#x} with another entry");
            }
            seen.push(addr);
        }
        Ok(())
    }
}
