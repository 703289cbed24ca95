//! Guard pages after large heap blocks (issue 16, guard mode), across real processes.
#![cfg(unix)]

mod common;

use std::alloc::Layout;
use std::os::unix::process::ExitStatusExt;

use common::*;
use shmgadget::Domain;
use shmgadget::heap::{Heap, HeapOptions};

const GIB: u64 = 1 << 30;
const PAGE: usize = 4096;

/// Runs a child (extra environment `env`, guard mode unset unless `env` sets it) and returns
/// its exit status, stdout and stderr.
fn run(test: &str, role: &str, domain: &str, env: &[(&str, &str)]) -> (std::process::ExitStatus, String, String) {
    run_capturing(test, role, domain, |c| {
        c.env_remove("SHMGADGET_HEAP_GUARD").envs(env.iter().copied());
    })
}

fn write_byte(p: *mut u8, v: u8) {
    // SAFETY: callers pass addresses inside the heap's mapped section (possibly a guard page,
    // which is the point of the test).
    unsafe { p.write_volatile(v) }
}

fn read_byte(p: *const u8) -> u8 {
    // SAFETY: as for `write_byte`.
    unsafe { p.read_volatile() }
}

/// The child: opens heap "h", allocates `SIZE` bytes (alignment 1), fills them, then writes
/// one byte past the end. Prints the block's address first.
fn overrun_child() {
    const SIZE: usize = 3 * PAGE + 100;
    let d = Domain::attach_with(&child_domain(), &small(GIB)).unwrap();
    let h = Heap::open(&d, "h").unwrap();
    let p = h.alloc(Layout::from_size_align(SIZE, 1).unwrap()).unwrap().as_ptr();
    println!("BLOCK={:#x}", p as usize);
    println!("GUARDED={}", h.guard_pages());
    for i in 0..SIZE {
        write_byte(p.wrapping_add(i), i as u8);
    }
    println!("INSIDE=ok");
    write_byte(p.wrapping_add(SIZE), 0xee);
    println!("SURVIVED");
}

#[test]
fn a_write_one_byte_past_a_guarded_block_kills_the_writer_with_a_report_naming_the_block() {
    const TEST: &str = "a_write_one_byte_past_a_guarded_block_kills_the_writer_with_a_report_naming_the_block";
    if role().is_some() {
        return overrun_child();
    }
    let domain = unique_domain("guard-overrun");
    let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
    let h = Heap::create(&d, "h", 64 << 20).unwrap();

    let (status, out, err) = run(TEST, "child", &domain, &[("SHMGADGET_HEAP_GUARD", "1")]);
    assert_eq!(status.signal(), Some(libc::SIGSEGV), "{status:?}\n{out}\n{err}");
    assert!(out.contains("GUARDED=true") && out.contains("INSIDE=ok"), "writes inside the block work: {out}");
    assert!(!out.contains("SURVIVED"), "the overrun must not go through: {out}");
    let block = out.lines().find_map(|l| l.strip_prefix("BLOCK=")).expect("the child printed its block").to_owned();
    assert!(
        err.contains(&format!(
            "heap overrun: access to {:#x}",
            usize::from_str_radix(&block[2..], 16).unwrap() + 3 * PAGE + 100
        )) && err.contains(&format!("0 bytes past the end of the block at {block} ({} bytes)", 3 * PAGE + 100))
            && err.contains("in section \"h\" of domain")
            && err.contains("nothing is remapped"),
        "the crash names the block and its heap: {err}"
    );
    // The block's end was pinned to a page end: the byte past it starts a page.
    let end = usize::from_str_radix(&block[2..], 16).unwrap() + 3 * PAGE + 100;
    assert_eq!(end % PAGE, 0, "block {block} ends at a page boundary");

    // Without guard mode the same program overwrites the next byte silently.
    let (status, out, err) = run(TEST, "child", &domain, &[]);
    assert!(status.success(), "{status:?}\n{out}\n{err}");
    assert!(out.contains("GUARDED=false") && out.contains("SURVIVED"), "{out}");
    assert!(!err.contains("heap overrun"), "{err}");

    // The crashed child's block is leaked, but the heap is sound.
    h.check().unwrap();
    drop(h);
    d.delete_section("h").unwrap();
    d.detach().unwrap();
    assert_clean(&domain);
}

#[test]
fn a_guarded_block_freed_gives_its_guard_page_back_and_the_heap_stays_sound() {
    let domain = unique_domain("guard-free");
    let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
    let h = Heap::create_with(&d, "h", 64 << 20, HeapOptions::new().guard_pages(true)).unwrap();
    assert!(h.guard_pages());
    let before = h.stats().unwrap();
    let layout = Layout::from_size_align(2 * PAGE, 16).unwrap();
    let p = h.alloc(layout).unwrap();
    assert_eq!((p.as_ptr() as usize + 2 * PAGE) % PAGE, 0, "the block ends at a page end");
    assert_eq!(h.usable_size(p).unwrap(), 2 * PAGE);
    let guard = p.as_ptr().wrapping_add(2 * PAGE);
    assert_eq!(shmgadget::query(guard as usize).protection, Some("none"), "the page after it is a guard");
    assert_eq!(shmgadget::query(p.as_ptr() as usize).protection, Some("read_write"));
    // A size whose record lands right at the block's start (span - data = 40 bytes) is still
    // recognised as guarded when freed.
    let tight = h.alloc(Layout::from_size_align(2 * PAGE - 40, 1).unwrap()).unwrap();
    assert_eq!(shmgadget::query(tight.as_ptr() as usize + 2 * PAGE - 40).protection, Some("none"));
    // SAFETY: from this heap, not used afterwards.
    unsafe { h.free(tight).unwrap() };
    // Small blocks are not guarded.
    let small_block = h.alloc(Layout::from_size_align(64, 8).unwrap()).unwrap();
    h.check().unwrap();

    // Realloc moves a guarded block to a new guarded block, contents kept.
    write_byte(p.as_ptr(), 42);
    // SAFETY: `p` came from this heap and is not used after this.
    let q = unsafe { h.realloc(p, 5 * PAGE) }.unwrap();
    assert_eq!(read_byte(q.as_ptr()), 42);
    assert_eq!((q.as_ptr() as usize + 5 * PAGE) % PAGE, 0);
    assert_eq!(shmgadget::query(guard as usize).protection, Some("read_write"), "the old guard is gone");
    write_byte(guard, 1);

    // Free lifts the guard: the page is ordinary heap memory again.
    let qguard = q.as_ptr().wrapping_add(5 * PAGE);
    assert_eq!(shmgadget::query(qguard as usize).protection, Some("none"));
    // SAFETY: from this heap, not used afterwards.
    unsafe { h.free(q).unwrap() };
    assert_eq!(shmgadget::query(qguard as usize).protection, Some("read_write"));
    write_byte(qguard, 1);
    // A double free is an error, not a second free.
    // SAFETY: a deliberate double free, which the heap must reject.
    let e = unsafe { h.free(q) }.unwrap_err();
    assert_eq!(e.kind(), shmgadget::ErrorKind::InvalidArgument, "{e}");
    // SAFETY: from this heap.
    unsafe { h.free(small_block).unwrap() };
    h.check().unwrap();
    let after = h.stats().unwrap();
    assert_eq!(after.blocks.used_blocks, before.blocks.used_blocks, "every block went back");
    drop(h);
    d.delete_section("h").unwrap();
    d.detach().unwrap();
    assert_clean(&domain);
}

#[test]
fn a_guarded_block_freed_by_another_process_leaves_no_stale_guard_behind() {
    const TEST: &str = "a_guarded_block_freed_by_another_process_leaves_no_stale_guard_behind";
    if role().is_some() {
        // The freer: not in guard mode, frees by address alone (`heap::free`).
        let d = Domain::attach_with(&child_domain(), &small(GIB)).unwrap();
        let addr = usize::from_str_radix(std::env::var("BLOCK").unwrap().trim_start_matches("0x"), 16).unwrap();
        // SAFETY: the parent handed this block over and no longer uses it.
        unsafe { shmgadget::heap::free(std::ptr::NonNull::new(addr as *mut u8).unwrap()).unwrap() };
        println!("FREED");
        drop(d);
        return;
    }
    let domain = unique_domain("guard-xfree");
    let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
    let h = Heap::create_with(&d, "h", 64 << 20, HeapOptions::new().guard_pages(true)).unwrap();
    let used_before = h.stats().unwrap().blocks.used_blocks;
    let p = h.alloc(Layout::from_size_align(4 * PAGE, 64).unwrap()).unwrap();
    let guard = p.as_ptr().wrapping_add(4 * PAGE);
    assert_eq!(shmgadget::query(guard as usize).protection, Some("none"));
    let block = format!("{:#x}", p.as_ptr() as usize);
    let (status, out, err) = run(TEST, "child", &domain, &[("BLOCK", &block)]);
    assert!(status.success() && out.contains("FREED"), "{status:?}\n{out}\n{err}");
    // The memory went back to the heap; this process still has the guard page, stale. An
    // access to it is an ordinary access now: the handler lifts the stale guard.
    write_byte(guard, 7);
    assert_eq!(read_byte(guard), 7);
    assert_eq!(shmgadget::query(guard as usize).protection, Some("read_write"));
    // And a new block over that memory is usable end to end, without guards.
    let mut plain = Heap::open(&d, "h").unwrap();
    plain.set_guard_pages(false);
    let big = plain.alloc(Layout::from_size_align(8 * PAGE, 4096).unwrap()).unwrap();
    for i in (0..8 * PAGE).step_by(512) {
        write_byte(big.as_ptr().wrapping_add(i), 3);
    }
    h.check().unwrap();
    let st = h.stats().unwrap();
    assert_eq!(st.blocks.used_blocks, used_before + 1, "only the new block is used: {st:?}");
    drop((plain, h));
    d.delete_section("h").unwrap();
    d.detach().unwrap();
    assert_clean(&domain);
}
