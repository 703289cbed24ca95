//! Sections keep no file descriptor: thousands of them work at a small `ulimit -n`, and the
//! calls that need the object (commit, decommit, info) reopen it by name, in any process.
#![cfg(unix)]

mod common;

use common::*;
use shmgadget::{Domain, DomainOptions, ErrorKind, Section, SectionOptions};

const GIB: u64 = 1 << 30;
const SECTIONS: u64 = 4096;

fn limit_descriptors(n: u64) {
    let lim = libc::rlimit { rlim_cur: n, rlim_max: n };
    // SAFETY: setrlimit(2) with a valid struct.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0, "setrlimit");
}

/// Descriptors open in this process now (the listing's own descriptor included, every time).
fn open_descriptors() -> i64 {
    std::fs::read_dir("/proc/self/fd").unwrap().count() as i64
}

/// 4,096 sections of 2 MiB chunks need an 8 GiB window; room for a few more entries.
fn big() -> DomainOptions {
    DomainOptions { max_sections: SECTIONS as u32 + 64, ..small(16 * GIB) }
}

/// Reads every section's first word (first touch, unless mapped already) and counts those
/// holding what the creator wrote (`i + 1` in section `s<i>`).
fn count_good(d: &Domain) -> u64 {
    let mut good = 0;
    for info in d.sections() {
        let i: u64 = info.name.strip_prefix('s').unwrap().parse().unwrap();
        // SAFETY: the first word of a live section of this domain, written by the creator.
        let v = unsafe { (info.address as *const u64).read_volatile() };
        good += (v == i + 1) as u64;
    }
    good
}

#[test]
fn four_thousand_sections_work_at_256_descriptors_created_first_touched_and_mapped_eagerly() {
    const TEST: &str = "four_thousand_sections_work_at_256_descriptors_created_first_touched_and_mapped_eagerly";
    match role().as_deref() {
        Some("creator") => {
            limit_descriptors(256);
            let d = Domain::attach_with(&child_domain(), &DomainOptions { must_exist: true, ..big() }).unwrap();
            let before = open_descriptors();
            // Every handle is kept, as the C layer keeps one per section.
            let sections: Vec<Section> = (0..SECTIONS)
                .map(|i| {
                    let s = d
                        .create_section(&format!("s{i}"), 4096, &SectionOptions::new())
                        .unwrap_or_else(|e| panic!("section {i}: {e}"));
                    s.commit(4096).unwrap_or_else(|e| panic!("commit of section {i}: {e}"));
                    // SAFETY: the first word of our fresh, committed section.
                    unsafe { s.as_ptr().cast::<u64>().write(i + 1) };
                    s
                })
                .collect();
            println!("CREATED={}", sections.len());
            println!("ADDED={}", open_descriptors() - before);
            drop(sections);
        }
        Some("toucher") => {
            limit_descriptors(256);
            let d = Domain::attach_with(&child_domain(), &DomainOptions { must_exist: true, ..big() }).unwrap();
            let before = open_descriptors();
            println!("GOOD={}", count_good(&d));
            println!("MAPS={}", shmgadget::first_touch_maps());
            println!("ADDED={}", open_descriptors() - before);
        }
        Some("eager") => {
            limit_descriptors(256);
            let opts = DomainOptions { must_exist: true, ..big() };
            assert!(opts.eager, "SHMGADGET_EAGER=1 selects eager mode");
            // Attaching maps all 4,096 sections explicitly.
            let d = Domain::attach_with(&child_domain(), &opts).unwrap();
            println!("HANDLER={}", shmgadget::handler_installed());
            println!("GOOD={}", count_good(&d));
            println!("MAPS={}", shmgadget::first_touch_maps());
        }
        _ => {
            let domain = unique_domain("fd4096");
            let d = Domain::attach_with(&domain, &big()).unwrap();
            let r = run(TEST, "creator", &domain, &[]);
            assert_eq!(r["CREATED"], SECTIONS.to_string());
            assert_eq!(r["ADDED"], "0", "a section handle keeps no descriptor");
            let r = run(TEST, "toucher", &domain, &[]);
            assert_eq!(r["GOOD"], SECTIONS.to_string(), "every section reached by first touch");
            assert_eq!(r["MAPS"], SECTIONS.to_string(), "each one mapped by the handler");
            assert_eq!(r["ADDED"], "0", "first touch keeps no descriptor");
            let r = run(TEST, "eager", &domain, &[("SHMGADGET_EAGER", "1".to_owned())]);
            assert_eq!(r["HANDLER"], "false");
            assert_eq!(r["GOOD"], SECTIONS.to_string(), "every section mapped at attach");
            assert_eq!(r["MAPS"], "0");
            for i in 0..SECTIONS {
                d.delete_section(&format!("s{i}")).unwrap();
            }
            d.detach().unwrap();
            assert_clean(&domain);
        }
    }
}

#[test]
fn commit_and_decommit_reopen_the_object_in_this_and_another_process() {
    const TEST: &str = "commit_and_decommit_reopen_the_object_in_this_and_another_process";
    match role().as_deref() {
        Some("other") => {
            let d = Domain::attach_with(&child_domain(), &DomainOptions { must_exist: true, ..small(GIB) }).unwrap();
            // Counted in this single-threaded child: the parent's test harness runs other tests
            // (opening descriptors) on other threads.
            let before = open_descriptors();
            let s = d.open_section("c").unwrap();
            let mine: Vec<Section> = (0..64)
                .map(|i| d.create_section(&format!("m{i}"), 4096, &SectionOptions::new().transient()).unwrap())
                .collect();
            println!("ADDED={}", open_descriptors() - before);
            drop(mine);
            let p = s.as_ptr().cast::<u64>();
            // SAFETY: the first word of the mapped section, written by the parent.
            println!("SEEN={}", unsafe { p.read_volatile() });
            s.commit(256 << 10).unwrap();
            println!("RESIDENT={}", s.info().resident.unwrap());
            s.decommit(0, 4096).unwrap();
            // SAFETY: as above; a decommitted page reads as zeros.
            println!("AFTER_DECOMMIT={}", unsafe { p.read_volatile() });
            // SAFETY: word 1024 (offset 8 KiB) of the mapped, committed section.
            unsafe { p.add(1024).write_volatile(9) };
        }
        _ => {
            let domain = unique_domain("fd-commit");
            let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
            let s = d.create_section("c", 1 << 20, &SectionOptions::new().transient()).unwrap();
            let many: Vec<Section> = (0..2)
                .map(|i| d.create_section(&format!("p{i}"), 4096, &SectionOptions::new().transient()).unwrap())
                .collect();

            let p = s.as_ptr().cast::<u64>();
            s.commit(64 << 10).unwrap();
            // SAFETY: the first word of our committed section.
            unsafe { p.write_volatile(7) };
            let info = s.info();
            assert!(info.committed >= 64 << 10, "{info:?}");
            assert!(info.resident.unwrap() >= 64 << 10, "commit allocated the pages: {info:?}");

            let r = run(TEST, "other", &domain, &[]);
            assert_eq!(r["ADDED"], "0", "65 handles (one opened, 64 created), no descriptor kept");
            assert_eq!(r["SEEN"], "7");
            assert!(r["RESIDENT"].parse::<u64>().unwrap() >= 256 << 10, "{r:?}");
            assert_eq!(r["AFTER_DECOMMIT"], "0");
            // SAFETY: our section; the child's decommit freed page 0 for every process.
            assert_eq!(unsafe { p.read_volatile() }, 0, "the other process's decommit reached us");
            // SAFETY: as above; the child wrote word 1024 before exiting.
            assert_eq!(unsafe { p.add(1024).read_volatile() }, 9);
            s.decommit(0, 1 << 20).unwrap();
            assert_eq!(s.info().resident, Some(0), "everything given back");
            // SAFETY: as above.
            assert_eq!(unsafe { p.add(1024).read_volatile() }, 0);

            // A section deleted while a handle is held cannot be committed any more.
            let gone = &many[0];
            d.delete_section("p0").unwrap();
            let e = gone.commit(4096).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
            assert!(e.to_string().contains("\"p0\"") && e.to_string().contains("deleted"), "{e}");

            // An object replaced behind the registry's back is refused, not used.
            let object = d.section_info("p1").unwrap().object;
            let path = object_path(&object);
            std::fs::remove_file(&path).unwrap();
            std::fs::File::create(&path).unwrap().set_len(4096).unwrap();
            let e = many[1].commit(4096).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
            assert!(e.to_string().contains("replaced"), "{e}");
            assert_eq!(many[1].decommit(0, 4096).unwrap_err().kind(), ErrorKind::Corrupt);
            assert_eq!(many[1].info().resident, None);

            drop(many);
            drop(s);
            d.detach().unwrap();
            assert_clean(&domain);
        }
    }
}
