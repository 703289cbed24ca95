//! Windows unique per machine, across users: domains made by root and by uid 65534 (who cannot
//! read root's registries) get disjoint windows whatever the order, and an overlap made on
//! purpose (an explicit window base the other user could not check) is flagged by
//! `list_domains` and explained by the failing attach.
#![cfg(unix)]

mod common;

use common::*;
use shmgadget::inspect::{DomainEntry, list_domains};
use shmgadget::{Domain, DomainOptions, ErrorKind, SectionOptions};

const GIB: u64 = 1 << 30;
const NOBODY: u32 = 65534;

/// A private shm directory (sticky and world-writable like /dev/shm, so uid 65534 may create
/// there): only this test's domains in it, so a window is chosen only against them.
struct ShmDir(std::path::PathBuf);

impl ShmDir {
    fn new(tag: &str) -> ShmDir {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::path::PathBuf::from(format!("/dev/shm/sgtest-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
        ShmDir(dir)
    }
    fn opts(&self) -> DomainOptions {
        DomainOptions { shm_dir: Some(self.0.clone()), ..small(GIB) }
    }
    fn env(&self) -> (&'static str, String) {
        ("SHMGADGET_SHM_DIR", self.0.display().to_string())
    }
    fn assert_empty(&self) {
        let left: Vec<_> = std::fs::read_dir(&self.0).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }
}

impl Drop for ShmDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// In a child: becomes uid 65534, then makes domain `child_domain()` (with `BASE` as its
/// explicit window base if set) holding one persistent section, and reports its window.
fn nobody_creates() {
    // SAFETY: plain setgid/setuid calls in a single-threaded child process.
    unsafe {
        assert_eq!(libc::setgid(NOBODY), 0);
        assert_eq!(libc::setuid(NOBODY), 0);
    }
    let base = std::env::var("BASE").ok().map(|b| u64::from_str_radix(&b, 16).unwrap());
    let d = Domain::attach_with(&child_domain(), &DomainOptions { window_base: base, ..small(GIB) }).unwrap();
    d.create_section("keep", 4096, &SectionOptions::new()).unwrap();
    let (b, len) = d.window();
    println!("BASE={b:x}");
    println!("SIZE={len:x}");
}

fn window_of(r: &std::collections::HashMap<String, String>) -> (u64, u64) {
    let base = u64::from_str_radix(&r["BASE"], 16).unwrap();
    (base, base + u64::from_str_radix(&r["SIZE"], 16).unwrap())
}

fn disjoint(a: (u64, u64), b: (u64, u64)) -> bool {
    a.1 <= b.0 || b.1 <= a.0
}

/// Removes a domain of uid 65534 (root trusts it explicitly).
fn remove_foreign(dir: &ShmDir, domain: &str) {
    let d = Domain::attach_with(domain, &DomainOptions { allow_foreign_owner: true, must_exist: true, ..dir.opts() })
        .unwrap();
    for s in d.sections() {
        d.delete_section(&s.name).unwrap();
    }
    d.detach().unwrap();
}

#[test]
fn domains_of_root_and_of_another_user_get_disjoint_windows_in_either_order() {
    const TEST: &str = "domains_of_root_and_of_another_user_get_disjoint_windows_in_either_order";
    if role().as_deref() == Some("nobody") {
        nobody_creates();
        return;
    }
    if !is_root() {
        eprintln!("skipped: switching users needs root");
        return;
    }
    let dir = ShmDir::new("win");
    // Root first: uid 65534 cannot read root's 0600 registry, yet must not take its window.
    let first = unique_domain("win-root");
    let d = Domain::attach_with(&first, &dir.opts()).unwrap();
    let root_window = {
        let (b, l) = d.window();
        (b as u64, (b + l) as u64)
    };
    let theirs = unique_domain("win-nobody");
    let r = run(TEST, "nobody", &theirs, &[dir.env()]);
    let nobody_window = window_of(&r);
    assert!(disjoint(root_window, nobody_window), "root {root_window:x?} and uid 65534 {nobody_window:x?}");
    // Then root again, after theirs: root reads their registry and avoids it.
    let second = unique_domain("win-root2");
    let d2 = Domain::attach_with(&second, &dir.opts()).unwrap();
    let second_window = {
        let (b, l) = d2.window();
        (b as u64, (b + l) as u64)
    };
    assert!(disjoint(second_window, nobody_window), "root {second_window:x?} and uid 65534 {nobody_window:x?}");
    // One process can attach all three.
    let foreign =
        Domain::attach_with(&theirs, &DomainOptions { allow_foreign_owner: true, must_exist: true, ..dir.opts() })
            .expect("a process attaches root's and uid 65534's domains together");
    drop(foreign);
    d2.detach().unwrap();
    d.detach().unwrap();
    remove_foreign(&dir, &theirs);
    dir.assert_empty();
}

#[test]
fn an_overlap_made_on_purpose_is_flagged_by_list_domains_and_explained_by_attach() {
    const TEST: &str = "an_overlap_made_on_purpose_is_flagged_by_list_domains_and_explained_by_attach";
    if role().as_deref() == Some("nobody") {
        nobody_creates();
        return;
    }
    if !is_root() {
        eprintln!("skipped: switching users needs root");
        return;
    }
    const BASE: u64 = 0x6b00_0000_0000;
    let dir = ShmDir::new("ovl");
    let mine = unique_domain("ovl-root");
    let d = Domain::attach_with(&mine, &DomainOptions { window_base: Some(BASE), ..dir.opts() }).unwrap();
    d.create_section("keep", 4096, &SectionOptions::new()).unwrap();
    // uid 65534 asks for the same base: it cannot read root's registry, so nothing stops it.
    let theirs = unique_domain("ovl-nobody");
    let r = run(TEST, "nobody", &theirs, &[("BASE", format!("{BASE:x}")), dir.env()]);
    assert_eq!(window_of(&r).0, BASE);
    let listed = list_domains(Some(&dir.0)).unwrap();
    let overlaps_of = |name: &str| -> Vec<String> {
        listed
            .iter()
            .find_map(|e| match e {
                DomainEntry::Ok(r) if r.name == name => Some(r.overlaps.iter().map(|o| o.domain.clone()).collect()),
                _ => None,
            })
            .unwrap_or_else(|| panic!("domain {name} is listed"))
    };
    assert_eq!(overlaps_of(&mine), vec![theirs.clone()]);
    assert_eq!(overlaps_of(&theirs), vec![mine.clone()]);
    // A process that has attached one cannot attach the other, and is told why.
    let err =
        Domain::attach_with(&theirs, &DomainOptions { allow_foreign_owner: true, must_exist: true, ..dir.opts() })
            .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::WindowUnavailable);
    let msg = err.to_string();
    assert!(msg.contains(&format!("{mine:?}")) && msg.contains("--window-base"), "{msg}");
    d.delete_section("keep").unwrap();
    d.detach().unwrap();
    remove_foreign(&dir, &theirs);
    dir.assert_empty();
}
