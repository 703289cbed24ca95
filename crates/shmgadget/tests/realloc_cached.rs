//! `Heap::realloc_cached` (the C library's `shm_realloc`): small blocks resize through the
//! thread cache, keep their contents, and leave the heap exactly accounted for.
#![cfg(unix)]

mod common;

use std::alloc::Layout;

use shmgadget::Domain;
use shmgadget::heap::Heap;

#[test]
fn realloc_cached_keeps_contents_and_blocks_that_still_fit_and_leaves_a_sound_heap() {
    let name = common::unique_domain("realloc-cached");
    let domain = Domain::attach_with(&name, &common::small(1 << 30)).unwrap();
    let heap = Heap::create(&domain, "h", 8 << 20).unwrap();
    let mut p = heap.alloc(Layout::from_size_align(1000, 16).unwrap()).unwrap();
    // SAFETY: a fresh block of 1000 bytes.
    unsafe { std::ptr::write_bytes(p.as_ptr(), 0x5a, 1000) };
    // A size that still fits (and needs at least half of the block) keeps the block.
    // SAFETY: `p` is a live block of `heap`; only the returned pointer is used afterwards.
    let same = unsafe { heap.realloc_cached(p, 900) }.unwrap();
    assert_eq!(same, p);
    let mut len = 900usize;
    for size in [3000usize, 64, 4096, 16, 2000, 100_000, 500] {
        // SAFETY: as above.
        let q = unsafe { heap.realloc_cached(p, size) }.unwrap();
        let kept = len.min(size);
        // SAFETY: `q` is a live block of at least `size` bytes.
        let bytes = unsafe { std::slice::from_raw_parts(q.as_ptr(), kept) };
        assert!(bytes.iter().all(|&b| b == 0x5a), "contents lost resizing to {size}");
        // SAFETY: as above.
        unsafe { std::ptr::write_bytes(q.as_ptr(), 0x5a, size) };
        p = q;
        len = size;
        heap.check().unwrap();
    }
    // The old block of a move is gone: freeing it again is refused.
    // SAFETY: `p` is live; `moved` replaces it.
    let moved = unsafe { heap.realloc_cached(p, 4000) }.unwrap();
    assert_ne!(moved, p);
    // SAFETY: a double free is reported, not performed.
    assert!(unsafe { heap.free(p) }.is_err());
    // SAFETY: the live block.
    unsafe { heap.free(moved) }.unwrap();
    heap.flush_thread_cache().unwrap();
    heap.check().unwrap();
    assert_eq!(heap.stats().unwrap().blocks.used_blocks, 0);
    drop(heap);
    domain.delete_section("h").unwrap();
    domain.detach().unwrap();
    common::assert_clean(&name);
}
