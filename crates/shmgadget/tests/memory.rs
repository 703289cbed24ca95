//! Views, protection and the address query (issue 16), across real processes.
#![cfg(unix)]

mod common;

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use shmgadget::{Domain, ErrorKind, Place, Protection, SectionOptions, ViewKind};

const GIB: u64 = 1 << 30;
const PAGE: usize = 4096;

/// Runs a child and returns its exit status and stderr (for crash tests).
fn run_crashing(test: &str, role: &str, domain: &str) -> (std::process::ExitStatus, String) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1", "-q"])
        .env(ROLE, role)
        .env(DOMAIN, domain)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
    let status = wait(&mut child, Duration::from_secs(60));
    (status, reader.join().unwrap())
}

fn read_u64(p: *const u8) -> u64 {
    // SAFETY: callers pass addresses inside a mapped section or view, 8-byte aligned.
    unsafe { p.cast::<u64>().read_volatile() }
}

fn write_u64(p: *mut u8, v: u64) {
    // SAFETY: callers pass addresses inside a writable mapped section or view, 8-byte aligned.
    unsafe { p.cast::<u64>().write_volatile(v) }
}

#[test]
fn a_copy_on_write_views_writes_are_never_seen_by_the_section_or_another_process() {
    const TEST: &str = "a_copy_on_write_views_writes_are_never_seen_by_the_section_or_another_process";
    match role().as_deref() {
        Some("reader") => {
            let d = Domain::attach_with(&child_domain(), &small(GIB)).unwrap();
            let s = d.open_section("data").unwrap();
            println!("SECTION={:#x}", read_u64(s.as_ptr()));
            let v = s.view(0, 2 * PAGE, ViewKind::CopyOnWrite).unwrap();
            println!("VIEW={:#x}", read_u64(v.as_ptr()));
            // A write of our own, which the parent's section must not see either.
            write_u64(s.as_ptr().wrapping_add(PAGE + 8), 0xd00d);
            drop((v, s));
            drop(d);
        }
        _ => {
            let domain = unique_domain("mem-cow");
            let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
            let s = d.create_section("data", 1 << 20, &SectionOptions::new().transient()).unwrap();
            write_u64(s.as_ptr(), 0xaaaa);
            write_u64(s.as_ptr().wrapping_add(PAGE), 0x1111);
            let v = s.view(0, 2 * PAGE, ViewKind::CopyOnWrite).unwrap();
            assert!(!d.contains(v.as_ptr() as usize), "views live outside the window");
            assert_eq!(read_u64(v.as_ptr()), 0xaaaa, "a view starts with the section's bytes");
            write_u64(v.as_ptr(), 0xbbbb);
            assert_eq!(read_u64(v.as_ptr()), 0xbbbb, "this process sees its own change");
            assert_eq!(read_u64(s.as_ptr()), 0xaaaa, "the section never sees it");
            let r = run(TEST, "reader", &domain, &[]);
            assert_eq!(r["SECTION"], "0xaaaa", "another process never sees it");
            assert_eq!(r["VIEW"], "0xaaaa", "nor does another process's own view");
            // A page the view never wrote still shows the section, including another
            // process's writes.
            assert_eq!(read_u64(v.as_ptr().wrapping_add(PAGE + 8)), 0xd00d);
            drop(v);
            assert_eq!(read_u64(s.as_ptr()), 0xaaaa, "dropping the view discards its copies");
            drop(s);
            d.detach().unwrap();
            assert_clean(&domain);
        }
    }
}

#[test]
fn a_write_through_a_read_only_view_kills_the_writer_with_sigsegv_and_maps_nothing() {
    const TEST: &str = "a_write_through_a_read_only_view_kills_the_writer_with_sigsegv_and_maps_nothing";
    match role().as_deref() {
        Some("writer") => {
            let d = Domain::attach_with(&child_domain(), &small(GIB)).unwrap();
            let s = d.open_section("data").unwrap();
            let v = s.view(PAGE as u64, PAGE, ViewKind::ReadOnly).unwrap();
            eprintln!("VIEW_READ={:#x}", read_u64(v.as_ptr()));
            eprintln!("MAPS_BEFORE={}", shmgadget::first_touch_maps());
            write_u64(v.as_ptr().wrapping_add(16), 0xbad);
            eprintln!("SURVIVED");
        }
        _ => {
            let domain = unique_domain("mem-ro");
            let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
            let s = d.create_section("data", 1 << 20, &SectionOptions::new().transient()).unwrap();
            write_u64(s.as_ptr().wrapping_add(PAGE), 0x5eed);
            let (status, stderr) = run_crashing(TEST, "writer", &domain);
            assert_eq!(status.signal(), Some(libc::SIGSEGV), "the writer dies of SIGSEGV: {status:?}\n{stderr}");
            assert!(stderr.contains("VIEW_READ=0x5eed"), "reading through the view works: {stderr}");
            assert!(!stderr.contains("SURVIVED"), "{stderr}");
            assert!(
                stderr.contains("write to a read-only view") && stderr.contains("is offset 4112 of section \"data\""),
                "the crash names the view, section and offset: {stderr}"
            );
            assert!(!stderr.contains("first touch of"), "the first-touch handler did not try to map it: {stderr}");
            assert_eq!(read_u64(s.as_ptr().wrapping_add(PAGE + 16)), 0, "the write reached nothing");
            drop(s);
            d.detach().unwrap();
            assert_clean(&domain);
        }
    }
}

#[test]
fn a_read_only_view_sees_writes_of_other_processes() {
    const TEST: &str = "a_read_only_view_sees_writes_of_other_processes";
    match role().as_deref() {
        Some("writer") => {
            let d = Domain::attach_with(&child_domain(), &small(GIB)).unwrap();
            let s = d.open_section("data").unwrap();
            write_u64(s.as_ptr().wrapping_add(3 * PAGE), 0xcafe);
            drop(s);
            drop(d);
        }
        _ => {
            let domain = unique_domain("mem-ro-see");
            let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
            let s = d.create_section("data", 1 << 20, &SectionOptions::new().transient()).unwrap();
            let v = s.view(2 * PAGE as u64, 2 * PAGE, ViewKind::ReadOnly).unwrap();
            run(TEST, "writer", &domain, &[]);
            assert_eq!(read_u64(v.as_ptr().wrapping_add(PAGE)), 0xcafe);
            drop((v, s));
            d.detach().unwrap();
            assert_clean(&domain);
        }
    }
}

#[test]
fn views_outside_the_section_or_unaligned_are_refused_with_what_was_expected() {
    let domain = unique_domain("mem-view-bad");
    let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
    let s = d.create_section("data", 64 << 10, &SectionOptions::new().transient()).unwrap();
    let e = s.view(100, PAGE, ViewKind::ReadOnly).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert!(e.to_string().contains("not a multiple of the page size"), "{e}");
    for (off, len) in [(0, (64 << 10) + 1), (60 << 10, 8 << 10), (0, 0), (u64::MAX - 4095, PAGE)] {
        let e = s.view(off, len, ViewKind::CopyOnWrite).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidSize, "{off}+{len}");
        assert!(e.to_string().contains("lies outside the section (65536 bytes)"), "{e}");
    }
    let ok = s.view(60 << 10, 4 << 10, ViewKind::ReadOnly).unwrap();
    assert_eq!(ok.len(), PAGE);
    drop((ok, s));
    d.detach().unwrap();
    assert_clean(&domain);
}

#[test]
fn a_write_to_a_page_protected_read_only_kills_the_writer_and_the_handler_does_not_undo_it() {
    const TEST: &str = "a_write_to_a_page_protected_read_only_kills_the_writer_and_the_handler_does_not_undo_it";
    match role().as_deref() {
        Some("writer") => {
            let d = Domain::attach_with(&child_domain(), &small(GIB)).unwrap();
            let s = d.open_section("data").unwrap();
            s.protect(PAGE as u64, PAGE as u64, Protection::Read).unwrap();
            eprintln!("READ={:#x}", read_u64(s.as_ptr().wrapping_add(PAGE)));
            write_u64(s.as_ptr(), 0x600d); // the page before is still writable
            write_u64(s.as_ptr().wrapping_add(PAGE + 8), 0xbad);
            eprintln!("SURVIVED");
        }
        _ => {
            let domain = unique_domain("mem-prot");
            let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
            let s = d.create_section("data", 1 << 20, &SectionOptions::new().transient()).unwrap();
            write_u64(s.as_ptr().wrapping_add(PAGE), 0x77);
            let (status, stderr) = run_crashing(TEST, "writer", &domain);
            assert_eq!(status.signal(), Some(libc::SIGSEGV), "{status:?}\n{stderr}");
            assert!(stderr.contains("READ=0x77") && !stderr.contains("SURVIVED"), "{stderr}");
            assert!(
                stderr.contains("(offset 4104) in section \"data\"")
                    && stderr.contains("protected with Section::protect"),
                "the crash names the section, offset and cause: {stderr}"
            );
            assert_eq!(read_u64(s.as_ptr()), 0x600d, "the unprotected page took the write");
            assert_eq!(read_u64(s.as_ptr().wrapping_add(PAGE + 8)), 0, "the protected one did not");
            // Protection is per process: this one still writes the page.
            write_u64(s.as_ptr().wrapping_add(PAGE + 8), 0x99);
            drop(s);
            d.detach().unwrap();
            assert_clean(&domain);
        }
    }
}

#[test]
fn protection_is_validated_against_the_section_and_can_be_restored() {
    let domain = unique_domain("mem-prot-bad");
    let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
    let s = d.create_section("data", 64 << 10, &SectionOptions::new().transient()).unwrap();
    let e = s.protect(1, 10, Protection::Read).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert!(e.to_string().contains("not a multiple of the page size 4096"), "{e}");
    for (off, len) in [(0, (64 << 10) + 1), (64 << 10, 4096), (0, 0), (u64::MAX - 4095, 4096)] {
        let e = s.protect(off, len, Protection::None).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidSize, "{off}+{len}");
        assert!(e.to_string().contains("lies outside section \"data\" (65536 bytes)"), "{e}");
    }
    let p = s.as_ptr().wrapping_add(2 * PAGE);
    s.protect(2 * PAGE as u64, 1, Protection::None).unwrap();
    assert_eq!(shmgadget::query(p as usize).protection, Some("none"), "len rounds up to the page");
    s.protect(2 * PAGE as u64, PAGE as u64, Protection::Read).unwrap();
    assert_eq!(shmgadget::query(p as usize).protection, Some("read"));
    s.protect(2 * PAGE as u64, PAGE as u64, Protection::ReadWrite).unwrap();
    assert_eq!(shmgadget::query(p as usize).protection, Some("read_write"));
    write_u64(p, 5);
    assert_eq!(read_u64(p), 5);
    drop(s);
    d.detach().unwrap();
    assert_clean(&domain);
}

#[test]
fn query_says_which_section_offset_and_state_an_address_has_or_that_it_is_free_or_not_ours() {
    let domain = unique_domain("mem-query");
    let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
    let a = d.create_section("alpha", 1 << 20, &SectionOptions::new().transient()).unwrap();
    let b = d.create_section("beta", 1 << 20, &SectionOptions::new().transient()).unwrap();
    a.commit(2 * PAGE as u64).unwrap();
    write_u64(a.as_ptr().wrapping_add(PAGE), 1);

    let q = shmgadget::query(a.as_ptr() as usize + PAGE + 24);
    assert_eq!(q.place, Place::Section);
    assert_eq!(q.domain.as_deref(), Some(domain.as_str()));
    assert_eq!(q.section.as_deref(), Some("alpha"));
    assert_eq!(q.section_address, Some(a.as_ptr() as u64));
    assert_eq!(q.offset, Some(PAGE as u64 + 24));
    assert!(q.reserved);
    assert_eq!((q.committed, q.resident, q.mapped), (Some(true), Some(true), Some(true)));
    assert_eq!(q.protection, Some("read_write"));
    assert_eq!(q.page_size, PAGE as u64);

    let q = shmgadget::query(a.as_ptr() as usize + 10 * PAGE);
    assert_eq!((q.committed, q.resident), (Some(false), Some(false)), "beyond the commit, never touched");

    // Between the two sections (each takes whole 2 MiB chunks) is a hole.
    let hole = a.as_ptr() as usize + (1 << 20) + 8;
    let q = shmgadget::query(hole);
    assert_eq!(q.place, Place::Free);
    assert_eq!(q.free_start, Some(a.as_ptr() as u64 + (1 << 20)));
    assert_eq!(q.free_end, Some(b.as_ptr() as u64));
    assert!(!q.reserved);

    let v = b.view(PAGE as u64, PAGE, ViewKind::ReadOnly).unwrap();
    let q = shmgadget::query(v.as_ptr() as usize + 8);
    assert_eq!(q.place, Place::View);
    assert_eq!((q.section.as_deref(), q.offset, q.view), (Some("beta"), Some(PAGE as u64 + 8), Some("read_only")));
    assert_eq!(q.protection, Some("read"));
    assert_eq!(q.section_address, Some(b.as_ptr() as u64));

    let local = 0u64;
    let q = shmgadget::query(&local as *const u64 as usize);
    assert_eq!(q.place, Place::NotOurs);
    assert_eq!(q.mapped, Some(true));
    assert!(q.mapping.is_some() && q.domain.is_none(), "{q:?}");

    drop((v, a, b));
    d.detach().unwrap();
    assert_clean(&domain);
}
