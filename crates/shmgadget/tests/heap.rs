//! Shared heaps across real processes, including processes killed mid-allocation.
#![cfg(unix)]

mod common;

use std::alloc::Layout;
use std::ptr::NonNull;
use std::time::{Duration, Instant};

use common::*;
use shmgadget::heap::Heap;
use shmgadget::{Domain, DomainOptions, ErrorKind};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

fn rng(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

/// Allocation traffic: random sizes 16 B..64 KiB, each block filled with a pattern and checked
/// before it is freed. Runs until `until`; returns operations done.
fn traffic(heap: &Heap, until: Instant, seed: u64) -> u64 {
    let mut seed = seed | 1;
    let mut live: Vec<(NonNull<u8>, usize, u8)> = Vec::new();
    let mut ops = 0;
    while Instant::now() < until {
        if live.len() < 64 && (live.len() < 8 || rng(&mut seed) % 2 == 0) {
            let size = 16 + (rng(&mut seed) % (64 * 1024)) as usize;
            let p = heap.alloc(Layout::from_size_align(size, 16).unwrap()).unwrap();
            let byte = (rng(&mut seed) % 255 + 1) as u8;
            // SAFETY: a fresh allocation of `size` bytes, ours alone.
            unsafe { p.as_ptr().write_bytes(byte, size) };
            live.push((p, size, byte));
        } else {
            let (p, size, byte) = live.swap_remove((rng(&mut seed) % live.len() as u64) as usize);
            // SAFETY: a live allocation of `size` bytes that only this process writes.
            let data = unsafe { std::slice::from_raw_parts(p.as_ptr(), size) };
            assert!(data.iter().all(|&b| b == byte), "block at {p:p} was overwritten by someone else");
            // SAFETY: nobody uses the block after this.
            unsafe { heap.free(p).unwrap() };
        }
        ops += 1;
    }
    for (p, _, _) in live {
        // SAFETY: as above.
        unsafe { heap.free(p).unwrap() };
    }
    ops
}

fn open_child_heap(name: &str) -> (Domain, Heap) {
    let d = Domain::attach_with(&child_domain(), &DomainOptions { must_exist: true, ..small(GIB) }).unwrap();
    let h = Heap::open(&d, name).unwrap();
    (d, h)
}

#[test]
fn four_processes_allocate_verify_and_free_in_one_heap_at_once() {
    match role().as_deref() {
        Some("worker") => {
            let (_d, heap) = open_child_heap("shared");
            let ops = traffic(&heap, Instant::now() + Duration::from_millis(1500), std::process::id() as u64);
            println!("OPS={ops}");
        }
        _ => {
            let domain = unique_domain("heap4");
            let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
            let heap = Heap::create(&d, "shared", 256 * MIB).unwrap();
            let test = "four_processes_allocate_verify_and_free_in_one_heap_at_once";
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    let domain = domain.clone();
                    std::thread::spawn(move || run(test, "worker", &domain, &[]))
                })
                .collect();
            let ops: u64 = handles.into_iter().map(|h| h.join().unwrap()["OPS"].parse::<u64>().unwrap()).sum();
            assert!(ops > 1000, "{ops} operations");
            heap.check().unwrap();
            let s = heap.stats().unwrap();
            assert_eq!(s.blocks.used_blocks, 0, "every block was freed");
            eprintln!("4 processes: {ops} alloc/free operations; {s:?}");
            drop(heap);
            d.delete_section("shared").unwrap();
            d.detach().unwrap();
            assert_clean(&domain);
        }
    }
}

#[test]
fn processes_killed_during_allocation_traffic_never_corrupt_the_heap() {
    const TEST: &str = "processes_killed_during_allocation_traffic_never_corrupt_the_heap";
    match role().as_deref() {
        Some("victim") => {
            let (_d, heap) = open_child_heap("crashy");
            println!("RUNNING");
            traffic(&heap, Instant::now() + Duration::from_secs(60), std::process::id() as u64);
        }
        Some("checker") => {
            let (_d, heap) = open_child_heap("crashy");
            heap.check().unwrap();
            let p = heap.alloc(Layout::from_size_align(1000, 64).unwrap()).unwrap();
            // SAFETY: a fresh allocation, freed right away.
            unsafe { heap.free(p).unwrap() };
            println!("RECOVERIES={}", heap.stats().unwrap().recoveries);
        }
        _ => {
            let domain = unique_domain("heapkill");
            let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
            let heap = Heap::create(&d, "crashy", 256 * MIB).unwrap();
            let mut seed = 0x9e37_79b9_u64;
            for round in 0..50 {
                let mut victim = spawn(TEST, "victim", &domain, &[]);
                wait_for_line(&mut victim, "RUNNING");
                std::thread::sleep(Duration::from_micros(200 + rng(&mut seed) % 20_000));
                kill9(&mut victim);
                // A new process finds the heap consistent (recovering it if the victim died
                // holding the lock) and allocation goes on.
                if round % 10 == 9 {
                    let r = run(TEST, "checker", &domain, &[]);
                    eprintln!("after {} kills: {} recoveries", round + 1, r["RECOVERIES"]);
                } else {
                    heap.check().unwrap_or_else(|e| panic!("round {round}: {e}"));
                    let p = heap.alloc(Layout::from_size_align(4096, 16).unwrap()).unwrap();
                    // SAFETY: a fresh allocation, freed right away.
                    unsafe { heap.free(p).unwrap() };
                }
            }
            // Blocks the victims had parked in their thread caches come back.
            heap.trim().unwrap();
            let s = heap.stats().unwrap();
            assert_eq!((s.cached_blocks, s.cached_bytes), (0, 0), "{s:?}");
            heap.check().unwrap();
            drop(heap);
            d.delete_section("crashy").unwrap();
            d.detach().unwrap();
            assert_clean(&domain);
        }
    }
}

/// The heap's lock word, as `RobustLock` lays it out: the control block's `RawMutex` at 128,
/// its robust lock 32 bytes in, the word first (the CLI's `locks.rs` pokes the same word). A
/// wrong offset fails the test below: nothing would then be taken over.
const HEAP_LOCK_WORD: u64 = 128 + 32;

/// Whether the mounted `/proc` is this process's pid namespace's (`/proc/self` names our pid):
/// only then can thread ids be judged there, and a lock word naming a gone thread be taken over.
fn proc_is_ours() -> bool {
    std::fs::read_link("/proc/self").ok().and_then(|p| p.to_str()?.parse::<u32>().ok()) == Some(std::process::id())
}

/// A process killed between taking a heap's lock word and writing its record: only the word
/// names it (the window `processes_killed_during_allocation_traffic_never_corrupt_the_heap`
/// hit on CI once, where the next locker then reported the lock as stuck). Every process of
/// the domain is in one pid namespace, so the next locker sees that thread is gone and takes
/// the lock over, recovering the heap, as for a holder killed with its record written.
#[test]
fn a_holder_killed_before_writing_its_record_is_taken_over() {
    const TEST: &str = "a_holder_killed_before_writing_its_record_is_taken_over";
    match role().as_deref() {
        Some("taker") => {
            let (_d, _heap) = open_child_heap("unrecorded");
            // Take the word as `try_lock`'s CAS does (this thread's id, the main thread's is the
            // pid), through the object's file (the same page as every mapping of it), and stop
            // there for good.
            let prefix = format!("shmgadget.{}:", child_domain());
            let dir = std::env::var("SHMGADGET_SHM_DIR").unwrap_or_else(|_| "/dev/shm".into());
            let object = std::fs::read_dir(&dir)
                .unwrap()
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .find(|f| f.starts_with(&prefix) && f.ends_with(":unrecorded"))
                .expect("the heap's object");
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().write(true).open(object_path(&object)).unwrap();
            f.write_all_at(&std::process::id().to_le_bytes(), HEAP_LOCK_WORD).unwrap();
            println!("TAKEN");
            std::thread::sleep(Duration::from_secs(60));
        }
        _ => {
            if !proc_is_ours() {
                eprintln!("skipped: the mounted /proc is not this pid namespace's");
                return;
            }
            let domain = unique_domain("heapunrec");
            let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
            let heap = Heap::create(&d, "unrecorded", 16 * MIB).unwrap();
            let before = heap.stats().unwrap().recoveries;
            let mut child = spawn(TEST, "taker", &domain, &[]);
            wait_for_line(&mut child, "TAKEN");
            kill9(&mut child);
            // Before: `Corrupt` ("held by thread N (no registration recorded), which does not
            // exist") after a second of waiting.
            heap.check().unwrap();
            let p = heap.alloc(Layout::from_size_align(1000, 64).unwrap()).unwrap();
            // SAFETY: a fresh allocation, freed right away.
            unsafe { heap.free(p).unwrap() };
            assert_eq!(heap.stats().unwrap().recoveries, before + 1, "the lock was taken over as a dead holder's");
            drop(heap);
            d.delete_section("unrecorded").unwrap();
            d.detach().unwrap();
            assert_clean(&domain);
        }
    }
}

#[test]
fn blocks_parked_in_a_killed_processs_thread_cache_return_to_the_heap() {
    const TEST: &str = "blocks_parked_in_a_killed_processs_thread_cache_return_to_the_heap";
    match role().as_deref() {
        Some("parker") => {
            let (_d, heap) = open_child_heap("parked");
            let blocks: Vec<_> =
                (0..200).map(|i| heap.alloc(Layout::from_size_align(16 + i * 8, 16).unwrap()).unwrap()).collect();
            for p in blocks {
                // SAFETY: ours, unused after this.
                unsafe { heap.free(p).unwrap() };
            }
            println!("PARKED");
            std::thread::sleep(Duration::from_secs(60));
        }
        _ => {
            let domain = unique_domain("heapparked");
            let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
            let heap = Heap::create(&d, "parked", 16 * MIB).unwrap();
            let mut child = spawn(TEST, "parker", &domain, &[]);
            wait_for_line(&mut child, "PARKED");
            let s = heap.stats().unwrap();
            assert!(s.cached_blocks > 1, "the child keeps freed blocks ready: {s:?}");
            assert_eq!(s.blocks.used_blocks, 0, "parked blocks are not counted as used: {s:?}");
            heap.check().unwrap();
            kill9(&mut child);
            // The dead thread's slot is reclaimed; trim also frees the caches' stores.
            heap.trim().unwrap();
            let s = heap.stats().unwrap();
            assert_eq!((s.cached_blocks, s.blocks.used_blocks), (0, 0), "{s:?}");
            assert_eq!(s.blocks.free_blocks, 1, "everything merged back into one free block: {s:?}");
            heap.check().unwrap();
            drop(heap);
            d.delete_section("parked").unwrap();
            d.detach().unwrap();
            assert_clean(&domain);
        }
    }
}

#[test]
fn a_16gib_heap_with_10mib_allocated_commits_at_most_12mib_and_trims_back() {
    let domain = unique_domain("heapsparse");
    let d = Domain::attach_with(&domain, &small(32 * GIB)).unwrap();
    let heap = Heap::create(&d, "big", 16 * GIB).unwrap();
    let blocks: Vec<_> =
        (0..1000).map(|_| heap.alloc(Layout::from_size_align(10 * 1024 + 496, 16).unwrap()).unwrap()).collect();
    let s = heap.stats().unwrap();
    let resident = heap.section().info().resident.unwrap();
    eprintln!("10 MiB allocated in 1000 blocks: committed {} bytes, resident {resident}", s.committed);
    assert!(s.committed <= 12 * MIB, "committed {}", s.committed);
    assert!(resident <= 12 * MIB, "resident {resident}");
    for p in blocks {
        // SAFETY: each block is ours and unused after this.
        unsafe { heap.free(p).unwrap() };
    }
    heap.check().unwrap();
    let given_back = heap.trim().unwrap();
    let after = heap.section().info().resident.unwrap();
    eprintln!("trim gave back {given_back} bytes; resident now {after}");
    assert!(after <= 2 * MIB, "trim decommitted the free tail: {after} bytes resident");
    heap.check().unwrap();
    // And it grows again on demand.
    let p = heap.alloc(Layout::from_size_align(5 * MIB as usize, 16).unwrap()).unwrap();
    // SAFETY: ours, unused after this.
    unsafe { heap.free(p).unwrap() };
    drop(heap);
    d.delete_section("big").unwrap();
    d.detach().unwrap();
    assert_clean(&domain);
}

#[test]
fn bad_inputs_are_errors_not_crashes() {
    let domain = unique_domain("heaperr");
    let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
    assert_eq!(Heap::create(&d, "tiny", 4096).unwrap_err().kind(), ErrorKind::InvalidSize);
    let heap = Heap::create(&d, "h", 4 * MIB).unwrap();
    let zero = Layout::from_size_align(0, 1).unwrap();
    assert_eq!(heap.alloc(zero).unwrap_err().kind(), ErrorKind::InvalidArgument);
    let too_aligned = Layout::from_size_align(64, 8192).unwrap();
    assert_eq!(heap.alloc(too_aligned).unwrap_err().kind(), ErrorKind::InvalidArgument);
    let absurd = Layout::from_size_align(1 << 40, 16).unwrap();
    assert_eq!(heap.alloc(absurd).unwrap_err().kind(), ErrorKind::InvalidSize);
    let big = Layout::from_size_align(3 * MIB as usize, 16).unwrap();
    let first = heap.alloc(big).unwrap();
    let err = heap.alloc(big).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::OutOfSpace, "{err}");
    // SAFETY: our allocation, unused after this.
    unsafe { heap.free(first).unwrap() };
    let p = heap.alloc(Layout::from_size_align(100, 16).unwrap()).unwrap();
    // SAFETY: the heap validates each pointer; none of these calls frees memory we still use.
    unsafe {
        let inside = NonNull::new(p.as_ptr().add(8)).unwrap();
        assert_eq!(heap.free(inside).unwrap_err().kind(), ErrorKind::InvalidArgument);
        let mut local = 0u64;
        let elsewhere = NonNull::new((&raw mut local).cast::<u8>()).unwrap();
        assert_eq!(heap.free(elsewhere).unwrap_err().kind(), ErrorKind::InvalidArgument);
        heap.free(p).unwrap();
        let double = heap.free(p).unwrap_err();
        assert_eq!(double.kind(), ErrorKind::InvalidArgument);
        assert!(double.to_string().contains("double free"), "{double}");
    }
    heap.check().unwrap();
    // A raw section is not a heap; a heap with a damaged header is refused.
    drop(d.create_section("raw", MIB, &shmgadget::SectionOptions::new()).unwrap());
    assert_eq!(Heap::open(&d, "raw").unwrap_err().kind(), ErrorKind::InvalidArgument);
    // SAFETY: overwriting the heap's magic on purpose; nobody else uses this heap.
    unsafe { heap.section().as_ptr().write_bytes(0x55, 8) };
    assert_eq!(Heap::open(&d, "h").unwrap_err().kind(), ErrorKind::Corrupt);
    drop(heap);
    d.delete_section("h").unwrap();
    d.delete_section("raw").unwrap();
    d.detach().unwrap();
    assert_clean(&domain);
}

#[test]
fn realloc_keeps_contents_and_grows_in_place_when_it_can() {
    let domain = unique_domain("heaprealloc");
    let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
    let heap = Heap::create(&d, "r", 16 * MIB).unwrap();
    // Larger than the thread caches' classes, so the rest of the heap really follows it.
    let p = heap.alloc(Layout::from_size_align(5000, 16).unwrap()).unwrap();
    // SAFETY: our allocation; realloc'd pointers replace the old ones.
    unsafe {
        p.as_ptr().write_bytes(7, 100);
        let q = heap.realloc(p, 9000).unwrap();
        assert_eq!(q, p, "the rest of the heap follows it: grows in place");
        let blocker = heap.alloc(Layout::from_size_align(64, 16).unwrap()).unwrap();
        let r = heap.realloc(q, 100_000).unwrap();
        assert_ne!(r, q, "blocked: moved");
        assert!(std::slice::from_raw_parts(r.as_ptr(), 100).iter().all(|&b| b == 7));
        heap.free(r).unwrap();
        heap.free(blocker).unwrap();
    }
    heap.check().unwrap();
    drop(heap);
    d.delete_section("r").unwrap();
    d.detach().unwrap();
    assert_clean(&domain);
}

#[test]
fn named_objects_are_created_once_and_found_by_every_process() {
    use shmgadget::sync::Semaphore;
    const TEST: &str = "named_objects_are_created_once_and_found_by_every_process";
    match role().as_deref() {
        Some("racer") => {
            let (_d, heap) = open_child_heap("objects");
            let (sem, created) = heap.find_or_zeroed::<Semaphore>("ready").unwrap();
            sem.init(0).unwrap();
            let (count, _) = heap.find_or_init::<u64>("answer", || 42).unwrap();
            // A slow initialiser: the others must wait for it, not create a second object.
            let (slow, slow_created) = heap
                .find_or_init::<u64>("slow", || {
                    std::thread::sleep(Duration::from_millis(200));
                    7
                })
                .unwrap();
            println!("CREATED={created}");
            println!("SLOW_CREATED={slow_created}");
            println!("SLOW={slow}@{:p}", slow);
            println!("ANSWER={count}");
            sem.post().unwrap();
        }
        _ => {
            let domain = unique_domain("heapnamed");
            let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
            let heap = Heap::create(&d, "objects", 4 * MIB).unwrap();
            let handles: Vec<_> = (0..6)
                .map(|_| {
                    let domain = domain.clone();
                    std::thread::spawn(move || run(TEST, "racer", &domain, &[]))
                })
                .collect();
            let reports: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
            assert_eq!(reports.iter().filter(|r| r["CREATED"] == "true").count(), 1, "{reports:?}");
            assert_eq!(reports.iter().filter(|r| r["SLOW_CREATED"] == "true").count(), 1, "{reports:?}");
            assert!(reports.iter().all(|r| r["SLOW"] == reports[0]["SLOW"]), "one object, one address: {reports:?}");
            assert!(reports.iter().all(|r| r["ANSWER"] == "42"));
            let sem = heap.find::<Semaphore>("ready").unwrap();
            assert_eq!(sem.count().unwrap(), 6, "one post per process, on the one shared semaphore");
            // The type is checked; missing names are NotFound.
            assert_eq!(heap.find::<u32>("answer").unwrap_err().kind(), ErrorKind::InvalidArgument);
            assert_eq!(heap.find::<u64>("nope").unwrap_err().kind(), ErrorKind::NotFound);
            let names: Vec<String> = heap.named_objects().unwrap().into_iter().map(|o| o.name).collect();
            assert_eq!(names.len(), 3, "{names:?}");
            // SAFETY: no reference to "answer" is used after this.
            unsafe { heap.remove_named("answer").unwrap() };
            assert_eq!(heap.find::<u64>("answer").unwrap_err().kind(), ErrorKind::NotFound);
            heap.check().unwrap();
            drop(heap);
            d.delete_section("objects").unwrap();
            d.detach().unwrap();
            assert_clean(&domain);
        }
    }
}

#[test]
fn a_shared_vector_filled_by_four_processes_is_read_back_whole_by_a_fifth() {
    use shmgadget::heap::{ShmVec, ShmVecExt};
    const N: u64 = 10_000;
    const TEST: &str = "a_shared_vector_filled_by_four_processes_is_read_back_whole_by_a_fifth";
    match role().as_deref() {
        Some("pusher") => {
            let (_d, heap) = open_child_heap("vecs");
            let me: u64 = std::env::var("INDEX").unwrap().parse().unwrap();
            let alloc = heap.allocator();
            let (v, _) = heap.find_or_init_mutex("v", || ShmVec::<u64>::new_in(alloc)).unwrap();
            for i in 0..N {
                // Each push may reallocate the buffer (allocated and freed by any process).
                v.lock().unwrap().try_push(me << 32 | i).unwrap();
            }
        }
        Some("reader") => {
            let (_d, heap) = open_child_heap("vecs");
            let v = heap.find::<shmgadget::sync::Mutex<ShmVec<u64>>>("v").unwrap();
            let g = v.lock().unwrap();
            let mut next = [0u64; 4];
            for &x in g.iter() {
                let (who, i) = ((x >> 32) as usize, x & 0xffff_ffff);
                assert_eq!(i, next[who], "producer {who}'s values arrive in order");
                next[who] += 1;
            }
            println!("LEN={}", g.len());
            println!("PER={:?}", next);
        }
        _ => {
            let domain = unique_domain("heapvec");
            let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
            let heap = Heap::create(&d, "vecs", 64 * MIB).unwrap();
            let handles: Vec<_> = (0..4)
                .map(|i| {
                    let domain = domain.clone();
                    std::thread::spawn(move || run(TEST, "pusher", &domain, &[("INDEX", i.to_string())]))
                })
                .collect();
            for h in handles {
                h.join().unwrap();
            }
            let r = run(TEST, "reader", &domain, &[]);
            assert_eq!(r["LEN"], (4 * N).to_string());
            assert_eq!(r["PER"], format!("{:?}", [N; 4]));
            // Dropping the vector's buffer from yet another process returns it to the heap.
            let v = heap.find::<shmgadget::sync::Mutex<ShmVec<u64>>>("v").unwrap();
            let old = std::mem::replace(&mut *v.lock().unwrap(), ShmVec::new_in(heap.allocator()));
            drop(old);
            heap.check().unwrap();
            assert_eq!(heap.stats().unwrap().blocks.used_blocks, 1, "only the named Mutex<ShmVec> itself");
            drop(heap);
            d.delete_section("vecs").unwrap();
            d.detach().unwrap();
            assert_clean(&domain);
        }
    }
}

#[test]
fn a_shared_hash_map_filled_by_four_processes_is_read_back_complete_by_a_fifth() {
    use shmgadget::heap::ShmHashMap;
    use shmgadget::sync::Mutex;
    const PER: u64 = 25_000;
    const TEST: &str = "a_shared_hash_map_filled_by_four_processes_is_read_back_complete_by_a_fifth";
    match role().as_deref() {
        Some("inserter") => {
            let (_d, heap) = open_child_heap("maps");
            let me: u64 = std::env::var("INDEX").unwrap().parse().unwrap();
            let alloc = heap.allocator();
            let (m, _) =
                heap.find_or_init_mutex("m", || ShmHashMap::<u64, u64>::try_new_in(alloc, 16).unwrap()).unwrap();
            for k in me * PER..(me + 1) * PER {
                m.lock().unwrap().try_insert(k, k * 3).unwrap();
            }
        }
        Some("reader") => {
            let (_d, heap) = open_child_heap("maps");
            let m = heap.find::<Mutex<ShmHashMap<u64, u64>>>("m").unwrap();
            let g = m.lock().unwrap();
            let missing = (0..4 * PER).filter(|k| g.get(k) != Some(&(k * 3))).count();
            println!("LEN={}", g.len());
            println!("MISSING={missing}");
        }
        _ => {
            let domain = unique_domain("heapmap");
            let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
            let heap = Heap::create(&d, "maps", 128 * MIB).unwrap();
            let handles: Vec<_> = (0..4)
                .map(|i| {
                    let domain = domain.clone();
                    std::thread::spawn(move || run(TEST, "inserter", &domain, &[("INDEX", i.to_string())]))
                })
                .collect();
            for h in handles {
                h.join().unwrap();
            }
            let r = run(TEST, "reader", &domain, &[]);
            assert_eq!(r["LEN"], (4 * PER).to_string());
            assert_eq!(r["MISSING"], "0");
            heap.check().unwrap();
            drop(heap);
            d.delete_section("maps").unwrap();
            d.detach().unwrap();
            assert_clean(&domain);
        }
    }
}

#[test]
fn another_process_frees_and_reallocates_a_block_from_its_address_alone() {
    const TEST: &str = "another_process_frees_and_reallocates_a_block_from_its_address_alone";
    let parse = |k: &str| usize::from_str_radix(std::env::var(k).unwrap().trim_start_matches("0x"), 16).unwrap();
    match role().as_deref() {
        Some("freer") => {
            // Attached, but never opened the heap: no Heap handle, just addresses.
            let _d = Domain::attach_with(&child_domain(), &DomainOptions { must_exist: true, ..small(GIB) }).unwrap();
            let a = NonNull::new(parse("FREE_ME") as *mut u8).unwrap();
            let b = NonNull::new(parse("GROW_ME") as *mut u8).unwrap();
            // SAFETY: the parent handed these blocks over and no longer uses them.
            unsafe {
                shmgadget::heap::free(a).unwrap();
                println!("DOUBLE={:?}", shmgadget::heap::free(a).unwrap_err().kind());
                let inside = NonNull::new(b.as_ptr().add(16)).unwrap();
                println!("INTERIOR={:?}", shmgadget::heap::free(inside).unwrap_err().kind());
                let grown = shmgadget::heap::realloc(b, 200_000).unwrap();
                let kept = std::slice::from_raw_parts(grown.as_ptr(), 64).iter().all(|&x| x == 9);
                println!("KEPT={kept}");
                println!("GROWN={:#x}", grown.as_ptr() as usize);
                let raw = NonNull::new(parse("RAW") as *mut u8).unwrap();
                println!("RAW={:?}", shmgadget::heap::free(raw).unwrap_err().kind());
                let mut local = 0u8;
                println!("OUTSIDE={:?}", shmgadget::heap::free(NonNull::from(&mut local)).unwrap_err().kind());
            }
        }
        _ => {
            let domain = unique_domain("heapfree");
            let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
            let heap = Heap::create(&d, "f", 16 * MIB).unwrap();
            let raw = d.create_section("raw", MIB, &shmgadget::SectionOptions::new().transient()).unwrap();
            let a = heap.alloc(Layout::from_size_align(1000, 16).unwrap()).unwrap();
            let b = heap.alloc(Layout::from_size_align(64, 16).unwrap()).unwrap();
            let _blocker = heap.alloc(Layout::from_size_align(64, 16).unwrap()).unwrap();
            // SAFETY: our fresh block.
            unsafe { b.as_ptr().write_bytes(9, 64) };
            let env = [
                ("FREE_ME", format!("{:#x}", a.as_ptr() as usize)),
                ("GROW_ME", format!("{:#x}", b.as_ptr() as usize)),
                ("RAW", format!("{:#x}", raw.as_ptr() as usize)),
            ];
            let r = run(TEST, "freer", &domain, &env);
            assert_eq!(r["DOUBLE"], "InvalidArgument");
            assert_eq!(r["INTERIOR"], "InvalidArgument");
            assert_eq!(r["KEPT"], "true", "realloc moved the contents");
            assert_eq!(r["RAW"], "InvalidArgument", "a raw section is not a heap");
            assert_eq!(r["OUTSIDE"], "InvalidArgument");
            let s = heap.stats().unwrap();
            assert_eq!(s.blocks.used_blocks, 2, "a was freed, b moved: the blocker and the grown block remain");
            heap.check().unwrap();
            drop((heap, raw));
            d.delete_section("f").unwrap();
            d.detach().unwrap();
            assert_clean(&domain);
        }
    }
}

shmgadget::shm_struct! {
    /// A user-defined shared type: its fields are checked to be ShmSafe at compile time.
    struct Greeting {
        text: shmgadget::heap::ShmString,
        words: shmgadget::heap::ShmVec<u32>,
        hits: std::sync::atomic::AtomicU64,
    }
}

#[test]
fn a_shared_string_and_a_user_struct_round_trip_between_processes() {
    use shmgadget::heap::{ShmString, ShmVec, ShmVecExt};
    use shmgadget::sync::Mutex;
    const TEST: &str = "a_shared_string_and_a_user_struct_round_trip_between_processes";
    match role().as_deref() {
        Some("writer") => {
            let (_d, heap) = open_child_heap("strings");
            let alloc = heap.allocator();
            let (g, _) = heap
                .find_or_init_mutex("greeting", || Greeting {
                    text: ShmString::new_in(alloc),
                    words: ShmVec::new_in(alloc),
                    hits: 0.into(),
                })
                .unwrap();
            let mut g = g.lock().unwrap();
            for w in ["héllo", " ", "wörld", " ✓"] {
                g.text.try_push_str(w).unwrap();
                let n = w.chars().count() as u32;
                g.words.try_push(n).unwrap();
            }
            g.text.try_push('!').unwrap();
            g.hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        _ => {
            let domain = unique_domain("heapstr");
            let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
            let heap = Heap::create(&d, "strings", 4 * MIB).unwrap();
            run(TEST, "writer", &domain, &[]);
            let g = heap.find::<Mutex<Greeting>>("greeting").unwrap();
            let mut g = g.lock().unwrap();
            assert_eq!(g.text, "héllo wörld ✓!");
            assert_eq!(g.text.to_string(), "héllo wörld ✓!");
            assert_eq!(g.words.as_slice(), &[5, 1, 5, 2]);
            assert_eq!(g.hits.load(std::sync::atomic::Ordering::Relaxed), 1);
            // Replaced and dropped here, in another process than the one that allocated.
            let alloc = heap.allocator();
            g.text = ShmString::try_from_str_in("short", alloc).unwrap();
            g.words = ShmVec::new_in(alloc);
            assert_eq!(g.text.len(), 5);
            drop(g);
            heap.flush_thread_cache().unwrap();
            assert_eq!(heap.stats().unwrap().blocks.used_blocks, 2, "the named mutex and the new string");
            heap.check().unwrap();
            drop(heap);
            d.delete_section("strings").unwrap();
            d.detach().unwrap();
            assert_clean(&domain);
        }
    }
}

#[test]
fn a_heap_section_too_small_for_a_header_is_refused_on_open() {
    let domain = unique_domain("heaptiny");
    let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
    let opts = shmgadget::SectionOptions::new().kind(shmgadget::SectionKind::Heap);
    let s = d.create_section("tiny", 4096, &opts).unwrap();
    drop(s);
    let e = Heap::open(&d, "tiny").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("too small for a heap header"), "{e}");
    d.delete_section("tiny").unwrap();
    d.detach().unwrap();
    assert_clean(&domain);
}

#[test]
fn a_damaged_commit_size_or_named_entry_is_reported_by_check_and_refused() {
    let domain = unique_domain("heapdmgchk");
    let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
    let heap = Heap::create(&d, "h", 8 * MIB).unwrap();
    heap.find_or_init::<u64>("answer", || 42).unwrap();
    let p = heap.alloc(Layout::from_size_align(64, 16).unwrap()).unwrap();
    // SAFETY: ours, into this thread's cache (a slot and a store now exist).
    unsafe { heap.free(p).unwrap() };
    heap.check().unwrap();
    let base = heap.section().as_ptr();
    // Finds the u64 word holding `value` in the header, at or after `from`.
    let find = |value: u64, from: usize| {
        (from / 8..(16 << 10) / 8)
            // SAFETY: inside the mapped header; a plain read of an 8-aligned word.
            .find(|&i| unsafe { base.cast::<u64>().add(i).read_volatile() } == value)
            .map(|i| i * 8)
            .unwrap_or_else(|| panic!("no word {value:#x} in the header"))
    };
    let poke = |at: usize, value: u64| {
        // SAFETY: inside the mapped header, 8-aligned: the damage another process could do.
        unsafe { base.add(at).cast::<u64>().write_volatile(value) }
    };
    // `committed` (the word after `reserved`, which holds the section size).
    let reserved_at = find(8 * MIB, 0);
    let committed = heap.stats().unwrap().committed;
    poke(reserved_at + 8, 1 << 40);
    let e = heap.check().unwrap_err();
    assert!(e.kind() == ErrorKind::Corrupt && e.to_string().contains("committed"), "{e}");
    assert_eq!(heap.trim().unwrap_err().kind(), ErrorKind::Corrupt);
    poke(reserved_at + 8, committed);
    heap.check().unwrap();
    // The named object's size (8 bytes), then its offset, made to point nowhere.
    let obj = heap.named_objects().unwrap()[0].clone();
    let off = obj.address - heap.section().as_ptr() as u64 - shmgadget::heap::AREA_OFFSET;
    let off_at = find(off, 256);
    poke(off_at, u64::MAX - 7);
    let e = heap.check().unwrap_err();
    assert!(e.to_string().contains("named-object entry"), "{e}");
    assert!(heap.named_objects().unwrap().is_empty(), "a damaged entry is not listed with a wild address");
    assert_eq!(heap.find::<u64>("answer").unwrap_err().kind(), ErrorKind::Corrupt);
    poke(off_at, off);
    assert_eq!(*heap.find::<u64>("answer").unwrap(), 42);
    heap.check().unwrap();
    drop(heap);
    d.delete_section("h").unwrap();
    d.detach().unwrap();
    assert_clean(&domain);
}

#[test]
fn a_reserved_size_and_capacity_damaged_after_open_are_reported_and_every_call_returns() {
    let domain = unique_domain("heapcap");
    let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
    let heap = Heap::create(&d, "h", 8 * MIB).unwrap();
    let p = heap.alloc(Layout::from_size_align(100_000, 16).unwrap()).unwrap();
    let q = heap.alloc(Layout::from_size_align(64, 16).unwrap()).unwrap();
    let base = heap.section().as_ptr();
    let word = |i: usize| {
        // SAFETY: word `i` < 2048 of the mapped 16 KiB header, 8-aligned.
        unsafe { base.cast::<u64>().add(i) }
    };
    let read = |i: usize| {
        // SAFETY: as for `word`; a plain read of a header word.
        unsafe { word(i).read_volatile() }
    };
    let reserved_at = (0..2048).find(|&i| read(i) == 8 * MIB).expect("reserved");
    let capacity = heap.stats().unwrap().blocks.capacity;
    let capacity_at = (reserved_at + 2..2048).find(|&i| read(i) == capacity).expect("cap");
    // SAFETY: 8-aligned words of the mapped header: the damage another process could do.
    unsafe {
        word(reserved_at).write_volatile(1 << 40);
        word(capacity_at).write_volatile(1 << 40);
    }
    let e = heap.check().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    let _ = heap.stats();
    let _ = heap.dump(1000);
    let _ = heap.alloc(Layout::from_size_align(1 << 20, 16).unwrap());
    // SAFETY: ours; the heap refuses or frees them.
    let _ = unsafe { shmgadget::heap::free(p) };
    // SAFETY: as above.
    let _ = unsafe { heap.free(q) };
    // SAFETY: as above: the original values back.
    unsafe {
        word(reserved_at).write_volatile(8 * MIB);
        word(capacity_at).write_volatile(capacity);
    }
    drop(heap);
    d.delete_section("h").unwrap();
    d.detach().unwrap();
    assert_clean(&domain);
}

#[test]
fn a_block_header_trampled_in_or_out_of_the_thread_cache_is_reported_and_never_handed_out() {
    let domain = unique_domain("heaptramp");
    let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
    let heap = Heap::create(&d, "h", 8 * MIB).unwrap();
    let layout = Layout::from_size_align(100, 16).unwrap();
    let header = |p: NonNull<u8>| {
        // SAFETY: the 8-byte size word of a block's header, 8 bytes before its payload.
        unsafe { p.as_ptr().sub(8).cast::<u64>() }
    };
    // Parked in this thread's cache (freed, top of its class), then trampled: the next
    // allocation of that class says so and does not hand the block out.
    let parked = heap.alloc(layout).unwrap();
    // SAFETY: ours, not used again before it is handed out anew.
    unsafe { heap.free(parked).unwrap() };
    // SAFETY: the block's header word, in the mapped heap: the damage a stray write does.
    let saved = unsafe { header(parked).read_volatile() };
    // SAFETY: as above.
    unsafe { header(parked).write_volatile(0x4141_4141_4141_4141) };
    let e = heap.alloc(layout).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    for _ in 0..64 {
        let p = heap.alloc(layout).unwrap();
        assert_ne!(p, parked, "a trampled block was handed out");
    }
    // SAFETY: the original header back (the block stays out of every list: leaked).
    unsafe { header(parked).write_volatile(saved) };
    // A used block whose header was trampled is refused by free and not parked either.
    let used = heap.alloc(layout).unwrap();
    // SAFETY: as above, on a block we hold.
    let saved = unsafe { header(used).read_volatile() };
    for damage in [0, saved ^ 0xffff << 48, saved | 1, saved | 4, saved + (1 << 20)] {
        // SAFETY: as above.
        unsafe { header(used).write_volatile(damage) };
        // SAFETY: the heap validates the block and refuses it.
        let e = unsafe { heap.free(used) }.unwrap_err();
        assert!(matches!(e.kind(), ErrorKind::InvalidArgument | ErrorKind::Corrupt), "{damage:#x}: {e}");
    }
    // SAFETY: as above.
    unsafe { header(used).write_volatile(saved) };
    // SAFETY: intact again: a normal free.
    unsafe { heap.free(used).unwrap() };
    drop(heap);
    d.delete_section("h").unwrap();
    d.detach().unwrap();
    assert_clean(&domain);
}

/// Reads a child's stdout up to the line `READY`, returning the line before it that starts
/// with `ADDRS ` as numbers (the rest is drained in the background; watchdog 30 s).
fn read_addresses(child: &mut std::process::Child) -> Vec<u64> {
    use std::io::BufRead;
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = std::io::BufReader::new(stdout).lines();
        let mut addrs = Vec::new();
        while let Some(Ok(l)) = lines.next() {
            if let Some(list) = l.trim().strip_prefix("ADDRS ") {
                addrs = list.split(',').map(|a| a.parse::<u64>().unwrap()).collect();
            } else if l.trim() == "READY" {
                let _ = tx.send(std::mem::take(&mut addrs));
                for _ in lines.by_ref() {}
                return;
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(30)).expect("child never reported its blocks")
}

#[test]
fn each_process_carves_its_small_blocks_from_its_own_chunk_and_a_killed_holders_chunk_comes_back() {
    const TEST: &str = "each_process_carves_its_small_blocks_from_its_own_chunk_and_a_killed_holders_chunk_comes_back";
    match role().as_deref() {
        Some("carver") => {
            let (_d, heap) = open_child_heap("chunks");
            let mut seed = std::process::id() as u64;
            // Slowly, so that the two carvers' refills alternate under the heap lock.
            let blocks: Vec<_> = (0..300)
                .map(|_| {
                    std::thread::sleep(Duration::from_micros(50));
                    let size = 16 + (rng(&mut seed) % 2048) as usize;
                    heap.alloc(Layout::from_size_align(size, 16).unwrap()).unwrap()
                })
                .collect();
            let list: Vec<String> = blocks.iter().map(|p| (p.as_ptr() as u64).to_string()).collect();
            println!("ADDRS {}", list.join(","));
            for p in blocks {
                // SAFETY: ours, unused after this.
                unsafe { heap.free(p).unwrap() };
            }
            println!("READY");
            std::thread::sleep(Duration::from_secs(60));
        }
        _ => {
            let domain = unique_domain("heapchunks");
            let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
            let heap = Heap::create(&d, "chunks", 64 * MIB).unwrap();
            let mut a = spawn(TEST, "carver", &domain, &[]);
            let mut b = spawn(TEST, "carver", &domain, &[]);
            let (from_a, from_b) = (read_addresses(&mut a), read_addresses(&mut b));
            assert_eq!((from_a.len(), from_b.len()), (300, 300));
            // In address order, the owner changes only between chunks (128 KiB each; 300
            // blocks of up to 2 KiB and the refill batches fill a few per process), not between
            // refill batches as when both took blocks from the free lists.
            let mut all: Vec<(u64, char)> =
                from_a.iter().map(|&p| (p, 'a')).chain(from_b.iter().map(|&p| (p, 'b'))).collect();
            all.sort_unstable();
            let changes = all.windows(2).filter(|w| w[0].1 != w[1].1).count();
            assert!(changes <= 16, "the two processes' blocks interleave {changes} times: {all:?}");
            let s = heap.stats().unwrap();
            assert!(s.cached_bytes >= 2 * 64 * 1024, "each keeps a chunk and its parked blocks: {s:?}");
            assert_eq!(s.blocks.used_blocks, 0, "parked blocks and chunks are not counted as used: {s:?}");
            heap.check().unwrap();
            // A killed holder's chunk and parked blocks go back when the next thread claims a
            // cache slot (this one, at its first allocation), the survivor's stay. (Our own
            // stock is given back before looking; our store stays, 4 KiB.)
            kill9(&mut a);
            let p = heap.alloc(Layout::from_size_align(100, 16).unwrap()).unwrap();
            heap.check().unwrap();
            // SAFETY: ours, unused after this.
            unsafe { heap.free(p).unwrap() };
            heap.flush_thread_cache().unwrap();
            let after = heap.stats().unwrap();
            assert!(after.cached_bytes < s.cached_bytes, "the dead carver's stock came back: {s:?} then {after:?}");
            assert!(after.cached_bytes >= 64 * 1024, "the live carver keeps its stock: {after:?}");
            kill9(&mut b);
            heap.flush_thread_cache().unwrap();
            heap.trim().unwrap();
            let s = heap.stats().unwrap();
            assert_eq!((s.cached_blocks, s.blocks.used_blocks), (0, 0), "{s:?}");
            assert_eq!(s.blocks.free_blocks, 1, "everything merged back into one free block: {s:?}");
            heap.check().unwrap();
            drop(heap);
            d.delete_section("chunks").unwrap();
            d.detach().unwrap();
            assert_clean(&domain);
        }
    }
}

/// A thread's heap cache gives its stock back when the thread exits (`LocalCache::drop`), after
/// the thread dropped its `Heap` handle, while another thread drops the last handle of the
/// deleted heap and so unmaps it. The exit flush pins the section first: it gives the stock
/// back, or finds the heap gone and leaves it; never touches it after the unmap (without the
/// pin, the child died of SIGSEGV in 10 runs of 10).
#[test]
fn threads_exiting_while_their_deleted_heap_is_unmapped_never_touch_it_afterwards() {
    const TEST: &str = "threads_exiting_while_their_deleted_heap_is_unmapped_never_touch_it_afterwards";
    const ROUNDS: u64 = 150;
    match role().as_deref() {
        Some("churn") => {
            let d = Domain::attach_with(&child_domain(), &DomainOptions { must_exist: true, ..small(GIB) }).unwrap();
            let mut seed = 0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id());
            for round in 0..ROUNDS {
                let name = format!("churn.{round}");
                let heap = std::sync::Arc::new(Heap::create(&d, &name, 4 * MIB).unwrap());
                let workers: Vec<_> = (0..4)
                    .map(|_| {
                        let heap = heap.clone();
                        std::thread::spawn(move || {
                            let blocks: Vec<_> = (0..32)
                                .map(|i| heap.alloc(Layout::from_size_align(16 + i * 24, 16).unwrap()).unwrap())
                                .collect();
                            for p in blocks {
                                // SAFETY: ours, unused after this.
                                unsafe { heap.free(p).unwrap() };
                            }
                            // The freed blocks stay in this thread's cache, flushed at its exit.
                            drop(heap);
                        })
                    })
                    .collect();
                // Unmapped in this process when the last handle goes: ours or a worker's.
                d.delete_section(&name).unwrap();
                let until = Instant::now() + Duration::from_micros(rng(&mut seed) % 300);
                while Instant::now() < until {
                    std::hint::spin_loop();
                }
                drop(heap);
                for w in workers {
                    w.join().unwrap();
                }
            }
            println!("ROUNDS={ROUNDS}");
        }
        _ => {
            let domain = unique_domain("heapexitflush");
            let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
            let report = run(TEST, "churn", &domain, &[]);
            assert_eq!(report.get("ROUNDS").map(String::as_str), Some(ROUNDS.to_string().as_str()));
            d.detach().unwrap();
            assert_clean(&domain);
        }
    }
}
