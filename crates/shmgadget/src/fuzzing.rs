//! Entry points for the fuzz targets in `fuzz/` and for the corpus replay test: each takes
//! arbitrary bytes as the contents of a shared structure, copies them into private memory
//! and runs the code that reads that structure from shared memory. The property is the one
//! DESIGN.md promises: whatever another process wrote there, every call returns an error or a
//! correct result; nothing panics, reads out of bounds or loops for ever. Not part of the API.

use crate::heap::tlsf::{Tlsf, TlsfControl};

/// Bytes at the start of a TLSF input that choose operations.
const TLSF_OPS: usize = 32;
/// Largest block area a TLSF input gets (keeps each run fast).
const TLSF_MAX_AREA: usize = 1 << 16;

/// Private memory, 16-aligned and zero-padded, filled from `bytes`: the stand-in for a
/// shared mapping another process wrote.
struct Aligned {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl Aligned {
    /// Views the whole buffer's bytes (for building seeds).
    fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for `layout.size()` initialised bytes; the borrow of `self`
        // keeps them alive and no view writes them meanwhile.
        unsafe { std::slice::from_raw_parts(self.ptr, self.layout.size()) }
    }

    fn new(bytes: &[u8], len: usize) -> Aligned {
        let layout =
            std::alloc::Layout::from_size_align(len.max(16).next_multiple_of(16), 16).expect("fuzz buffers are small");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        let n = bytes.len().min(layout.size());
        // SAFETY: `ptr` is valid for `layout.size()` bytes and `n` does not exceed it; the
        // source is a distinct slice.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), ptr, n) };
        Aligned { ptr, layout }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout; every view into it borrowed the
        // enclosing function's locals, which are gone by now.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

/// A TLSF control block and block area taken from `data` (first [`TLSF_OPS`] bytes choose up
/// to eight operations, then the control block, then the area), then: statistics, the block
/// dump, `check`, a sequence of allocations, frees (of live blocks and of arbitrary offsets),
/// resizes, growth, shrinking and cache marks, and `recover`.
///
/// Asserted: after a successful `recover` (or from a heap `check` accepts), `check` passes
/// after every operation: the allocator never turns a valid heap invalid, and recovery always
/// yields a valid heap or an error.
pub fn tlsf(data: &[u8]) {
    let ctl_len = size_of::<TlsfControl>();
    let ops = &data[..data.len().min(TLSF_OPS)];
    let rest = data.get(TLSF_OPS..).unwrap_or(&[]);
    let ctl_mem = Aligned::new(rest, ctl_len);
    let area_bytes = rest.get(ctl_len..).unwrap_or(&[]);
    let area_len = (area_bytes.len().min(TLSF_MAX_AREA) / 16 * 16).max(64);
    let area = Aligned::new(area_bytes, area_len);
    // SAFETY: `ctl_mem` is 16-aligned and `size_of::<TlsfControl>()` bytes long; TlsfControl
    // is atomics only, so every bit pattern is a valid value, and all access is through shared
    // references to atomics. It outlives `ctl` (dropped at the end of this function).
    let ctl = unsafe { &*ctl_mem.ptr.cast::<TlsfControl>() };
    // SAFETY: `area` is 16-aligned and `area_len` bytes are valid for reads and writes until
    // the end of this function; only this view touches them.
    let t = unsafe { Tlsf::new(ctl, area.ptr, area_len as u64) };
    let _ = t.stats();
    let _ = t.largest_request();
    let _ = t.blocks(4096);
    let mut valid = t.check().is_ok();
    let mut live: Vec<u64> = Vec::new();
    for op in ops.chunks(4) {
        let [kind, a, b, c] = <[u8; 4]>::try_from(op).unwrap_or([op[0], 0, 0, 0]);
        let n = u16::from_le_bytes([a, b]) as u64;
        let result = match kind % 10 {
            0..=2 => t.alloc(n.max(1), 16 << (c % 4)).map(|p| live.push(p)),
            3 | 4 if !live.is_empty() => {
                let p = live.swap_remove(c as usize % live.len());
                t.free(p)
            }
            5 => {
                // An arbitrary offset. A real used block (ours, or one the input's heap holds)
                // frees cleanly. Anything else is a program error the allocator catches only
                // as far as O(1) checks can: a payload that forges a header and its successor's
                // back size passes them, so after such a free the heap is judged afresh.
                let off = n * 16;
                let real =
                    t.blocks(1 << 16).is_ok_and(|b| b.iter().any(|b| b.offset + 16 == off && !b.free && !b.cached));
                if let Some(i) = live.iter().position(|&p| p == off) {
                    live.swap_remove(i);
                }
                let r = t.free(off);
                if !real {
                    valid = t.check().is_ok();
                }
                r
            }
            6 if !live.is_empty() => t.resize_in_place(live[c as usize % live.len()], n.max(1)).map(|_| ()),
            7 => t.grow(t.stats().capacity.saturating_add(n * 16)),
            8 => t.shrink(n * 16).map(|_| ()),
            _ => {
                let r = t.recover();
                if r.is_ok() {
                    live.clear(); // a rebuilt heap keeps its used blocks, but we stop freeing them
                    if let Err(e) = t.check() {
                        panic!("recover succeeded but check fails: {e:?}");
                    }
                    valid = true;
                }
                r.map(|_| ())
            }
        };
        let _ = result;
        if valid {
            if let Err(e) = t.check() {
                panic!("operation {kind} on a valid heap left it invalid: {e:?}");
            }
        }
        let _ = t.stats();
        let _ = t.largest_request();
    }
    let _ = t.blocks(4096);
}

/// Inputs for [`tlsf`] taken from real allocator states (an empty area, one after a mix of
/// allocations and frees, one with parked blocks), to seed the fuzzer's corpus and the replay
/// test.
pub fn tlsf_seeds() -> Vec<Vec<u8>> {
    let ctl_len = size_of::<TlsfControl>();
    let mut seeds = Vec::new();
    for (cap, steps) in [(4096usize, 0usize), (16384, 40), (65536, 200)] {
        let ctl_mem = Aligned::new(&[], ctl_len);
        let area = Aligned::new(&[], cap);
        // SAFETY: as in `tlsf`: 16-aligned private memory of the right sizes, alive until the
        // end of this iteration.
        let ctl = unsafe { &*ctl_mem.ptr.cast::<TlsfControl>() };
        // SAFETY: as above.
        let t = unsafe { Tlsf::new(ctl, area.ptr, cap as u64) };
        t.init(cap as u64).expect("a fresh area initialises");
        let mut live = Vec::new();
        for i in 0..steps {
            if i % 3 == 2 && !live.is_empty() {
                let p = live.swap_remove(i % live.len());
                t.free(p).expect("freeing a live block");
            } else if let Ok(p) = t.alloc(1 + (i as u64 * 53) % 700, 16) {
                if i % 7 == 0 {
                    t.cache_mark(p).expect("parking a used block"); // parked: never freed here
                } else {
                    live.push(p);
                }
            }
        }
        t.check().expect("a real heap state is valid");
        // Ops: alloc, free, bad free, resize, grow, shrink, recover, alloc.
        let mut seed =
            vec![0, 64, 0, 0, 3, 0, 0, 1, 5, 3, 0, 0, 6, 32, 0, 0, 7, 0, 1, 0, 8, 0, 0, 0, 9, 0, 0, 0, 1, 16, 1, 2];
        // SAFETY: both buffers are valid for their lengths and no view writes them now.
        unsafe {
            seed.extend_from_slice(std::slice::from_raw_parts(ctl_mem.ptr, ctl_len));
            seed.extend_from_slice(std::slice::from_raw_parts(area.ptr, cap));
        }
        seeds.push(seed);
    }
    seeds
}

/// Domain name every registry input must record (the seeds do).
const REGISTRY_DOMAIN: &str = "fuzz";

/// A registry object's contents taken from `data`, read through a validating parse on private
/// memory (as `domains`, `ls` and window selection read other users' registries): header
/// validation, the full table scan with and without the locked-only checks, the unlocked
/// readers (`entries`, `procs`, `read_entry`, `lookup_offset`, `free_runs`, `token_alive`).
///
/// Asserted: every record handed out lies inside the window and has a valid name; when the
/// locked scan finds nothing wrong, the chunk table leads each live section's first chunk to
/// that section (so the fault handler finds what `ls` lists).
pub fn registry(data: &[u8]) {
    // Inputs starting with `b'P'` are patches over a real registry (one of the seeds, chosen by
    // the next byte): then (u16 offset, u32 value) records, each written at its offset. Most
    // raw inputs fail header validation; patches reach the entry and table checks at once.
    if let [b'P', pick, patches @ ..] = data {
        let seeds = seeds_cached();
        let Some(seed) = seeds.get(*pick as usize % seeds.len().max(1)) else { return };
        let mut bytes = seed.clone();
        for p in patches.chunks_exact(6) {
            let at = u16::from_le_bytes([p[0], p[1]]) as usize;
            if at + 4 <= bytes.len() {
                bytes[at..at + 4].copy_from_slice(&p[2..6]);
            }
        }
        return registry_bytes(&bytes);
    }
    registry_bytes(data)
}

/// The seeds, made once per process (each `registry_seeds` call creates files).
fn seeds_cached() -> &'static [Vec<u8>] {
    static SEEDS: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
    SEEDS.get_or_init(registry_seeds)
}

fn registry_bytes(data: &[u8]) {
    use crate::registry::{LIVE, Registry};
    let Ok(dir) = crate::os::Dir::open(std::path::Path::new("/")) else { return };
    let Ok(reg) = Registry::from_bytes(dir, REGISTRY_DOMAIN, data) else { return };
    let scan = reg.scan(true);
    let loose = reg.scan(false);
    for rec in scan.entries.iter().chain(&loose.entries).chain(&reg.entries()) {
        assert!(rec.offset + rec.span() <= reg.window_size, "a record outside the window: {rec:?}");
        assert!(!rec.name.as_str().is_empty() && rec.name.as_str() != "?", "a record with a bad name: {rec:?}");
    }
    let _ = scan.describe();
    let _ = reg.procs();
    for slot in 0..reg.max_sections.min(256) {
        let _ = reg.read_entry(slot);
    }
    if scan.is_sound() {
        for rec in scan.entries.iter().filter(|r| r.state == LIVE) {
            let found = reg.lookup_offset(rec.offset);
            assert!(
                found.is_some_and(|f| f.slot == rec.slot),
                "a sound registry's chunk table does not lead to live section {rec:?}"
            );
        }
    }
    if reg.window_size <= 1 << 30 {
        let _ = reg.free_runs(0, reg.window_size);
        for off in (0..reg.window_size).step_by(crate::registry::CHUNK as usize) {
            let _ = reg.lookup_offset(off);
        }
    }
    for token in [
        0u64,
        1,
        1 << 32 | 1,
        u64::MAX,
        u64::from_le_bytes(data.get(..8).and_then(|b| b.try_into().ok()).unwrap_or([0; 8])),
    ] {
        let _ = reg.proc_alive(token);
    }
}

/// Inputs for [`registry`] from real registries (made in a private temporary directory, not
/// in any shm directory): an empty one, one with sections of every kind and state and
/// attached processes, one after deletions (free slots, tombstones, a freed range), and one
/// grown to a second segment.
pub fn registry_seeds() -> Vec<Vec<u8>> {
    use crate::registry::{
        CHUNK, CreateParams, Creator, Lifetime, MIN_WINDOW_BASE, MIN_WINDOW_SIZE, Registry, SectionKind,
    };
    let tmp = std::env::temp_dir().join(format!("shmgadget-fuzz-seeds-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).expect("a private temporary directory");
    let mut seeds = Vec::new();
    // The last one has two segments (300 section slots, four chunks each), the second backed
    // because its fifth section's chunk lies there.
    for (sections, deletes, max_sections) in [(0usize, 0usize, 8), (5, 0, 8), (7, 3, 8), (6, 1, 300)] {
        let dir = crate::os::Dir::open(&tmp).expect("the temporary directory opens");
        let params = CreateParams {
            window_base: MIN_WINDOW_BASE,
            window_size: MIN_WINDOW_SIZE,
            max_sections,
            max_procs: 4,
            mode: 0o600,
        };
        let reg = Registry::create(dir, REGISTRY_DOMAIN, &params).expect("a seed registry");
        {
            let g = reg.lock().expect("the seed registry's lock");
            let _ = g.register_proc(4242, 0);
            let kinds = [SectionKind::Raw, SectionKind::Heap, SectionKind::Queue];
            let mut recs = Vec::new();
            for i in 0..sections {
                let lifetime = if i % 2 == 0 { Lifetime::Persistent } else { Lifetime::Transient };
                let creator = Creator { token: (1u64 << 32) | 4242, ready: i % 3 != 1 };
                let rec = g
                    .begin_create(&format!("s{i}"), kinds[i % 3], lifetime, 0o600, CHUNK / 2 + i as u64 * 4096, creator)
                    .expect("room in the seed registry");
                if i != sections - 1 {
                    g.finish_create(rec.slot); // the last one stays CREATING
                }
                recs.push(rec);
            }
            for rec in recs.iter().take(deletes) {
                let _ = g.remove(rec);
            }
        }
        let object = crate::names::registry_object(REGISTRY_DOMAIN);
        seeds.push(std::fs::read(tmp.join(&object)).expect("the seed registry reads back"));
        let _ = std::fs::remove_file(tmp.join(&object));
    }
    let _ = std::fs::remove_dir_all(&tmp);
    seeds
}

/// Whether `data` parses as a registry whose full (locked) scan finds no damage: the seeds
/// must, or the scan would call real registries damaged.
pub fn registry_is_sound(data: &[u8]) -> bool {
    let Ok(dir) = crate::os::Dir::open(std::path::Path::new("/")) else { return false };
    crate::registry::Registry::from_bytes(dir, REGISTRY_DOMAIN, data).is_ok_and(|r| {
        let scan = r.scan(true);
        assert!(scan.is_sound(), "{:?}", scan.describe());
        scan.is_sound()
    })
}

/// Bytes at the start of a heap input that choose operations.
const HEAP_OPS: usize = 48;

/// A whole heap section image taken from `data` (first [`HEAP_OPS`] bytes choose up to twelve
/// operations, then the heap header with its allocator control block, named-object table and
/// cache slots, then the block area, which also holds the cache stores), run through the code
/// `Heap` and the CLI use: statistics, the block dump, `check` (block chain, named objects,
/// cache slots and stores), the named-object listing and lookup, cache reclaim, store release,
/// alloc/free/resize, trim, reset and recovery. The lock word is replaced by a fresh lock.
///
/// Asserted: from a heap `check` accepts, every operation keeps `check` passing; listed named
/// objects lie inside the image.
pub fn heap(data: &[u8]) {
    use crate::heap::{AREA_OFFSET, fuzz};
    let ops = &data[..data.len().min(HEAP_OPS)];
    let rest = data.get(HEAP_OPS..).unwrap_or(&[]);
    let area_bytes = rest.get(fuzz::HEADER_LEN..).unwrap_or(&[]);
    let area_len = (area_bytes.len().min(TLSF_MAX_AREA) / 16 * 16).max(64);
    let len = AREA_OFFSET as usize + area_len;
    let mut image = rest[..rest.len().min(fuzz::HEADER_LEN)].to_vec();
    image.resize(AREA_OFFSET as usize, 0);
    image.extend_from_slice(&area_bytes[..area_bytes.len().min(area_len)]);
    let mem = Aligned::new(&image, len);
    // SAFETY: `mem` is 16-aligned, `len` bytes (at least AREA_OFFSET + 64), private to this
    // call and dropped after it.
    unsafe { fuzz::exercise(mem.ptr, len as u64, ops) };
}

/// Inputs for [`heap`] from real heap states built in private memory (empty; with blocks,
/// named objects and thread-cache stores holding parked blocks), to seed the fuzzer's corpus
/// and the replay test.
pub fn heap_seeds() -> Vec<Vec<u8>> {
    use crate::heap::{AREA_OFFSET, fuzz};
    let mut seeds = Vec::new();
    for (area, named, cached, steps) in [(4096usize, 0, 0, 0), (16384, 3, 2, 30), (65536, 8, 4, 120)] {
        let len = AREA_OFFSET as usize + area;
        let mem = Aligned::new(&[], len);
        // SAFETY: as in `heap`: private, 16-aligned, `len` bytes, alive for the call.
        unsafe { fuzz::build(mem.ptr, len as u64, named, cached, steps) };
        // Ops: alloc, free, stats, reclaim, release stores, named remove, trim, bad free,
        // resize, recover, reset, alloc.
        let mut seed = vec![
            0, 64, 0, 0, 2, 0, 0, 1, 11, 0, 0, 0, 4, 0, 0, 0, 5, 0, 0, 0, 6, 0, 0, 1, 7, 0, 0, 0, 3, 3, 0, 0, 10, 32,
            0, 0, 9, 0, 0, 0, 8, 0, 0, 0, 1, 16, 1, 2,
        ];
        let b = mem.bytes();
        seed.extend_from_slice(&b[..fuzz::HEADER_LEN]);
        seed.extend_from_slice(&b[AREA_OFFSET as usize..len]);
        seeds.push(seed);
    }
    seeds
}

// ------------------------------------------------------------------ queues
// (The queue targets: `queue_bytes`, `queue_slots` and their seeds. Kept in one block.)

use crate::error::ErrorKind;
use crate::queue::{ByteQueue, QueueShared, SlotQueue};

/// Bytes at the start of a queue input that choose operations.
const QUEUE_OPS: usize = 32;
/// Largest ring a queue input gets (keeps each run fast).
const QUEUE_MAX_RING: usize = 1 << 16;

impl Aligned {
    /// Like [`Aligned::new`], aligned to `align` (a power of two, at least 16).
    fn with_align(bytes: &[u8], len: usize, align: usize) -> Aligned {
        let layout = std::alloc::Layout::from_size_align(len.max(16).next_multiple_of(align), align)
            .expect("fuzz buffers are small");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        let n = bytes.len().min(layout.size());
        // SAFETY: as in `new`.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), ptr, n) };
        Aligned { ptr, layout }
    }
}

/// A queue header and ring from `data` (first [`QUEUE_OPS`] bytes choose operations, then the
/// header, then the ring, at most [`QUEUE_MAX_RING`] bytes).
fn queue_parts(data: &[u8]) -> (&[u8], Aligned, Aligned, u64) {
    let hdr_len = size_of::<QueueShared>();
    let ops = &data[..data.len().min(QUEUE_OPS)];
    let rest = data.get(QUEUE_OPS..).unwrap_or(&[]);
    let hdr = Aligned::with_align(rest, hdr_len, align_of::<QueueShared>());
    let ring_bytes = rest.get(hdr_len..).unwrap_or(&[]);
    let ring_len = ring_bytes.len().clamp(64, QUEUE_MAX_RING).next_multiple_of(16);
    let ring = Aligned::new(ring_bytes, ring_len);
    (ops, hdr, ring, ring_len as u64)
}

/// A byte queue over arbitrary header and ring bytes, through the code the library and the
/// CLI run on a section: validation on open, inspection, the receiver's and sender's attach
/// checks, `try_recv`, `recv_timeout`, `recv_into`, `try_send`, `send_timeout`, batching and
/// detaching, in an order the input chooses.
///
/// Asserted, besides "no panic, no wild access, no hang": once the receiver has found the
/// queue empty with the sender attached (everything published), the two agree on the
/// positions, and from then on every message received is the next one sent, byte for byte,
/// and no call reports damage.
pub fn queue_bytes(data: &[u8]) {
    let (ops, hdr_mem, ring, ring_len) = queue_parts(data);
    let hdr_ptr = std::ptr::NonNull::new(hdr_mem.ptr.cast::<QueueShared>()).expect("allocated");
    // SAFETY: `hdr_mem` is aligned for QueueShared and at least its size; atomics only, so any
    // bytes are a value; it outlives every use here.
    let hdr = unsafe { hdr_ptr.as_ref() };
    let peer = |t: u64| (t as u32, t != 0);
    let _ = crate::queue::inspect_header(hdr, "(fuzz)", ring_len, &peer);
    // SAFETY: both buffers are valid, aligned, alive until the end of this function (after
    // `q`), and touched only through `q`.
    let Ok(q) = (unsafe { ByteQueue::from_raw(hdr_ptr, ring.ptr, ring_len) }) else { return };
    let mut tx: Option<crate::queue::ByteSender<'_>> = None;
    let mut rx: Option<crate::queue::ByteReceiver<'_>> = None;
    // Messages sent since the two sides agreed, not yet received (None: not agreed yet).
    let mut model: Option<std::collections::VecDeque<Vec<u8>>> = None;
    let mut n = 0u8;
    let healthy = |model: &Option<_>, what: &str, e: &crate::Error| {
        assert!(model.is_none() || e.kind() != ErrorKind::Corrupt, "{what} on a healthy queue: {e}");
    };
    for op in ops.chunks(2) {
        let [kind, arg] = <[u8; 2]>::try_from(op).unwrap_or([op[0], 0]);
        match kind % 12 {
            0 if rx.is_none() => match q.receiver() {
                Ok(r) => rx = Some(r),
                Err(e) => healthy(&model, "receiver", &e),
            },
            1 | 2 => {
                let Some(r) = rx.as_mut() else { continue };
                let mut got = r.try_recv().map(|m| m.to_vec());
                if got.as_ref().is_err_and(|e| e.kind() == ErrorKind::WouldBlock)
                    && let Some(t) = tx.as_mut()
                {
                    t.flush();
                    got = r.try_recv().map(|m| m.to_vec());
                    if got.as_ref().is_err_and(|e| e.kind() == ErrorKind::WouldBlock) {
                        // Empty with everything published: from here on the two sides agree.
                        if let Some(m) = &model {
                            assert!(m.is_empty(), "{} messages sent and lost", m.len());
                        }
                        model = Some(Default::default());
                    }
                }
                match got {
                    Ok(m) => {
                        assert!(m.len() <= q.max_message());
                        if let Some(model) = &mut model {
                            let want = model.pop_front().expect("a message nobody sent");
                            assert_eq!(m, want, "a message changed in the ring");
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) => {
                        healthy(&model, "try_recv", &e);
                        model = None;
                    }
                }
            }
            3 => {
                let Some(r) = rx.as_mut() else { continue };
                let mut buf = vec![0u8; arg as usize * 8];
                match r.recv_into(&mut buf, Some(std::time::Duration::ZERO)) {
                    Ok(len) => {
                        if let Some(model) = &mut model {
                            let want = model.pop_front().expect("a message nobody sent");
                            assert_eq!(&buf[..len], &want[..], "a message changed in the ring");
                        }
                    }
                    Err(e) if matches!(e.kind(), ErrorKind::Timeout | ErrorKind::InvalidSize) => {}
                    Err(e) => {
                        healthy(&model, "recv_into", &e);
                        model = None;
                    }
                }
            }
            4 => {
                let Some(r) = rx.as_mut() else { continue };
                match r.recv_timeout(std::time::Duration::ZERO) {
                    Ok(m) => {
                        if let Some(model) = &mut model {
                            let want = model.pop_front().expect("a message nobody sent");
                            assert_eq!(&*m, &want[..], "a message changed in the ring");
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::Timeout => {}
                    Err(e) => {
                        healthy(&model, "recv_timeout", &e);
                        model = None;
                    }
                }
            }
            5 if tx.is_none() => match q.sender() {
                Ok(t) => tx = Some(t),
                Err(e) => healthy(&model, "sender", &e),
            },
            6..=8 => {
                let Some(t) = tx.as_mut() else { continue };
                n = n.wrapping_add(1);
                let msg = vec![n; arg as usize * (1 + kind as usize % 3)];
                let r = if kind % 12 == 8 { t.send_timeout(&msg, std::time::Duration::ZERO) } else { t.try_send(&msg) };
                match r {
                    Ok(()) => {
                        if let Some(model) = &mut model {
                            model.push_back(msg);
                        }
                    }
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Timeout) => {}
                    Err(e) if e.kind() == ErrorKind::InvalidSize => assert!(msg.len() > q.max_message()),
                    Err(e) => {
                        healthy(&model, "send", &e);
                        model = None;
                    }
                }
            }
            9 => {
                if let Some(t) = tx.as_mut() {
                    t.set_batch(arg as u64 * 16);
                }
            }
            10 => {
                // Detach one side (the next attach checks the positions again).
                if arg % 2 == 0 { rx = None } else { tx = None }
            }
            _ => {
                let r = crate::queue::inspect_header(hdr, "(fuzz)", ring_len, &peer);
                if let Err(e) = &r {
                    healthy(&model, "inspect", e);
                }
            }
        }
    }
    drop(rx);
    drop(tx);
    let _ = crate::queue::inspect_header(hdr, "(fuzz)", ring_len, &peer);
}

/// A slot queue of `u64` over arbitrary header and slot bytes, through the code the library
/// and the CLI run on a section: validation on open, inspection, attach, `try_send`,
/// `send_timeout`, `try_recv`, `recv_timeout` and detaching, with up to two senders and two
/// receivers, in an order the input chooses. Asserted: no panic, no wild access, no hang; and
/// once the queue was seen empty and consistent, every value received was sent, in order.
pub fn queue_slots(data: &[u8]) {
    let (ops, hdr_mem, ring, ring_len) = queue_parts(data);
    let hdr_ptr = std::ptr::NonNull::new(hdr_mem.ptr.cast::<QueueShared>()).expect("allocated");
    // SAFETY: as in `queue_bytes`.
    let hdr = unsafe { hdr_ptr.as_ref() };
    let peer = |t: u64| (t as u32, t != 0);
    let _ = crate::queue::inspect_header(hdr, "(fuzz)", ring_len, &peer);
    // SAFETY: as in `queue_bytes`; the ring is 16-aligned.
    let Ok(q) = (unsafe { SlotQueue::<u64>::from_raw(hdr_ptr, ring.ptr, ring_len) }) else { return };
    let mut txs = [None, None];
    let mut rxs = [None, None];
    let mut next = 0u64;
    for op in ops.chunks(2) {
        let [kind, arg] = <[u8; 2]>::try_from(op).unwrap_or([op[0], 0]);
        let i = arg as usize % 2;
        match kind % 8 {
            0 if rxs[i].is_none() => rxs[i] = q.receiver().ok(),
            1 if txs[i].is_none() => txs[i] = q.sender().ok(),
            2 | 3 => {
                if let Some(t) = txs[i].as_mut() {
                    next += 1;
                    let _ =
                        if kind % 8 == 2 { t.try_send(next) } else { t.send_timeout(next, std::time::Duration::ZERO) };
                }
            }
            4 | 5 => {
                if let Some(r) = rxs[i].as_mut() {
                    let _ = if kind % 8 == 4 { r.try_recv() } else { r.recv_timeout(std::time::Duration::ZERO) };
                }
            }
            6 => {
                if arg & 2 == 0 {
                    rxs[i] = None
                } else {
                    txs[i] = None
                }
            }
            _ => {
                let _ = crate::queue::inspect_header(hdr, "(fuzz)", ring_len, &peer);
            }
        }
    }
    drop(rxs);
    drop(txs);
    let _ = crate::queue::inspect_header(hdr, "(fuzz)", ring_len, &peer);
}

/// Inputs for [`queue_bytes`] from real byte queues: empty, with messages waiting (one
/// wrapped), and after a receiver left holding one; each with an operation mix.
pub fn queue_bytes_seeds() -> Vec<Vec<u8>> {
    let hdr_len = size_of::<QueueShared>();
    let mut seeds = Vec::new();
    for (cap, msgs, recvs) in [(4096u64, 0usize, 0usize), (4096, 30, 10), (8192, 200, 150), (1024, 12, 3)] {
        let hdr_mem = Aligned::with_align(&[], hdr_len, align_of::<QueueShared>());
        let ring = Aligned::new(&[], cap as usize);
        let hdr_ptr = std::ptr::NonNull::new(hdr_mem.ptr.cast::<QueueShared>()).expect("allocated");
        // SAFETY: as in `queue_bytes`.
        ByteQueue::init_raw(unsafe { hdr_ptr.as_ref() }, cap);
        {
            // SAFETY: as in `queue_bytes`.
            let q = unsafe { ByteQueue::from_raw(hdr_ptr, ring.ptr, cap) }.expect("a fresh header validates");
            let mut tx = q.sender().expect("first sender");
            let mut rx = q.receiver().expect("first receiver");
            for i in 0..msgs {
                if tx.try_send(&vec![i as u8; 1 + (i * 37) % 100]).is_err() {
                    let _ = rx.try_recv();
                }
                if i < recvs {
                    let _ = rx.try_recv();
                }
            }
            if msgs > 0 {
                std::mem::forget(rx.try_recv()); // held when the receiver left
            }
        }
        // Ops: receiver, recv, sender, send, recv, send wrapped, recv_into, batch, send,
        // inspect, recv, detach, receiver, recv, recv_timeout, inspect.
        let mut seed =
            vec![0, 0, 1, 0, 5, 0, 6, 20, 2, 0, 7, 90, 3, 40, 9, 4, 8, 3, 11, 0, 1, 0, 10, 0, 0, 0, 2, 0, 4, 0, 11, 0];
        // SAFETY: both buffers are valid for their lengths and no view writes them now.
        unsafe {
            seed.extend_from_slice(std::slice::from_raw_parts(hdr_mem.ptr, hdr_len));
            seed.extend_from_slice(std::slice::from_raw_parts(ring.ptr, cap as usize));
        }
        seeds.push(seed);
    }
    seeds
}

/// Inputs for [`queue_slots`] from real slot queues of `u64`: empty, partly full, full, and
/// after several laps.
pub fn queue_slots_seeds() -> Vec<Vec<u8>> {
    let hdr_len = size_of::<QueueShared>();
    let slot = SlotQueue::<u64>::slot_bytes().expect("u64 fits a slot");
    let mut seeds = Vec::new();
    for (cap, sends, recvs) in [(4u64, 0u64, 0u64), (16, 10, 3), (8, 8, 0), (32, 200, 190)] {
        let ring_len = (cap * slot) as usize;
        let hdr_mem = Aligned::with_align(&[], hdr_len, align_of::<QueueShared>());
        let ring = Aligned::new(&[], ring_len);
        let hdr_ptr = std::ptr::NonNull::new(hdr_mem.ptr.cast::<QueueShared>()).expect("allocated");
        // SAFETY: as in `queue_bytes`; the ring holds `cap` slots.
        unsafe { SlotQueue::<u64>::init_raw(hdr_ptr.as_ref(), ring.ptr, cap) }.expect("u64 fits a slot");
        {
            // SAFETY: as in `queue_bytes`.
            let q = unsafe { SlotQueue::<u64>::from_raw(hdr_ptr, ring.ptr, ring_len as u64) }
                .expect("a fresh header validates");
            let mut tx = q.sender().expect("first sender");
            let mut rx = q.receiver().expect("first receiver");
            let mut received = 0;
            for i in 0..sends {
                if (tx.try_send(i).is_err() || (received < recvs && i % 3 == 0)) && rx.try_recv().is_ok() {
                    received += 1;
                }
            }
        }
        // Ops: receiver, sender, send, send, recv, recv, sender 2, send 2, recv_timeout,
        // inspect, detach, receiver, recv, send_timeout, recv, inspect.
        let mut seed =
            vec![0, 0, 1, 0, 2, 0, 3, 0, 4, 0, 4, 0, 1, 1, 2, 1, 5, 0, 7, 0, 6, 0, 0, 0, 4, 0, 3, 1, 5, 0, 7, 0];
        // SAFETY: both buffers are valid for their lengths and no view writes them now.
        unsafe {
            seed.extend_from_slice(std::slice::from_raw_parts(hdr_mem.ptr, hdr_len));
            seed.extend_from_slice(std::slice::from_raw_parts(ring.ptr, ring_len));
        }
        seeds.push(seed);
    }
    seeds
}
