//! Memory-manager costs (issue 16), each next to its reference in the same run.
//!
//! * `random_reads/4k_pages` and `random_reads/2m_pages`: random 8-byte reads over a 1 GiB
//!   section, committed and touched first, on `/dev/shm` (4 KiB pages) and on a hugetlbfs
//!   mount (2 MiB pages). Reported time is per read. The huge half reserves 513 huge pages
//!   (`/proc/sys/vm/nr_hugepages`, the registry takes one) and mounts a hugetlbfs in a
//!   temporary directory, then restores both; without root, or when the kernel cannot give
//!   the pages, it is skipped with the reason printed.
//! * `heap_pairs/dev_shm` and `heap_pairs/file`: one alloc + one free (16 B to 4 KiB, 64
//!   blocks live) on a heap in `/dev/shm` and on a file-backed heap (`Heap::create_in_file`,
//!   a file in the temporary directory).
//!
//! Run: `cargo bench -p shmgadget --bench memory`.

use std::alloc::Layout;
use std::hint::black_box;
use std::path::PathBuf;
use std::process::Command;
use std::ptr::NonNull;
use std::time::{Duration, Instant};

use criterion::Criterion;
use shmgadget::heap::Heap;
use shmgadget::{Domain, DomainOptions, SectionOptions};

const GIB: u64 = 1 << 30;
const READS: u64 = 1 << 16;

fn options(dir: Option<PathBuf>) -> DomainOptions {
    DomainOptions { window_size: 8 * GIB, shm_dir: dir, ..Default::default() }
}

/// `iters` batches of `READS` random 8-byte reads over `[base, base + len)`; time per read.
fn random_reads(base: *const u8, len: u64, iters: u64) -> Duration {
    let words = len / 8;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut sum = 0u64;
    let start = Instant::now();
    for _ in 0..iters * READS {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // SAFETY: the index is below `words`, inside the committed, mapped section.
        sum = sum.wrapping_add(unsafe { base.cast::<u64>().add((x % words) as usize).read_volatile() });
    }
    black_box(sum);
    start.elapsed() / READS as u32
}

/// A 1 GiB section in the domain, committed and every page touched.
fn big_section(d: &Domain) -> shmgadget::Section {
    let s = d.create_section("reads", GIB, &SectionOptions::new().transient()).expect("create the 1 GiB section");
    s.commit(GIB).expect("commit 1 GiB");
    let page = s.page_size() as usize;
    for off in (0..GIB as usize).step_by(page.min(4096)) {
        // SAFETY: inside the committed section.
        unsafe { s.as_ptr().add(off).cast::<u64>().write_volatile(off as u64) };
    }
    s
}

/// A hugetlbfs mount with huge pages reserved for it; restored on drop.
struct Huge {
    dir: PathBuf,
    old: u64,
}

fn pages() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/vm/nr_hugepages").ok()?.trim().parse().ok()
}

impl Huge {
    fn new(n: u64) -> Result<Huge, String> {
        let old = pages().ok_or("no /proc/sys/vm/nr_hugepages")?;
        std::fs::write("/proc/sys/vm/nr_hugepages", (old + n).to_string())
            .map_err(|e| format!("cannot write /proc/sys/vm/nr_hugepages (root needed): {e}"))?;
        let huge = Huge { dir: std::env::temp_dir().join(format!("shmg-bench-huge-{}", std::process::id())), old };
        let got = pages().unwrap_or(0);
        if got < old + n {
            return Err(format!("asked for {} huge pages, the kernel gave {got} (memory too fragmented?)", old + n));
        }
        std::fs::create_dir_all(&huge.dir).map_err(|e| format!("cannot create {}: {e}", huge.dir.display()))?;
        let ok = Command::new("mount")
            .args(["-t", "hugetlbfs", "-o", "pagesize=2M,mode=0700", "none"])
            .arg(&huge.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return Err("mount -t hugetlbfs failed".into());
        }
        Ok(huge)
    }
}

impl Drop for Huge {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
        let _ = std::fs::remove_dir(&self.dir);
        let _ = std::fs::write("/proc/sys/vm/nr_hugepages", self.old.to_string());
    }
}

fn reads(c: &mut Criterion) {
    let mut g = c.benchmark_group("random_reads");
    g.measurement_time(Duration::from_secs(4));
    {
        let d = Domain::attach_with(&format!("bench-mem-4k-{}", std::process::id()), &options(None)).unwrap();
        let s = big_section(&d);
        assert_eq!(s.page_size(), 4096);
        g.bench_function("4k_pages", |b| b.iter_custom(|iters| random_reads(s.as_ptr(), GIB, iters)));
        drop(s);
        d.detach().unwrap();
    }
    match Huge::new(GIB / (2 << 20) + 1) {
        Err(why) => println!("random_reads/2m_pages SKIPPED: {why}"),
        Ok(huge) => {
            let d =
                Domain::attach_with(&format!("bench-mem-2m-{}", std::process::id()), &options(Some(huge.dir.clone())))
                    .unwrap();
            let s = big_section(&d);
            assert_eq!(s.page_size(), 2 << 20, "the section is on huge pages");
            g.bench_function("2m_pages", |b| b.iter_custom(|iters| random_reads(s.as_ptr(), GIB, iters)));
            drop(s);
            d.detach().unwrap();
            drop(huge);
        }
    }
    g.finish();
}

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

/// `iters` alloc + free pairs, 64 blocks live.
fn pairs(heap: &Heap, sizes: &[usize], iters: u64) -> Duration {
    let alloc = |size: usize| heap.alloc(Layout::from_size_align(size, 16).unwrap()).unwrap();
    // SAFETY: every pointer freed came from `heap.alloc` and is not used afterwards.
    let free = |p: NonNull<u8>| unsafe { heap.free(p).unwrap() };
    let mut live: Vec<NonNull<u8>> = (0..64).map(|i| alloc(sizes[i])).collect();
    let start = Instant::now();
    for i in 0..iters as usize {
        let slot = i % 64;
        free(live[slot]);
        live[slot] = black_box(alloc(sizes[i % sizes.len()]));
    }
    let t = start.elapsed();
    for p in live {
        free(p);
    }
    t
}

fn heaps(c: &mut Criterion) {
    let sizes = sizes();
    let d = Domain::attach_with(&format!("bench-mem-heap-{}", std::process::id()), &options(None)).unwrap();
    let shm = Heap::create(&d, "shm", 256 << 20).unwrap();
    let path = std::env::temp_dir().join(format!("shmg-bench-heap-{}.shmg", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let (file, _) = Heap::create_in_file(&d, "file", &path, 256 << 20).unwrap();
    let mut g = c.benchmark_group("heap_pairs");
    g.measurement_time(Duration::from_secs(3));
    g.bench_function("dev_shm", |b| b.iter_custom(|iters| pairs(&shm, &sizes, iters)));
    g.bench_function("file", |b| b.iter_custom(|iters| pairs(&file, &sizes, iters)));
    g.finish();
    drop((shm, file));
    d.delete_section("shm").unwrap();
    d.delete_section("file").unwrap();
    d.detach().unwrap();
    let _ = std::fs::remove_file(&path);
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    reads(&mut c);
    heaps(&mut c);
    c.final_summary();
}
