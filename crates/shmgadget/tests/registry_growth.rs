//! A registry sized for its domain: a one-section domain's registry is small, the registry
//! grows (sections, processes, window chunks) while other processes are attached and they see
//! what was created beyond the slots they first saw, and growing on a full tmpfs is a clean
//! `OutOfSpace` that leaves the domain usable.
#![cfg(unix)]

mod common;

use std::io::Write;
use std::time::Duration;

use common::*;
use shmgadget::{Domain, DomainOptions, ErrorKind, SectionOptions};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn registry_len(dir: &std::path::Path, domain: &str) -> u64 {
    std::fs::metadata(dir.join(format!("shmgadget.{domain}:registry"))).unwrap().len()
}

fn shm_dir() -> std::path::PathBuf {
    DomainOptions::default().resolved_shm_dir()
}

/// The child's stdout, line by line.
fn lines_of(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(l.trim().to_owned());
        }
    });
    rx
}

#[test]
fn a_one_section_domain_has_a_registry_of_at_most_512_kib() {
    let domain = unique_domain("regsize");
    // The default limits and window, as `Domain::attach` makes them.
    let d = Domain::attach_with(&domain, &DomainOptions::default()).unwrap();
    let s = d.create_section("one", MIB, &SectionOptions::new()).unwrap();
    let len = registry_len(&shm_dir(), &domain);
    assert!(len <= 512 * KIB, "the registry of a one-section domain is {len} bytes");
    drop(s);
    d.delete_section("one").unwrap();
    d.detach().unwrap();
    assert_clean(&domain);
}

#[test]
fn the_registry_grows_with_sections_processes_and_the_window_and_other_processes_see_it() {
    const TEST: &str = "the_registry_grows_with_sections_processes_and_the_window_and_other_processes_see_it";
    // Four process slots over 16 segments: one per segment, so the child's registration
    // already grows the registry; 4 GiB of window: 256 MiB of chunks per segment.
    let opts = DomainOptions { max_procs: 4, ..small(4 * GIB) };
    const SECTIONS: usize = 600;
    match role().as_deref() {
        Some("reader") => {
            let d = Domain::attach_with(&child_domain(), &DomainOptions { must_exist: true, ..opts }).unwrap();
            println!("ATTACHED");
            std::io::stdout().flush().unwrap();
            let mut line = String::new();
            std::io::stdin().read_line(&mut line).unwrap();
            let big_addr: usize = line.trim().parse().unwrap();
            // First touch of a section created after we attached, far beyond the first
            // segment's chunks: the fault handler finds it through the grown chunk table.
            // SAFETY: the parent created a 1 GiB section at that address and wrote there.
            let v = unsafe { std::ptr::read_volatile((big_addr + (900 << 20)) as *const u64) };
            println!("BIG={v:#x}");
            for i in [0, 255, 256, 511, SECTIONS - 1] {
                let s = d.open_section(&format!("s{i}")).unwrap();
                // SAFETY: the section is at least 8 bytes; the parent wrote its index there.
                let got = unsafe { std::ptr::read_volatile(s.as_ptr() as *const u64) };
                println!("S{i}={got}");
            }
            println!("SECTIONS={}", d.sections().len());
            println!("PROCS={}", d.processes().iter().filter(|p| p.alive).count());
        }
        _ => {
            let domain = unique_domain("grow");
            let dir = shm_dir();
            let d = Domain::attach_with(&domain, &opts).unwrap();
            let initial = registry_len(&dir, &domain);
            let mut child = spawn(TEST, "reader", &domain, &[]);
            let lines = lines_of(&mut child);
            while lines.recv_timeout(Duration::from_secs(30)).expect("the reader attaches") != "ATTACHED" {}
            let after_child = registry_len(&dir, &domain);
            assert!(after_child > initial, "a second process slot grew the registry: {initial} -> {after_child}");
            // Spans chunks of segments 0..4.
            let big = d.create_section("big", GIB, &SectionOptions::new()).unwrap();
            let after_big = registry_len(&dir, &domain);
            assert!(after_big > after_child, "a large section grew the chunk table: {after_child} -> {after_big}");
            // SAFETY: inside the 1 GiB section we just created.
            unsafe { std::ptr::write_volatile(big.as_ptr().add(900 << 20) as *mut u64, 0xfeed_beef) };
            let mut kept = Vec::new();
            for i in 0..SECTIONS {
                let s = d.create_section(&format!("s{i}"), 4096, &SectionOptions::new()).unwrap();
                // SAFETY: a fresh 4 KiB section.
                unsafe { std::ptr::write_volatile(s.as_ptr() as *mut u64, i as u64) };
                kept.push(s);
            }
            let after_sections = registry_len(&dir, &domain);
            assert!(after_sections > after_big, "600 sections grew the registry: {after_big} -> {after_sections}");
            writeln!(child.stdin.as_mut().unwrap(), "{}", big.as_ptr() as usize).unwrap();
            let status = wait(&mut child, Duration::from_secs(60));
            let out: std::collections::HashMap<String, String> =
                lines.try_iter().filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned()))).collect();
            assert!(status.success(), "the reader failed: {out:?}");
            assert_eq!(out["BIG"], "0xfeedbeef");
            for i in [0, 255, 256, 511, SECTIONS - 1] {
                assert_eq!(out[&format!("S{i}")], i.to_string());
            }
            assert_eq!(out["SECTIONS"], (SECTIONS + 1).to_string());
            assert_eq!(out["PROCS"], "2");
            // Everything still works here, and deleting everything leaves nothing.
            assert_eq!(d.sections().len(), SECTIONS + 1);
            drop((kept, big));
            for s in d.sections() {
                d.delete_section(&s.name).unwrap();
            }
            d.detach().unwrap();
            assert_clean(&domain);
        }
    }
}

#[test]
fn growing_the_registry_on_a_full_tmpfs_is_out_of_space_and_leaves_the_domain_usable() {
    const TEST: &str = "growing_the_registry_on_a_full_tmpfs_is_out_of_space_and_leaves_the_domain_usable";
    // 1 GiB of window over 16 segments: 64 MiB of chunks per segment; four process slots: one
    // per segment.
    let opts = |dir: std::path::PathBuf| DomainOptions { shm_dir: Some(dir), max_procs: 4, ..small(GIB) };
    if role().as_deref() == Some("attacher") {
        let dir = std::path::PathBuf::from(std::env::var("MNT").unwrap());
        match Domain::attach_with(&child_domain(), &DomainOptions { must_exist: true, ..opts(dir) }) {
            Ok(d) => {
                println!("ATTACH=ok");
                println!("SECTIONS={}", d.sections().len());
            }
            Err(e) => {
                println!("ATTACH={:?}", e.kind());
                println!("MESSAGE={e}");
            }
        }
        return;
    }
    let Some(fs) = Tmpfs::mount("regfull", "size=4m,nr_inodes=64") else { return };
    let mnt = fs.path.clone();
    let domain = unique_domain("regfull");
    let d = Domain::attach_with(&domain, &opts(mnt.clone())).unwrap();
    let fill = d.create_section("fill", 8 * MIB, &SectionOptions::new()).unwrap();
    // Fill the store to the last page.
    let mut committed = 0;
    for step in [256 * KIB, 4 * KIB] {
        while fill.commit(committed + step).is_ok() {
            committed += step;
        }
    }
    let before = registry_len(&mnt, &domain);
    let env = [("MNT", mnt.display().to_string())];
    // A section whose chunks lie in segments not backed yet: the registry must grow, and
    // cannot.
    let err = d.create_section("big", 512 * MIB, &SectionOptions::new()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::OutOfSpace, "{err}");
    assert!(err.to_string().contains("grow the registry") && err.to_string().contains("big"), "{err}");
    // A second process needs a process slot of the next segment: its attach fails the same
    // way (and it leaves nothing registered).
    let r = run(TEST, "attacher", &domain, &env);
    assert_eq!(r["ATTACH"], "OutOfSpace", "{r:?}");
    assert!(r["MESSAGE"].contains("grow the registry"), "{r:?}");
    assert_eq!(registry_len(&mnt, &domain), before, "a failed growth leaves the registry as it was");
    assert_eq!(d.sections().len(), 1, "no entry of the failed create");
    assert!(d.open_section("big").is_err());
    assert_eq!(d.processes().len(), 1);
    // Once there is room, the same operations succeed and everything is still there.
    fill.decommit(0, 8 * MIB).unwrap();
    let big = d.create_section("big", 512 * MIB, &SectionOptions::new()).unwrap();
    assert!(registry_len(&mnt, &domain) > before);
    let r = run(TEST, "attacher", &domain, &env);
    assert_eq!(r["ATTACH"], "ok", "{r:?}");
    assert_eq!(r["SECTIONS"], "2", "{r:?}");
    d.open_section("fill").unwrap();
    drop((big, fill));
    for s in d.sections() {
        d.delete_section(&s.name).unwrap();
    }
    d.detach().unwrap();
    let left: Vec<_> = std::fs::read_dir(&mnt).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "nothing left in the tmpfs: {left:?}");
}
