//! Section and domain lifecycle costs, each next to the raw system calls measured in the same
//! run.
//!
//! * `raw_shm`: `shm_open(O_CREAT|O_EXCL)` + `ftruncate` + `mmap`, then `munmap` + `close` +
//!   `shm_unlink` (the reference).
//! * `section_create_map`: `Domain::create_section` (registry lock, placement, object creation,
//!   `MAP_FIXED` mapping at the shared address), then drop + `delete_section` (unlink, unmap).
//! * `domain_attach_detach`: creating a domain's registry, reserving its 1 TiB window and a
//!   process slot, then detaching (which removes the registry again).
//! * `commit/section_commit_64k` against `commit/raw_fallocate_64k`: `Section::commit` of an
//!   already committed 64 KiB prefix (the `fallocate` finds nothing to do, so what remains is
//!   the library's own cost: reopening the object by name, checking it, closing it, and the
//!   registry bookkeeping) next to a bare `fallocate` on a descriptor kept open.
//!
//! Run: `cargo bench -p shmgadget --bench sections`. The ratios are what matter; absolute
//! numbers move with the machine's load.

use std::ffi::CString;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use shmgadget::{Domain, DomainOptions, SectionOptions};

const SIZE: usize = 1 << 20;

fn raw_cycle(name: &CString) {
    // SAFETY: plain POSIX calls on a name and mapping owned by this function; every resource
    // is released before returning.
    unsafe {
        let fd = libc::shm_open(name.as_ptr(), libc::O_CREAT | libc::O_EXCL | libc::O_RDWR | libc::O_CLOEXEC, 0o600);
        assert!(fd >= 0, "shm_open failed");
        assert_eq!(libc::ftruncate(fd, SIZE as libc::off_t), 0);
        let p = libc::mmap(std::ptr::null_mut(), SIZE, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0);
        assert_ne!(p, libc::MAP_FAILED);
        libc::munmap(p, SIZE);
        libc::close(fd);
        libc::shm_unlink(name.as_ptr());
    }
}

fn lifecycle(c: &mut Criterion) {
    let mut g = c.benchmark_group("lifecycle");
    g.measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1));

    let raw_name = CString::new(format!("/shmgadget-bench-raw-{}", std::process::id())).unwrap();
    g.bench_function("raw_shm", |b| b.iter(|| raw_cycle(&raw_name)));

    let domain_name = format!("bench-{}", std::process::id());
    let domain = Domain::attach_with(&domain_name, &DomainOptions::default()).unwrap();
    let opts = SectionOptions::new().transient();
    g.bench_function("section_create_map", |b| {
        b.iter(|| {
            let s = domain.create_section("bench", SIZE as u64, &opts).unwrap();
            std::hint::black_box(s.as_ptr());
            drop(s);
            domain.delete_section("bench").unwrap();
        })
    });
    domain.detach().unwrap();

    let attach_name = format!("bench-attach-{}", std::process::id());
    g.bench_function("domain_attach_detach", |b| {
        b.iter(|| {
            let d = Domain::attach_with(&attach_name, &DomainOptions::default()).unwrap();
            std::hint::black_box(d.window());
            d.detach().unwrap();
        })
    });
    g.finish();
}

fn commit(c: &mut Criterion) {
    let mut g = c.benchmark_group("commit");
    g.measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_millis(500));
    const LEN: u64 = 64 << 10;

    let raw_name = CString::new(format!("/shmgadget-bench-fallocate-{}", std::process::id())).unwrap();
    // SAFETY: plain POSIX calls on a name owned by this benchmark; released below.
    let fd = unsafe {
        let fd =
            libc::shm_open(raw_name.as_ptr(), libc::O_CREAT | libc::O_EXCL | libc::O_RDWR | libc::O_CLOEXEC, 0o600);
        assert!(fd >= 0, "shm_open failed");
        assert_eq!(libc::ftruncate(fd, SIZE as libc::off_t), 0);
        fd
    };
    g.bench_function("raw_fallocate_64k", |b| {
        // SAFETY: `fd` is open for the whole benchmark.
        b.iter(|| assert_eq!(unsafe { libc::fallocate(fd, 0, 0, LEN as libc::off_t) }, 0))
    });
    // SAFETY: releases what was created above.
    unsafe {
        libc::close(fd);
        libc::shm_unlink(raw_name.as_ptr());
    }

    let domain_name = format!("bench-commit-{}", std::process::id());
    let domain = Domain::attach_with(&domain_name, &DomainOptions::default()).unwrap();
    let s = domain.create_section("bench", SIZE as u64, &SectionOptions::new().transient()).unwrap();
    g.bench_function("section_commit_64k", |b| b.iter(|| s.commit(LEN).unwrap()));
    drop(s);
    domain.detach().unwrap();
    g.finish();
}

criterion_group!(benches, lifecycle, commit);
criterion_main!(benches);
