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
    let (Ok(dir), Ok(fd)) =
        (crate::os::open_dir(std::path::Path::new("/")), crate::os::open_dir(std::path::Path::new("/")))
    else {
        return;
    };
    let Ok(reg) = Registry::from_bytes(dir, fd, REGISTRY_DOMAIN, data) else { return };
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
/// attached processes, and one after deletions (free slots, tombstones, a freed range).
pub fn registry_seeds() -> Vec<Vec<u8>> {
    use crate::registry::{
        CHUNK, CreateParams, Creator, Lifetime, MIN_WINDOW_BASE, MIN_WINDOW_SIZE, Registry, SectionKind,
    };
    let tmp = std::env::temp_dir().join(format!("shmgadget-fuzz-seeds-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).expect("a private temporary directory");
    let mut seeds = Vec::new();
    for (sections, deletes) in [(0usize, 0usize), (5, 0), (7, 3)] {
        let dir = crate::os::open_dir(&tmp).expect("the temporary directory opens");
        let params = CreateParams {
            window_base: MIN_WINDOW_BASE,
            window_size: MIN_WINDOW_SIZE,
            max_sections: 8,
            max_procs: 4,
            mode: 0o600,
        };
        let reg = Registry::create(dir, REGISTRY_DOMAIN, &params).expect("a seed registry");
        {
            let g = reg.lock().expect("the seed registry's lock");
            let _ = g.register_proc(4242);
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
    let (Ok(dir), Ok(fd)) =
        (crate::os::open_dir(std::path::Path::new("/")), crate::os::open_dir(std::path::Path::new("/")))
    else {
        return false;
    };
    crate::registry::Registry::from_bytes(dir, fd, REGISTRY_DOMAIN, data).is_ok_and(|r| {
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
