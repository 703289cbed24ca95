//! Eager mode (no fault handler): every call that starts from a bare address maps the section
//! it reaches, so blocks of a heap created after this process attached can be freed,
//! reallocated and handed over without a crash.
#![cfg(unix)]

mod common;

use std::alloc::Layout;
use std::io::{BufRead, BufReader, Write};
use std::ptr::NonNull;
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use shmgadget::heap::{self, Heap, ShmAlloc, ShmBox, ShmVec, ShmVecExt};
use shmgadget::queue::{BlockAddr, SlotQueue};
use shmgadget::{Domain, DomainOptions, SectionOptions};

const GIB: u64 = 1 << 30;
const PATTERN_LEN: usize = 1000;

fn pattern(i: usize) -> u8 {
    (i % 251) as u8
}

fn parse_addr(s: &str) -> usize {
    usize::from_str_radix(s.trim_start_matches("0x"), 16).unwrap()
}

#[test]
fn eager_mode_frees_reallocs_and_takes_over_blocks_of_a_heap_created_after_attach() {
    const TEST: &str = "eager_mode_frees_reallocs_and_takes_over_blocks_of_a_heap_created_after_attach";
    match role().as_deref() {
        Some("eager") => {
            let opts = DomainOptions { must_exist: true, ..small(GIB) };
            assert!(opts.eager, "SHMGADGET_EAGER=1 selects eager mode");
            let d = Domain::attach_with(&child_domain(), &opts).unwrap();
            assert!(!shmgadget::handler_installed());
            // Both exist before the heap: mapped at attach.
            let early = d.open_section("early").unwrap();
            let q = SlotQueue::<BlockAddr>::open(&d, "handover").unwrap();
            println!("READY");
            let mut line = String::new();
            std::io::stdin().read_line(&mut line).unwrap();
            let addrs: Vec<usize> = line.split_whitespace().map(parse_addr).collect();
            let (a, b) = (addrs[0], addrs[1]);

            // heap::free of a block whose heap this process never mapped.
            // SAFETY: the parent allocated `a` for us to free and never uses it again.
            unsafe { heap::free(NonNull::new(a as *mut u8).unwrap()) }.unwrap();
            println!("FREED=1");

            // heap::realloc of another: moved (the heap is empty enough) with its contents.
            // SAFETY: as above, for `b`; we use only the returned pointer afterwards.
            let nb = unsafe { heap::realloc(NonNull::new(b as *mut u8).unwrap(), 200_000) }.unwrap();
            // SAFETY: the block holds at least PATTERN_LEN bytes copied from the old one.
            let data = unsafe { std::slice::from_raw_parts(nb.as_ptr(), PATTERN_LEN) };
            let kept = data.iter().enumerate().all(|(i, &x)| x == pattern(i));
            println!("REALLOC={:#x} KEPT={kept}", nb.as_ptr() as usize);

            // An allocator read from shared memory (written by the parent after it created the
            // heap) and a block handed over through a queue: zero-copy take-over.
            // SAFETY: the parent wrote a valid ShmAlloc at the start of "early" before sending
            // the line above.
            let alloc: ShmAlloc = unsafe { early.as_ptr().cast::<ShmAlloc>().read_volatile() };
            let addr = q.receiver().unwrap().recv_timeout(Duration::from_secs(30)).unwrap();
            // SAFETY: the parent gave the box up when it sent its address; we own it now.
            let boxed: ShmBox<[u64; 512]> = unsafe { addr.into_box(alloc) };
            println!("BOX_SUM={}", boxed.iter().sum::<u64>());
            drop(boxed);

            // A vector in that heap grows and is freed through the allocator alone.
            let mut v: ShmVec<u64> = ShmVec::new_in(alloc);
            for i in 0..10_000 {
                v.try_push(i).unwrap();
            }
            println!("VEC_SUM={}", v.iter().sum::<u64>());
            drop(v);
            println!("MAPS={}", shmgadget::first_touch_maps());
            drop((q, early, d));
        }
        _ => {
            let domain = unique_domain("eager-late");
            let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
            let early = d.create_section("early", 4096, &SectionOptions::new()).unwrap();
            let q = SlotQueue::<BlockAddr>::create(&d, "handover", 4).unwrap();
            let mut child = spawn(TEST, "eager", &domain, &[("SHMGADGET_EAGER", "1".to_owned())]);
            let (tx, rx) = mpsc::channel();
            let out = child.stdout.take().unwrap();
            std::thread::spawn(move || {
                for l in BufReader::new(out).lines().map_while(Result::ok) {
                    let _ = tx.send(l);
                }
            });
            let mut report = std::collections::HashMap::new();
            let mut next = |want: &str| loop {
                let l = rx
                    .recv_timeout(Duration::from_secs(30))
                    .unwrap_or_else(|e| panic!("the eager child stopped before reporting {want} (it crashed?): {e}"));
                if let Some((k, v)) = l.split_once('=') {
                    report.insert(k.to_owned(), v.to_owned());
                }
                if l.starts_with(want) {
                    return l;
                }
            };
            next("READY");

            // The heap is created only now, after the eager child attached.
            let heap = Heap::create(&d, "late", 16 << 20).unwrap();
            let a = heap.alloc(Layout::from_size_align(64, 16).unwrap()).unwrap();
            let b = heap.alloc(Layout::from_size_align(PATTERN_LEN, 16).unwrap()).unwrap();
            // SAFETY: a fresh block of PATTERN_LEN bytes, ours alone until we hand it over.
            unsafe { (0..PATTERN_LEN).for_each(|i| b.as_ptr().add(i).write(pattern(i))) };
            // SAFETY: "early" is ours and at least a page long; ShmAlloc is an address.
            unsafe { early.as_ptr().cast::<ShmAlloc>().write_volatile(heap.allocator()) };
            let boxed = ShmBox::try_new_in([3u64; 512], heap.allocator()).unwrap();
            q.sender().unwrap().send(BlockAddr::from_box(boxed)).unwrap();
            writeln!(child.stdin.as_mut().unwrap(), "{:#x} {:#x}", a.as_ptr() as usize, b.as_ptr() as usize).unwrap();

            next("MAPS=");
            let status = wait(&mut child, Duration::from_secs(30));
            assert!(status.success(), "the eager child did not crash: {status}");
            assert_eq!(report["FREED"], "1");
            assert!(report["REALLOC"].ends_with("KEPT=true"), "{report:?}");
            assert_eq!(report["BOX_SUM"], (3 * 512).to_string());
            assert_eq!(report["VEC_SUM"], (0..10_000u64).sum::<u64>().to_string());
            assert_eq!(report["MAPS"], "0", "nothing was mapped on first touch");

            heap.check().unwrap();
            let s = heap.stats().unwrap();
            assert_eq!(s.blocks.used_blocks, 1, "only the reallocated block is left: {s:?}");
            let nb = parse_addr(report["REALLOC"].split_whitespace().next().unwrap());
            // SAFETY: the child reallocated `b` to `nb` and gave it up when it exited.
            let data = unsafe { std::slice::from_raw_parts(nb as *const u8, PATTERN_LEN) };
            assert!(data.iter().enumerate().all(|(i, &x)| x == pattern(i)));
            // SAFETY: nobody uses it any more.
            unsafe { heap.free(NonNull::new(nb as *mut u8).unwrap()) }.unwrap();
            assert_eq!(heap.stats().unwrap().blocks.used_blocks, 0);

            drop((q, early, heap));
            for name in ["handover", "early", "late"] {
                d.delete_section(name).unwrap();
            }
            d.detach().unwrap();
            assert_clean(&domain);
        }
    }
}
