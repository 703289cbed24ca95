//! Domains, windows, the registry and sections, exercised across real processes.
#![cfg(unix)]

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use shmgadget::inspect::{self, DomainEntry};
use shmgadget::{Domain, DomainOptions, ErrorKind, SectionKind, SectionOptions};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// A list node stored in shared memory; `next` is a plain pointer.
#[repr(C)]
struct Node {
    next: *mut Node,
    value: u64,
}

#[test]
fn pointer_stored_by_one_process_is_followed_by_another() {
    const N: usize = 10_000;
    match role().as_deref() {
        Some("build") => {
            let d = Domain::attach_with(&child_domain(), &small(GIB)).unwrap();
            let s = d.create_section("list", (N * 16 + 4096) as u64, &SectionOptions::new()).unwrap();
            s.commit(s.len() as u64).unwrap();
            let base = s.as_ptr();
            // SAFETY: the section is committed and ours alone until we exit; nodes start at
            // an 8-aligned offset and stay inside it.
            unsafe {
                let nodes = base.add(4096).cast::<Node>();
                // Link in reverse so pointers go backwards through memory.
                for i in 0..N {
                    let next = if i == 0 { std::ptr::null_mut() } else { nodes.add(i - 1) };
                    nodes.add(i).write(Node { next, value: i as u64 * 3 });
                }
                base.cast::<*mut Node>().write(nodes.add(N - 1));
            }
            println!("ADDR={:#x}", base as usize);
        }
        Some("walk") => {
            let d = Domain::attach_with(&child_domain(), &DomainOptions { must_exist: true, ..small(GIB) }).unwrap();
            let s = d.open_section("list").unwrap();
            let (mut sum, mut count) = (0u64, 0usize);
            // SAFETY: the builder wrote a null-terminated list of N nodes inside the section
            // before exiting; the count bound stops a corrupt cycle.
            unsafe {
                let mut p = s.as_ptr().cast::<*mut Node>().read();
                while !p.is_null() && count <= N {
                    sum += (*p).value;
                    count += 1;
                    p = (*p).next;
                }
            }
            println!("ADDR={:#x}", s.as_ptr() as usize);
            println!("COUNT={count}");
            println!("SUM={sum}");
        }
        _ => {
            let domain = unique_domain("ptr");
            let test = "pointer_stored_by_one_process_is_followed_by_another";
            let a = run(test, "build", &domain, &[]);
            let b = run(test, "walk", &domain, &[]);
            assert_eq!(a["ADDR"], b["ADDR"], "the section must have the same address in both processes");
            assert_eq!(b["COUNT"], N.to_string());
            assert_eq!(b["SUM"], (3 * (N as u64) * (N as u64 - 1) / 2).to_string());
            let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
            d.delete_section("list").unwrap();
            d.detach().unwrap();
            assert_clean(&domain);
        }
    }
}

#[test]
fn eight_processes_racing_create_or_open_agree() {
    match role().as_deref() {
        Some("racer") => {
            let start: u128 = std::env::var("START_AT").unwrap().parse().unwrap();
            let d = Domain::attach_with(&child_domain(), &small(GIB)).unwrap();
            let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
            if start > now {
                std::thread::sleep(Duration::from_nanos((start - now) as u64));
            }
            let (s, created) = d.create_or_open_section("race", MIB, &SectionOptions::new()).unwrap();
            println!("CREATED={created}");
            println!("ADDR={:#x}", s.as_ptr() as usize);
        }
        _ => {
            let domain = unique_domain("race");
            let start = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() + 400_000_000;
            let env = [("START_AT", start.to_string())];
            let test = "eight_processes_racing_create_or_open_agree";
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    let (domain, env) = (domain.clone(), env.clone());
                    std::thread::spawn(move || run(test, "racer", &domain, &env))
                })
                .collect();
            let reports: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
            let creators = reports.iter().filter(|r| r["CREATED"] == "true").count();
            assert_eq!(creators, 1, "exactly one process creates: {reports:?}");
            assert!(reports.iter().all(|r| r["ADDR"] == reports[0]["ADDR"]), "{reports:?}");
            let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
            assert_eq!(d.sections().len(), 1);
            d.delete_section("race").unwrap();
            d.detach().unwrap();
            assert_clean(&domain);
        }
    }
}

#[test]
fn two_domains_attached_in_one_process_have_disjoint_windows() {
    let (n1, n2) = (unique_domain("two-a"), unique_domain("two-b"));
    let d1 = Domain::attach_with(&n1, &small(4 * GIB)).unwrap();
    let d2 = Domain::attach_with(&n2, &small(4 * GIB)).unwrap();
    let (b1, s1) = d1.window();
    let (b2, s2) = d2.window();
    assert!(b1 + s1 <= b2 || b2 + s2 <= b1, "windows overlap: {b1:#x}+{s1:#x} and {b2:#x}+{s2:#x}");
    let x = d1.create_section("x", MIB, &SectionOptions::new().transient()).unwrap();
    let y = d2.create_section("x", MIB, &SectionOptions::new().transient()).unwrap();
    assert!(d1.contains(x.as_ptr() as usize) && d2.contains(y.as_ptr() as usize));
    // SAFETY: both sections are mapped, one page each is written by this thread only.
    unsafe {
        x.as_ptr().write(1);
        y.as_ptr().write(2);
        assert_eq!((x.as_ptr().read(), y.as_ptr().read()), (1, 2));
    }
    drop((x, y));
    d1.detach().unwrap();
    d2.detach().unwrap();
    assert_clean(&n1);
    assert_clean(&n2);
}

#[test]
fn attaching_the_same_domain_twice_shares_one_attachment() {
    let name = unique_domain("twice");
    let a = Domain::attach_with(&name, &small(GIB)).unwrap();
    let b = Domain::attach_with(&name, &small(GIB)).unwrap();
    assert_eq!(a.window(), b.window());
    assert_eq!(a.processes().len(), 1, "one process slot, not two");
    let s = a.create_section("s", 4096, &SectionOptions::new().transient()).unwrap();
    drop(a);
    // `b` and the section still hold the attachment: the transient section must survive.
    assert_eq!(b.open_section("s").unwrap().as_ptr(), s.as_ptr());
    drop(s);
    b.detach().unwrap();
    assert_clean(&name);
}

#[test]
fn persistent_section_survives_all_processes_and_reopens_at_the_same_address() {
    match role().as_deref() {
        Some("create") => {
            let d = Domain::attach_with(&child_domain(), &small(GIB)).unwrap();
            let s = d.create_section("keep", 64 * 1024, &SectionOptions::new()).unwrap();
            // SAFETY: freshly created, only this process uses it.
            unsafe { s.as_ptr().copy_from_nonoverlapping(b"still here".as_ptr(), 10) };
            println!("ADDR={:#x}", s.as_ptr() as usize);
        }
        Some("reopen") => {
            let d = Domain::attach_with(&child_domain(), &small(GIB)).unwrap();
            let s = d.open_section("keep").unwrap();
            let mut buf = [0u8; 10];
            // SAFETY: the creator wrote 10 bytes at the start before exiting.
            unsafe { s.as_ptr().copy_to_nonoverlapping(buf.as_mut_ptr(), 10) };
            println!("ADDR={:#x}", s.as_ptr() as usize);
            println!("DATA={}", String::from_utf8_lossy(&buf));
            d.delete_section("keep").unwrap();
        }
        _ => {
            let domain = unique_domain("persist");
            let test = "persistent_section_survives_all_processes_and_reopens_at_the_same_address";
            let a = run(test, "create", &domain, &[]);
            let report = inspect::inspect_domain(&domain, None).unwrap();
            assert!(report.processes.iter().all(|p| !p.alive), "nobody is attached now");
            assert_eq!(report.sections.len(), 1);
            let b = run(test, "reopen", &domain, &[]);
            assert_eq!(a["ADDR"], b["ADDR"]);
            assert_eq!(b["DATA"], "still here");
            assert_clean(&domain);
        }
    }
}

#[test]
fn transient_section_lives_until_the_last_process_detaches() {
    match role().as_deref() {
        Some("holder") => {
            let d = Domain::attach_with(&child_domain(), &small(GIB)).unwrap();
            let _s = d.create_section("tmp", 4096, &SectionOptions::new().transient()).unwrap();
            println!("READY");
            // Stay attached until the parent closes our stdin.
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
        }
        _ => {
            let domain = unique_domain("transient");
            let test = "transient_section_lives_until_the_last_process_detaches";
            let mut holder = spawn(test, "holder", &domain, &[]);
            wait_for_line(&mut holder, "READY");
            // A second process attaches and leaves: the section must survive, the holder is
            // still attached.
            let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
            assert!(d.open_section("tmp").is_ok());
            d.detach().unwrap();
            let report = inspect::inspect_domain(&domain, None).unwrap();
            assert_eq!(report.sections.len(), 1, "the holder is still attached");
            // The holder leaves last: section and registry go.
            drop(holder.stdin.take());
            let status = wait(&mut holder, Duration::from_secs(30));
            assert!(status.success());
            let err = inspect::inspect_domain(&domain, None).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
            assert_clean(&domain);
        }
    }
}

#[test]
fn gc_removes_what_a_killed_process_left_behind() {
    match role().as_deref() {
        Some("victim") => {
            let d = Domain::attach_with(&child_domain(), &small(GIB)).unwrap();
            let _s = d.create_section("orphan", MIB, &SectionOptions::new().transient()).unwrap();
            println!("READY");
            std::thread::sleep(Duration::from_secs(120));
        }
        _ => {
            let domain = unique_domain("gc");
            let mut victim = spawn("gc_removes_what_a_killed_process_left_behind", "victim", &domain, &[]);
            wait_for_line(&mut victim, "READY");
            let before = inspect::inspect_domain(&domain, None).unwrap();
            assert!(before.processes.iter().any(|p| p.alive && p.pid == victim.id()));
            kill9(&mut victim);
            let after = inspect::inspect_domain(&domain, None).unwrap();
            assert_eq!(after.processes.len(), 1);
            assert!(!after.processes[0].alive, "the kernel released the dead process's token");
            assert_eq!(leftovers(&domain).len(), 2, "registry and section remain until gc");
            let report = inspect::gc(Some(&domain), None, false).unwrap();
            assert_eq!(report.dead_processes, vec![(domain.clone(), victim.id())]);
            assert_eq!(report.removed_sections, vec![(domain.clone(), "orphan".to_owned())]);
            assert_eq!(report.removed_domains, vec![domain.clone()]);
            assert_clean(&domain);
        }
    }
}

#[test]
fn registry_survives_a_writer_killed_while_holding_its_lock() {
    match role().as_deref() {
        Some("writer") => {
            let d = Domain::attach_with(&child_domain(), &small(GIB)).unwrap();
            shmgadget::__testing::die_holding_registry_lock(&d, "half").unwrap();
        }
        _ => {
            let domain = unique_domain("robust");
            let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
            let mut writer = spawn("registry_survives_a_writer_killed_while_holding_its_lock", "writer", &domain, &[]);
            wait_for_line(&mut writer, "HOLDING");
            kill9(&mut writer);
            // The next locker repairs: the half-created entry is gone, creation works again.
            assert_eq!(d.open_section("half").unwrap_err().kind(), ErrorKind::NotFound);
            let s = d.create_section("half", 4096, &SectionOptions::new().transient()).unwrap();
            assert_eq!(d.sections().len(), 1);
            drop(s);
            d.detach().unwrap();
            assert_clean(&domain);
        }
    }
}

#[test]
fn sparse_64gib_section_costs_only_what_is_written_and_decommit_frees_it_for_everyone() {
    match role().as_deref() {
        Some("check") => {
            let d = Domain::attach_with(&child_domain(), &small(128 * GIB)).unwrap();
            let s = d.open_section("big").unwrap();
            let resident = s.info().resident.unwrap();
            println!("RESIDENT={resident}");
            // SAFETY: the section is mapped; reading never races a writer here (the parent
            // waits for us).
            let first = unsafe { s.as_ptr().add(12345).read_volatile() };
            println!("BYTE={first}");
        }
        _ => {
            let domain = unique_domain("sparse");
            let test = "sparse_64gib_section_costs_only_what_is_written_and_decommit_frees_it_for_everyone";
            let d = Domain::attach_with(&domain, &small(128 * GIB)).unwrap();
            let s = d.create_section("big", 64 * GIB, &SectionOptions::new()).unwrap();
            // SAFETY: the first MiB of the mapped section, written by this thread only.
            unsafe { s.as_ptr().write_bytes(0xAB, MIB as usize) };
            let resident = s.info().resident.unwrap();
            assert!(resident <= MIB + MIB / 10, "64 GiB reserved with 1 MiB written: {resident} bytes resident");
            let seen = run(test, "check", &domain, &[]);
            assert_eq!(seen["BYTE"], "171", "the other process sees the written pages");
            s.decommit(0, MIB).unwrap();
            assert_eq!(s.info().resident, Some(0));
            let seen = run(test, "check", &domain, &[]);
            assert_eq!(seen["RESIDENT"], "0", "decommit freed the pages for every process");
            assert_eq!(seen["BYTE"], "0", "a decommitted page reads as zero elsewhere");
            drop(s);
            d.delete_section("big").unwrap();
            d.detach().unwrap();
            assert_clean(&domain);
        }
    }
}

#[test]
fn commit_past_a_full_tmpfs_is_a_clean_out_of_space_error() {
    let Some(fs) = Tmpfs::mount("tmpfs", "size=8m") else { return };
    let mnt = fs.path.clone();
    let domain = unique_domain("enospc");
    let opts = DomainOptions { shm_dir: Some(mnt.clone()), ..small(GIB) };
    let d = Domain::attach_with(&domain, &opts).unwrap();
    let s = d.create_section("fill", 64 * MIB, &SectionOptions::new()).unwrap();
    let err = s.commit(32 * MIB).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::OutOfSpace, "{err}");
    assert!(err.to_string().contains("full"), "message says what to do: {err}");
    // The process keeps running and smaller commits still work.
    s.commit(MIB).unwrap();
    // SAFETY: the first MiB is committed, written by this thread only.
    unsafe { s.as_ptr().write_bytes(1, MIB as usize) };
    drop(s);
    d.delete_section("fill").unwrap();
    d.detach().unwrap();
    assert!(std::fs::read_dir(&mnt).unwrap().next().is_none(), "nothing left in the tmpfs");
}

fn unsafe_geteuid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

#[test]
fn bad_names_and_sizes_are_rejected_without_side_effects() {
    let domain = unique_domain("errors");
    for bad in ["", "a/b", "a b", "x:y", &"n".repeat(64)] {
        assert_eq!(Domain::attach(bad).unwrap_err().kind(), ErrorKind::InvalidName, "domain {bad:?}");
    }
    let d = Domain::attach_with(&domain, &small(64 * MIB)).unwrap();
    let opts = SectionOptions::new().transient();
    assert_eq!(d.create_section("bad/name", 4096, &opts).unwrap_err().kind(), ErrorKind::InvalidName);
    assert_eq!(d.create_section("zero", 0, &opts).unwrap_err().kind(), ErrorKind::InvalidSize);
    let too_big = d.create_section("huge", 65 * MIB, &opts).unwrap_err();
    assert_eq!(too_big.kind(), ErrorKind::InvalidSize);
    assert!(too_big.to_string().contains("window"), "{too_big}");
    assert_eq!(d.create_section("absurd", u64::MAX, &opts).unwrap_err().kind(), ErrorKind::InvalidSize);
    assert_eq!(d.create_section("m", 1, &opts.clone().mode(0o7777)).unwrap_err().kind(), ErrorKind::InvalidArgument);
    let s = d.create_section("one", 1, &opts).unwrap();
    assert_eq!(s.len(), 4096, "sizes round up to pages");
    let dup = d.create_section("one", 1, &opts).unwrap_err();
    assert_eq!(dup.kind(), ErrorKind::AlreadyExists);
    assert!(dup.to_string().contains("shmgadget rm"), "says what to do next: {dup}");
    assert_eq!(d.open_section("missing").unwrap_err().kind(), ErrorKind::NotFound);
    assert_eq!(d.delete_section("missing").unwrap_err().kind(), ErrorKind::NotFound);
    assert_eq!(s.commit(8192).unwrap_err().kind(), ErrorKind::InvalidSize);
    assert_eq!(s.decommit(1, 10).unwrap_err().kind(), ErrorKind::InvalidArgument);
    assert_eq!(s.decommit(0, 8192).unwrap_err().kind(), ErrorKind::InvalidSize);
    let wrong_kind = d.create_or_open_section("one", 1, &opts.clone().kind(SectionKind::Heap)).unwrap_err();
    assert_eq!(wrong_kind.kind(), ErrorKind::InvalidArgument);
    assert_eq!(d.create_or_open_section("one", 8192, &opts).unwrap_err().kind(), ErrorKind::InvalidSize);
    // Options are validated too.
    let bad_window = DomainOptions { window_size: 3 * MIB, ..Default::default() };
    assert_eq!(Domain::attach_with(&unique_domain("w"), &bad_window).unwrap_err().kind(), ErrorKind::InvalidSize);
    let missing = DomainOptions { must_exist: true, ..Default::default() };
    assert_eq!(Domain::attach_with(&unique_domain("none"), &missing).unwrap_err().kind(), ErrorKind::NotFound);
    // Nothing above disturbed the one good section.
    assert_eq!(d.sections().len(), 1);
    drop(s);
    d.detach().unwrap();
    assert_clean(&domain);
}

#[test]
fn full_window_and_full_registry_are_reported() {
    let domain = unique_domain("full");
    let opts = DomainOptions { max_sections: 4, ..small(16 * MIB) };
    let d = Domain::attach_with(&domain, &opts).unwrap();
    let t = SectionOptions::new().transient();
    // 16 MiB window = 8 chunks of 2 MiB. Take 6 MiB + 6 MiB, then 6 MiB does not fit.
    let a = d.create_section("a", 6 * MIB, &t).unwrap();
    let b = d.create_section("b", 6 * MIB, &t).unwrap();
    let err = d.create_section("c", 6 * MIB, &t).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::WindowFull, "{err}");
    // Two small ones fill the 4 registry slots; a fifth section has no slot.
    let c = d.create_section("c", 4096, &t).unwrap();
    let e = d.create_section("e", 4096, &t).unwrap();
    let err = d.create_section("f", 4096, &t).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::RegistryFull, "{err}");
    // Deleting frees both the slot and the range.
    drop(a);
    d.delete_section("a").unwrap();
    let f = d.create_section("f", 6 * MIB, &t).unwrap();
    drop((b, c, e, f));
    d.detach().unwrap();
    assert_clean(&domain);
}

#[test]
fn occupied_window_is_reported_with_its_occupant() {
    let base: u64 = 0x6a00_0000_0000;
    // SAFETY: a fresh anonymous mapping at an address nothing in this test binary uses;
    // MAP_FIXED_NOREPLACE guarantees we do not clobber anything.
    let p = unsafe {
        libc::mmap(
            base as *mut libc::c_void,
            4096,
            libc::PROT_READ,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    assert_eq!(p as u64, base, "test setup: could not map the blocker");
    let domain = unique_domain("occupied");
    let opts = DomainOptions { window_base: Some(base), ..small(GIB) };
    let err = Domain::attach_with(&domain, &opts).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::WindowUnavailable);
    let msg = err.to_string();
    assert!(msg.contains("0x6a0000000000") && msg.contains("6a0000000000-6a0000001000"), "{msg}");
    // SAFETY: unmapping the blocker we mapped above.
    unsafe { libc::munmap(p, 4096) };
    assert_clean(&domain);
}

#[test]
fn foreign_owners_and_mode_bits_are_refused() {
    match role().as_deref() {
        Some("other-user") => {
            // SAFETY: plain setgid/setuid calls in a single-threaded child process.
            unsafe {
                assert_eq!(libc::setgid(65534), 0);
                assert_eq!(libc::setuid(65534), 0);
            }
            let domain = child_domain();
            let err = Domain::attach_with(&domain, &small(GIB)).unwrap_err();
            println!("PLAIN={:?}", err.kind());
            let trusting = DomainOptions { allow_foreign_owner: true, must_exist: true, ..small(GIB) };
            let err = Domain::attach_with(&domain, &trusting).unwrap_err();
            println!("TRUSTING={:?}", err.kind());
        }
        _ => {
            if unsafe_geteuid() != 0 {
                eprintln!("skipped: switching users needs root");
                return;
            }
            let domain = unique_domain("perm");
            let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
            let s = d.create_section("mine", 4096, &SectionOptions::new().transient()).unwrap();
            // Another user: refused by default for the foreign owner, and by the 0600 mode
            // bits when it opts in to trusting the owner.
            let r = run("foreign_owners_and_mode_bits_are_refused", "other-user", &domain, &[]);
            assert_eq!(r["PLAIN"], "PermissionDenied");
            assert_eq!(r["TRUSTING"], "PermissionDenied");
            // A section object that another user owns is refused by this user.
            let info = d.section_info("mine").unwrap();
            let path = object_path(&info.object);
            std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
            drop(s);
            // The owner check runs on every open, before mapping.
            let err = d.open_section("mine").unwrap_err();
            assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{err}");
            assert!(err.to_string().contains("65534"), "{err}");
            d.detach().unwrap();
            assert_clean(&domain);
        }
    }
}

#[test]
fn corrupt_registries_are_refused_with_what_was_expected() {
    let cases: [(&str, u64, &[u8]); 4] = [
        ("magic", 0, b"NOTMAGIC"),
        ("layout version", 8, &[99, 0, 0, 0]),
        ("fingerprint", 12, &[1, 2, 3, 4]),
        ("offsets", 56, &[0xff; 8]),
    ];
    for (what, offset, bytes) in cases {
        let domain = unique_domain("corrupt");
        let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
        let path = object_path(&format!("shmgadget.{domain}:registry"));
        // Leave the registry behind by creating a persistent section, then detach.
        drop(d.create_section("s", 4096, &SectionOptions::new()).unwrap());
        d.detach().unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, bytes, offset).unwrap();
        let err = Domain::attach_with(&domain, &small(GIB)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt, "{what}: {err}");
        assert!(err.to_string().contains("expected"), "{what}: {err}");
        // Listing shows it as unreadable instead of failing.
        let listed = inspect::list_domains(None).unwrap();
        assert!(listed.iter().any(|e| matches!(e, DomainEntry::Unreadable { name, .. } if *name == domain)));
        // gc leaves it alone without --force, removes it (and its sections) with it.
        let kept = inspect::gc(Some(&domain), None, false).unwrap();
        assert_eq!(kept.skipped.len(), 1, "{what}");
        inspect::gc(Some(&domain), None, true).unwrap();
        assert_clean(&domain);
    }
    // A truncated registry.
    let domain = unique_domain("truncated");
    let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
    drop(d.create_section("s", 4096, &SectionOptions::new()).unwrap());
    d.detach().unwrap();
    let path = object_path(&format!("shmgadget.{domain}:registry"));
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(1000).unwrap();
    let err = Domain::attach_with(&domain, &small(GIB)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt);
    assert!(err.to_string().contains("truncated"), "{err}");
    inspect::gc(Some(&domain), None, true).unwrap();
    assert_clean(&domain);
}

#[test]
fn a_truncated_section_object_is_refused_not_mapped() {
    let domain = unique_domain("trunc-sec");
    let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
    let info = {
        let s = d.create_section("s", 1 << 20, &SectionOptions::new()).unwrap();
        s.info()
    };
    std::fs::OpenOptions::new().write(true).open(object_path(&info.object)).unwrap().set_len(4096).unwrap();
    d.detach().unwrap();
    // A new attachment (fresh mapping table) must refuse to map it.
    let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
    let err = d.open_section("s").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    d.delete_section("s").unwrap();
    d.detach().unwrap();
    assert_clean(&domain);
}

#[test]
fn map_all_maps_every_section_and_listing_reports_them() {
    match role().as_deref() {
        Some("mapper") => {
            let d = Domain::attach_with(&child_domain(), &small(GIB)).unwrap();
            println!("MAPPED={}", d.map_all().unwrap());
            let info = d.sections();
            // SAFETY: map_all mapped every section; each was written by the parent.
            let sum: u64 = info.iter().map(|s| unsafe { (s.address as *const u8).read() } as u64).sum();
            println!("SUM={sum}");
        }
        _ => {
            let domain = unique_domain("mapall");
            let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
            let sections: Vec<_> = (1..=5u8)
                .map(|i| {
                    let s = d.create_section(&format!("s{i}"), 4096, &SectionOptions::new().transient()).unwrap();
                    // SAFETY: first byte of a fresh, mapped section.
                    unsafe { s.as_ptr().write(i) };
                    s
                })
                .collect();
            let r = run("map_all_maps_every_section_and_listing_reports_them", "mapper", &domain, &[]);
            assert_eq!(r["MAPPED"], "5");
            assert_eq!(r["SUM"], "15");
            let listed = inspect::inspect_domain(&domain, None).unwrap();
            assert_eq!(listed.sections.len(), 5);
            assert!(listed.processes.iter().any(|p| p.pid == std::process::id() && p.alive));
            drop(sections);
            d.detach().unwrap();
            assert_clean(&domain);
        }
    }
}

#[test]
fn creating_and_deleting_sections_in_a_loop_does_not_leak_mappings() {
    // More cycles than the default vm.max_map_count (65,530): if deleted sections stayed mapped
    // in the deleting process, mmap would start failing with ENOMEM.
    // The window must have more chunks than that too, or placement would wrap around and
    // MAP_FIXED would replace old mappings anyway.
    let domain = unique_domain("churn");
    let d = Domain::attach_with(&domain, &small(256 * GIB)).unwrap();
    let opts = SectionOptions::new().transient();
    for i in 0..70_000u32 {
        let s = d.create_section("churn", 4096, &opts).unwrap_or_else(|e| panic!("cycle {i}: {e}"));
        // SAFETY: a fresh, mapped page written by this thread only.
        unsafe { s.as_ptr().write(1) };
        drop(s);
        d.delete_section("churn").unwrap();
    }
    d.detach().unwrap();
    assert_clean(&domain);
}

#[test]
fn thousands_of_names_stay_findable_through_deletes_and_recreates() {
    let domain = unique_domain("names");
    let opts = DomainOptions { max_sections: 2048, ..small(8 * GIB) };
    let d = Domain::attach_with(&domain, &opts).unwrap();
    let t = SectionOptions::new().transient();
    let name = |i: u32| format!("n{i}");
    for i in 0..2000 {
        drop(d.create_section(&name(i), 4096, &t).unwrap());
    }
    for i in (0..2000).step_by(2) {
        d.delete_section(&name(i)).unwrap();
    }
    for i in 0..2000 {
        let found = d.open_section(&name(i));
        assert_eq!(found.is_ok(), i % 2 == 1, "section {i}: {found:?}");
    }
    for i in (0..2000).step_by(2) {
        drop(d.create_section(&name(i), 4096, &t).unwrap());
    }
    for i in 0..2000 {
        assert_eq!(d.open_section(&name(i)).unwrap().name(), name(i));
    }
    assert_eq!(d.create_section(&name(7), 4096, &t).unwrap_err().kind(), ErrorKind::AlreadyExists);
    d.detach().unwrap();
    assert_clean(&domain);
}
