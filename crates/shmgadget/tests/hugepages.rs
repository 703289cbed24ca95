//! Sections on huge pages (issue 16): a hugetlbfs mount as the shm directory, across real
//! processes. Each test reserves the huge pages it needs (`/proc/sys/vm/nr_hugepages`), mounts
//! a hugetlbfs in a temporary directory, and restores both afterwards. Where that cannot be
//! done (not root, no hugetlbfs, the kernel gives fewer pages) the test prints why and skips.
#![cfg(unix)]

mod common;

use std::alloc::Layout;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use common::*;
use shmgadget::heap::Heap;
use shmgadget::{Domain, DomainOptions, ErrorKind, Protection, SectionOptions};

const HUGE: u64 = 2 << 20;

/// Tests of this binary change the one system-wide pool in turn.
static POOL: Mutex<()> = Mutex::new(());

/// A hugetlbfs mount with `pages` more huge pages reserved for it; undone on drop.
struct HugeDir {
    dir: PathBuf,
    old_pages: u64,
    _turn: std::sync::MutexGuard<'static, ()>,
}

fn read_pages() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/vm/nr_hugepages").ok()?.trim().parse().ok()
}

fn free_pages() -> u64 {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    info.lines().find_map(|l| l.strip_prefix("HugePages_Free:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

impl HugeDir {
    /// Reserves `pages` huge pages of 2 MiB and mounts a hugetlbfs, or says why not.
    fn new(pages: u64) -> Result<HugeDir, String> {
        let turn = POOL.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not root: cannot reserve huge pages or mount hugetlbfs".into());
        }
        let old_pages = read_pages().ok_or("no /proc/sys/vm/nr_hugepages (kernel without hugetlb)")?;
        let want = old_pages + pages;
        std::fs::write("/proc/sys/vm/nr_hugepages", want.to_string())
            .map_err(|e| format!("cannot write /proc/sys/vm/nr_hugepages: {e}"))?;
        let restore = |why: String| {
            let _ = std::fs::write("/proc/sys/vm/nr_hugepages", old_pages.to_string());
            why
        };
        let got = read_pages().unwrap_or(0);
        if got < want || free_pages() < pages {
            return Err(restore(format!(
                "asked for {want} huge pages, the kernel has {got} ({} free): memory too fragmented?",
                free_pages()
            )));
        }
        let dir = std::env::temp_dir().join(format!("shmg-huge-{}-{}", std::process::id(), unique_domain("m")));
        std::fs::create_dir(&dir).map_err(|e| restore(format!("cannot create {}: {e}", dir.display())))?;
        let status = Command::new("mount")
            .args(["-t", "hugetlbfs", "-o", "pagesize=2M,mode=0700", "none"])
            .arg(&dir)
            .status()
            .map_err(|e| restore(format!("cannot run mount: {e}")))?;
        if !status.success() {
            let _ = std::fs::remove_dir(&dir);
            return Err(restore(format!("mount -t hugetlbfs failed ({status}): no hugetlbfs with 2 MiB pages?")));
        }
        Ok(HugeDir { dir, old_pages, _turn: turn })
    }

    fn options(&self) -> DomainOptions {
        DomainOptions { shm_dir: Some(self.dir.clone()), ..small(1 << 30) }
    }
}

impl Drop for HugeDir {
    fn drop(&mut self) {
        // Nothing of ours should still map it; if something does, say so and detach the mount
        // lazily (its pages go back when the last mapping does).
        if !Command::new("umount").arg(&self.dir).status().is_ok_and(|s| s.success()) {
            eprintln!("hugetlbfs {} still in use; unmounting lazily", self.dir.display());
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
        let _ = std::fs::remove_dir(&self.dir);
        let _ = std::fs::write("/proc/sys/vm/nr_hugepages", self.old_pages.to_string());
    }
}

/// Reserves `pages` or prints why the test is skipped.
fn huge_dir(test: &str, pages: u64) -> Option<HugeDir> {
    match HugeDir::new(pages) {
        Ok(d) => Some(d),
        Err(why) => {
            println!("SKIPPED {test}: {why}");
            eprintln!("SKIPPED {test}: {why}");
            None
        }
    }
}

/// Field `field` (a `kB` figure, in bytes) of this process's smaps entry for the mapping
/// holding `addr`.
fn smaps_field(addr: usize, field: &str) -> Option<u64> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let mut inside = false;
    for line in smaps.lines() {
        if let Some((range, _)) = line.split_once(' ')
            && let Some((lo, hi)) = range.split_once('-')
            && let (Ok(lo), Ok(hi)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
        {
            inside = lo <= addr && addr < hi;
            continue;
        }
        if inside && let Some(v) = line.strip_prefix(field).and_then(|v| v.strip_prefix(':')) {
            return v.trim().trim_end_matches("kB").trim().parse::<u64>().ok().map(|k| k * 1024);
        }
    }
    None
}

/// The kernel page size of this process's mapping at `addr` (`KernelPageSize` in smaps).
fn kernel_page_size(addr: usize) -> Option<u64> {
    smaps_field(addr, "KernelPageSize")
}

fn run(test: &str, role: &str, domain: &str, dir: &Path) -> (std::process::ExitStatus, String, String) {
    run_capturing(test, role, domain, |c| {
        c.env("SHMGADGET_SHM_DIR", dir);
    })
}

#[test]
fn a_section_on_a_hugetlbfs_directory_is_backed_by_huge_pages_in_every_process() {
    const TEST: &str = "a_section_on_a_hugetlbfs_directory_is_backed_by_huge_pages_in_every_process";
    if role().is_some() {
        // A second process: maps the section on first touch, reads and writes it.
        let d = Domain::attach_with(&child_domain(), &small(1 << 30)).unwrap();
        let s = d.open_section("data").unwrap();
        let p = s.as_ptr();
        // SAFETY: inside the mapped section.
        let v = unsafe { p.add(HUGE as usize + 8).cast::<u64>().read_volatile() };
        // SAFETY: as above.
        unsafe { p.add(HUGE as usize + 16).cast::<u64>().write_volatile(v + 1) };
        println!("READ={v:#x}");
        println!("PAGE={}", s.page_size());
        println!("KERNEL_PAGE={}", kernel_page_size(p as usize + HUGE as usize).unwrap_or(0));
        return;
    }
    let Some(huge) = huge_dir(TEST, 4) else { return };
    let domain = unique_domain("huge-sec");
    let d = Domain::attach_with(&domain, &huge.options()).unwrap();
    // 3 MiB asked: rounded up to whole huge pages.
    let s = d.create_section("data", 3 << 20, &SectionOptions::new().transient()).unwrap();
    assert_eq!(s.page_size(), HUGE, "the section reports its huge page size");
    assert!(s.is_huge());
    assert_eq!(s.len() as u64, 2 * HUGE, "the size rounds up to whole huge pages");
    let info = s.info();
    assert_eq!(info.page_size, HUGE);
    s.commit(1).unwrap();
    assert_eq!(s.info().committed, HUGE, "commit works in whole huge pages");
    s.commit(2 * HUGE).unwrap();
    let p = s.as_ptr();
    // SAFETY: inside the mapped, committed section.
    unsafe { p.add(HUGE as usize + 8).cast::<u64>().write_volatile(0x4855_4745) };
    assert_eq!(kernel_page_size(p as usize + HUGE as usize), Some(HUGE), "the kernel maps it with 2 MiB pages");
    let q = shmgadget::query(p as usize + 100);
    assert_eq!(q.page_size, HUGE, "query reports the page size");

    let (status, out, err) = run(TEST, "child", &domain, &huge.dir);
    assert!(status.success(), "{status:?}\n{out}\n{err}");
    assert!(out.contains("READ=0x48554745"), "{out}");
    assert!(out.contains(&format!("PAGE={HUGE}")) && out.contains(&format!("KERNEL_PAGE={HUGE}")), "{out}");
    // SAFETY: inside the section; the child has exited.
    assert_eq!(unsafe { p.add(HUGE as usize + 16).cast::<u64>().read_volatile() }, 0x4855_4746);

    // Granularity follows the page size: misaligned requests are refused with the reason.
    let e = s.decommit(4096, 4096).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert!(e.to_string().contains("page size 2097152") && e.to_string().contains("huge pages"), "{e}");
    let e = s.protect(4096, 4096, Protection::Read).unwrap_err();
    assert!(e.to_string().contains("page size 2097152"), "{e}");
    s.protect(HUGE, 1, Protection::Read).unwrap();
    assert_eq!(shmgadget::query(p as usize + HUGE as usize + 4096 * 100).protection, Some("read"));
    s.protect(HUGE, HUGE, Protection::ReadWrite).unwrap();
    s.decommit(HUGE, 1).unwrap();
    // SAFETY: inside the section: decommitted pages read as zero.
    assert_eq!(unsafe { p.add(HUGE as usize + 8).cast::<u64>().read_volatile() }, 0);
    // File-backed sections need a link object, which hugetlbfs cannot hold: a clear refusal.
    let file = std::env::temp_dir().join(format!("shmg-huge-file-{}.shmg", std::process::id()));
    let e = d.create_section("f", 4 << 20, &SectionOptions::new().file(&file)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    assert!(e.to_string().contains("hugetlbfs"), "{e}");
    assert!(!file.exists(), "the refused file is not left behind");
    drop(s);
    d.detach().unwrap();
    assert_eq!(std::fs::read_dir(&huge.dir).unwrap().count(), 0, "the transient domain left nothing");
}

#[test]
fn committing_more_than_the_reserved_huge_pages_is_out_of_space_never_a_sigbus() {
    const TEST: &str = "committing_more_than_the_reserved_huge_pages_is_out_of_space_never_a_sigbus";
    if role().is_some() {
        // A heap on huge pages grows until the pool is empty: a clean error, no SIGBUS.
        let d = Domain::attach_with(&child_domain(), &small(1 << 30)).unwrap();
        let h = Heap::open(&d, "heap").unwrap();
        let mut blocks = 0;
        let e = loop {
            match h.alloc(Layout::from_size_align(1 << 20, 16).unwrap()) {
                Ok(p) => {
                    // SAFETY: a fresh block of 1 MiB: touch all of it.
                    unsafe { p.as_ptr().write_bytes(0x5a, 1 << 20) };
                    blocks += 1;
                }
                Err(e) => break e,
            }
        };
        println!("BLOCKS={blocks}");
        println!("KIND={:?}", e.kind());
        println!("ERROR={e}");
        h.check().unwrap();
        return;
    }
    let Some(huge) = huge_dir(TEST, 4) else { return };
    let domain = unique_domain("huge-oos");
    let d = Domain::attach_with(&domain, &huge.options()).unwrap();
    // The registry takes one page; sections share the rest.
    let s = d.create_section("big", 16 * HUGE, &SectionOptions::new().transient()).unwrap();
    let e = s.commit(16 * HUGE).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::OutOfSpace, "{e}");
    drop(s);
    d.delete_section("big").unwrap();
    let h = Heap::create(&d, "heap", 64 << 20).unwrap();
    let (status, out, err) = run(TEST, "child", &domain, &huge.dir);
    assert!(status.success(), "the child must not die of SIGBUS: {status:?}\n{out}\n{err}");
    assert!(out.contains("KIND=OutOfSpace"), "{out}\n{err}");
    let blocks: u64 = out.lines().find_map(|l| l.strip_prefix("BLOCKS=")).unwrap().parse().unwrap();
    assert!((2..16).contains(&blocks), "a few MiB fitted, then the pool was empty: {blocks}");
    h.check().unwrap();
    drop(h);
    d.delete_section("heap").unwrap();
    d.detach().unwrap();
    assert_eq!(std::fs::read_dir(&huge.dir).unwrap().count(), 0, "nothing left in the hugetlbfs");
}

/// `ShmemPmdMapped` (bytes) of this process's mapping at `addr`: shared memory mapped with
/// transparent huge pages.
fn pmd_mapped(addr: usize) -> Option<u64> {
    smaps_field(addr, "ShmemPmdMapped")
}

#[test]
fn shmgadget_thp_asks_a_huge_advise_tmpfs_for_transparent_huge_pages() {
    const TEST: &str = "shmgadget_thp_asks_a_huge_advise_tmpfs_for_transparent_huge_pages";
    if role().is_some() {
        let d = Domain::attach_with(&child_domain(), &small(1 << 30)).unwrap();
        let s = d.create_section("thp", 8 << 20, &SectionOptions::new().transient()).unwrap();
        for off in (0..8 << 20).step_by(4096) {
            // SAFETY: inside the section (tmpfs: pages come on first write).
            unsafe { s.as_ptr().add(off).write_volatile(1) };
        }
        println!("PMD={}", pmd_mapped(s.as_ptr() as usize).unwrap_or(0));
        println!("PAGE={}", s.page_size());
        drop(s);
        d.detach().unwrap();
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIPPED {TEST}: not root: cannot mount a tmpfs");
        return;
    }
    let _turn = POOL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = std::env::temp_dir().join(format!("shmg-thp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64m,huge=advise,mode=0700", "none"])
        .arg(&dir)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        let _ = std::fs::remove_dir(&dir);
        println!("SKIPPED {TEST}: mount -t tmpfs -o huge=advise failed (a kernel without shmem THP?)");
        return;
    }
    let result = std::panic::catch_unwind(|| {
        let run_thp = |thp: bool| {
            let mut child = Command::new(std::env::current_exe().unwrap())
                .args([TEST, "--exact", "--nocapture", "--test-threads=1", "-q"])
                .env(ROLE, "child")
                .env(DOMAIN, unique_domain("thp"))
                .env("SHMGADGET_SHM_DIR", &dir)
                .env("SHMGADGET_THP", if thp { "1" } else { "0" })
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let out = std::io::read_to_string(child.stdout.take().unwrap()).unwrap();
            assert!(wait(&mut child, Duration::from_secs(60)).success(), "{out}");
            out
        };
        let with = run_thp(true);
        let without = run_thp(false);
        let pmd = |out: &str| -> u64 { out.lines().find_map(|l| l.strip_prefix("PMD=")).unwrap().parse().unwrap() };
        (pmd(&with), pmd(&without), with)
    });
    let _ = Command::new("umount").arg(&dir).status();
    let _ = std::fs::remove_dir(&dir);
    let (with, without, out) = result.unwrap();
    if with == 0 && without == 0 {
        println!("SKIPPED {TEST}: the kernel gave no transparent huge page even when asked ({out})");
        return;
    }
    assert!(with >= 2 << 20, "advised: huge pages map the section ({with} bytes)");
    assert_eq!(without, 0, "not advised: a huge=advise tmpfs uses small pages");
    assert!(out.contains("PAGE=4096"), "commit granularity stays the system page: {out}");
}
