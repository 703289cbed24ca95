//! Shared-heap allocation costs next to the system allocator, on the same random size mix
//! (16 B to 4 KiB), in the same run.
//!
//! * `pairs/malloc` and `pairs/shmgadget`: one alloc + one free, keeping 64 blocks live so the
//!   allocator works on a realistic free list (the ratio is what counts).
//! * `two_processes/shmgadget`: the same loop while a second process (this binary re-executed)
//!   runs it on the same heap; reported time is per pair in this process. Compare with
//!   `pairs/shmgadget` for the throughput of two processes sharing one heap.
//!
//! Run: `cargo bench -p shmgadget --bench heap`.

use std::alloc::Layout;
use std::hint::black_box;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use criterion::Criterion;
use shmgadget::heap::Heap;
use shmgadget::{Domain, DomainOptions, SectionOptions};

const PARTNER: &str = "SHMG_BENCH_PARTNER";
const LIVE: usize = 64;

fn sizes() -> Vec<usize> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            16 + (x % 4081) as usize
        })
        .collect()
}

/// One step of the loop: replace a live block with a new one of the next size.
fn run_pairs(
    iters: u64,
    sizes: &[usize],
    mut alloc: impl FnMut(usize) -> NonNull<u8>,
    mut free: impl FnMut(NonNull<u8>),
) -> Duration {
    let mut live: Vec<NonNull<u8>> = (0..LIVE).map(|i| alloc(sizes[i])).collect();
    let start = Instant::now();
    for i in 0..iters as usize {
        let slot = i % LIVE;
        free(live[slot]);
        live[slot] = black_box(alloc(sizes[i % sizes.len()]));
    }
    let t = start.elapsed();
    for p in live {
        free(p);
    }
    t
}

fn heap_fns(heap: &Heap) -> (impl FnMut(usize) -> NonNull<u8> + '_, impl FnMut(NonNull<u8>) + '_) {
    (
        move |size| heap.alloc(Layout::from_size_align(size, 16).unwrap()).unwrap(),
        // SAFETY: every pointer freed came from `heap.alloc` and is not used afterwards.
        move |p| unsafe { heap.free(p).unwrap() },
    )
}

fn pairs(c: &mut Criterion, heap: &Heap) {
    let sizes = sizes();
    let mut g = c.benchmark_group("pairs");
    g.measurement_time(Duration::from_secs(3));
    g.bench_function("malloc", |b| {
        b.iter_custom(|iters| {
            run_pairs(
                iters,
                &sizes,
                // SAFETY: plain malloc/free of non-zero sizes; every pointer is freed once.
                |size| NonNull::new(unsafe { libc::malloc(size) }.cast::<u8>()).unwrap(),
                // SAFETY: as above.
                |p| unsafe { libc::free(p.as_ptr().cast()) },
            )
        })
    });
    g.bench_function("shmgadget", |b| {
        b.iter_custom(|iters| {
            let (a, f) = heap_fns(heap);
            run_pairs(iters, &sizes, a, f)
        })
    });
    g.finish();
}

fn two_processes(c: &mut Criterion, domain: &Domain, heap: &Heap) {
    let stop = domain.create_section("stop", 4096, &SectionOptions::new().transient()).unwrap();
    let flag = stop.at::<AtomicU32>(0).unwrap();
    let mut partner = std::process::Command::new(std::env::current_exe().unwrap())
        .env(PARTNER, "heap")
        .env("DOMAIN", domain.name())
        .spawn()
        .unwrap();
    // Let the partner start allocating.
    std::thread::sleep(Duration::from_millis(200));
    let sizes = sizes();
    let mut g = c.benchmark_group("two_processes");
    g.measurement_time(Duration::from_secs(3));
    g.bench_function("shmgadget", |b| {
        b.iter_custom(|iters| {
            let (a, f) = heap_fns(heap);
            run_pairs(iters, &sizes, a, f)
        })
    });
    g.finish();
    flag.store(1, Ordering::Relaxed);
    partner.wait().unwrap();
}

fn partner() {
    let opts = DomainOptions { window_size: 1 << 30, must_exist: true, ..Default::default() };
    let domain = Domain::attach_with(&std::env::var("DOMAIN").unwrap(), &opts).unwrap();
    let heap = Heap::open(&domain, "bench").unwrap();
    let stop = domain.open_section("stop").unwrap();
    let flag = stop.at::<AtomicU32>(0).unwrap();
    let sizes = sizes();
    while flag.load(Ordering::Relaxed) == 0 {
        let (a, f) = heap_fns(&heap);
        run_pairs(10_000, &sizes, a, f);
    }
}

fn main() {
    if std::env::var(PARTNER).is_ok() {
        partner();
        return;
    }
    let name = format!("bench-heap-{}", std::process::id());
    let domain = Domain::attach_with(&name, &DomainOptions { window_size: 1 << 30, ..Default::default() }).unwrap();
    let heap = Heap::create(&domain, "bench", 256 << 20).unwrap();
    let mut c = Criterion::default().configure_from_args();
    pairs(&mut c, &heap);
    two_processes(&mut c, &domain, &heap);
    c.final_summary();
    drop(heap);
    domain.delete_section("bench").unwrap();
    domain.detach().unwrap();
}
