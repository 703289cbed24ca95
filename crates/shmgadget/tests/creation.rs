//! All-or-nothing creation: a section is usable by others only once its creator finished it;
//! a creator that dies half-way leaves nothing the next create-or-open (or `gc`) cannot undo,
//! and a create that fails leaves nothing at all.
#![cfg(unix)]

mod common;

use std::io::BufRead;
use std::time::{Duration, Instant};

use common::*;
use shmgadget::heap::Heap;
use shmgadget::queue::{ByteQueue, SlotQueue};
use shmgadget::{Domain, DomainOptions, ErrorKind, SectionKind, SectionOptions};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// A child that creates `name` unfinished (as a heap or queue creator does before its header
/// is ready), says `UNFINISHED`, and then either hangs (to be killed) or, with `FINISH_AFTER_MS`
/// set, finishes it after that long and says `FINISHED`.
fn unfinished_creator(kind: SectionKind) {
    let d = Domain::attach_with(&child_domain(), &small(GIB)).unwrap();
    let name = std::env::var("NAME").unwrap();
    let (section, rec) = shmgadget::__testing::create_unfinished(&d, &name, kind, 4 * MIB).unwrap();
    println!("UNFINISHED");
    if let Ok(ms) = std::env::var("FINISH_AFTER_MS") {
        std::thread::sleep(Duration::from_millis(ms.parse().unwrap()));
        shmgadget::__testing::finish_unfinished(&d, &rec).unwrap();
        println!("FINISHED");
        // Stay attached until the parent closes our stdin.
        let _ = std::io::stdin().lock().lines().next();
        drop(section);
        d.detach().unwrap();
        return;
    }
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Starts an unfinished creator of `name` and waits until its section exists.
fn start_creator(test: &str, role: &str, domain: &str, name: &str, extra: &[(&str, String)]) -> std::process::Child {
    let mut env = vec![("NAME", name.to_owned())];
    env.extend(extra.iter().cloned());
    let mut child = spawn(test, role, domain, &env);
    wait_for_line(&mut child, "UNFINISHED");
    child
}

#[test]
fn a_heap_and_a_queue_left_unfinished_by_a_killed_creator_are_made_anew_by_the_next_create_or_open() {
    const TEST: &str =
        "a_heap_and_a_queue_left_unfinished_by_a_killed_creator_are_made_anew_by_the_next_create_or_open";
    match role().as_deref() {
        Some("heap") => unfinished_creator(SectionKind::Heap),
        Some("queue") => unfinished_creator(SectionKind::Queue),
        _ => {
            let domain = unique_domain("unfin");
            let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
            let names = [("heap", "h"), ("queue", "q"), ("queue", "slots"), ("heap", "opened"), ("heap", "left")];
            for (role, name) in names {
                let mut child = start_creator(TEST, role, &domain, name, &[]);
                kill9(&mut child);
                assert!(d.sections().iter().any(|s| s.name == name), "the unfinished {name:?} is listed");
            }
            let t = Instant::now();
            let (heap, created) = Heap::create_or_open(&d, "h", 4 * MIB).unwrap();
            assert!(created, "the dead creator's heap was replaced, not opened");
            heap.alloc(std::alloc::Layout::from_size_align(100, 8).unwrap()).unwrap();
            heap.check().unwrap();
            let (q, created) = ByteQueue::create_or_open(&d, "q", 64 << 10).unwrap();
            assert!(created);
            let mut tx = q.sender().unwrap();
            tx.try_send(b"hello").unwrap();
            let (slots, created) = SlotQueue::<u64>::create_or_open(&d, "slots", 16).unwrap();
            assert!(created);
            // A plain open of an unfinished name removes it and says why.
            let err = Heap::open(&d, "opened").unwrap_err();
            assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
            assert!(err.to_string().contains("died before initialising it"), "{err}");
            assert!(!d.sections().iter().any(|s| s.name == "opened"));
            // No wait for a creator known dead (the old code waited 2 s per name and failed).
            assert!(t.elapsed() < Duration::from_secs(1), "took {:?}", t.elapsed());
            drop(tx);
            drop((q, heap, slots));
            for s in d.sections().into_iter().filter(|s| s.name != "left") {
                d.delete_section(&s.name).unwrap();
            }
            // The last process to leave removes what nobody can finish any more.
            d.detach().unwrap();
            assert_clean(&domain);
        }
    }
}

#[test]
fn create_or_open_waits_for_a_live_creator_and_then_opens_what_it_made() {
    const TEST: &str = "create_or_open_waits_for_a_live_creator_and_then_opens_what_it_made";
    match role().as_deref() {
        Some("slow") => unfinished_creator(SectionKind::Raw),
        _ => {
            let domain = unique_domain("slowc");
            let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
            let mut child = start_creator(TEST, "slow", &domain, "slow", &[("FINISH_AFTER_MS", "300".into())]);
            let t = Instant::now();
            let opts = SectionOptions::new().kind(SectionKind::Raw);
            let (s, created) = d.create_or_open_section("slow", 4 * MIB, &opts).unwrap();
            assert!(!created, "the live creator's section was opened, not replaced");
            assert!(t.elapsed() >= Duration::from_millis(200), "it waited for the creator: {:?}", t.elapsed());
            // An exclusive create of a name being created is refused, not raced.
            let err = d.create_section("slow", 4096, &opts).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::AlreadyExists, "{err}");
            drop(s);
            drop(child.stdin.take());
            assert!(wait(&mut child, Duration::from_secs(30)).success());
            d.delete_section("slow").unwrap();
            d.detach().unwrap();
            assert_clean(&domain);
        }
    }
}

#[test]
fn gc_removes_a_never_ready_section_whose_creator_died_and_keeps_one_whose_creator_lives() {
    const TEST: &str = "gc_removes_a_never_ready_section_whose_creator_died_and_keeps_one_whose_creator_lives";
    match role().as_deref() {
        Some("creator") => unfinished_creator(SectionKind::Heap),
        _ => {
            let domain = unique_domain("gcunf");
            // The parent stays attached (a live process), so gc keeps the domain and removes
            // only what can never be finished.
            let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
            let mut dead = start_creator(TEST, "creator", &domain, "dead", &[]);
            let dead_pid = dead.id();
            kill9(&mut dead);
            let mut alive = start_creator(TEST, "creator", &domain, "alive", &[]);
            let report = shmgadget::inspect::gc(Some(&domain), None, false).unwrap();
            assert_eq!(report.removed_unfinished, vec![(domain.clone(), "dead".to_owned(), dead_pid)]);
            let names: Vec<String> = d.sections().into_iter().map(|s| s.name).collect();
            assert_eq!(names, vec!["alive".to_owned()], "the live creator's section stays");
            assert!(leftovers(&domain).iter().all(|f| !f.ends_with(":dead")), "{:?}", leftovers(&domain));
            kill9(&mut alive);
            let report = shmgadget::inspect::gc(Some(&domain), None, false).unwrap();
            assert_eq!(report.removed_unfinished.len(), 1);
            assert!(d.sections().is_empty());
            d.detach().unwrap();
            assert_clean(&domain);
        }
    }
}

#[test]
fn a_create_on_a_full_tmpfs_leaves_no_entry_and_no_object() {
    // 8 MiB and 4 inodes: the root, the registry, the filler and one more object.
    let Some(fs) = Tmpfs::mount("full", "size=8m,nr_inodes=4") else { return };
    let mnt = fs.path.clone();
    let domain = unique_domain("full");
    let opts = DomainOptions { shm_dir: Some(mnt.clone()), ..small(GIB) };
    let d = Domain::attach_with(&domain, &opts).unwrap();
    let files = || {
        let mut v: Vec<String> =
            std::fs::read_dir(&mnt).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        v.sort();
        v
    };
    let fill = d.create_section("fill", 8 * MIB, &SectionOptions::new()).unwrap();
    // Fill the store: commit as much as it takes.
    let mut committed = 0;
    while fill.commit(committed + 256 * 1024).is_ok() {
        committed += 256 * 1024;
    }
    let before = files();
    assert_eq!(before.len(), 2, "{before:?}");
    // Heaps and queues fail at their first commit, after their object exists.
    let err = Heap::create(&d, "heap", 4 * MIB).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::OutOfSpace, "{err}");
    let err = Heap::create_or_open(&d, "heap2", 4 * MIB).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::OutOfSpace, "{err}");
    let err = ByteQueue::create(&d, "queue", MIB).err().expect("no room for the ring");
    assert_eq!(err.kind(), ErrorKind::OutOfSpace, "{err}");
    let err = SlotQueue::<u64>::create_or_open(&d, "slots", 1 << 16).err().expect("no room for the slots");
    assert_eq!(err.kind(), ErrorKind::OutOfSpace, "{err}");
    // A raw section is sparse (nothing to commit), so it fails only for want of an inode.
    let one = d.create_section("one-more", MIB, &SectionOptions::new()).unwrap();
    let err = d.create_section("no-inode", MIB, &SectionOptions::new()).unwrap_err();
    assert!(err.to_string().contains("no-inode"), "{err}");
    drop(one);
    d.delete_section("one-more").unwrap();
    let names: Vec<String> = d.sections().into_iter().map(|s| s.name).collect();
    assert_eq!(names, vec!["fill".to_owned()], "the registry has no entry of a failed create");
    assert_eq!(files(), before, "no object of a failed create is left");
    // Every name is free again once there is room.
    fill.decommit(0, 8 * MIB).unwrap();
    let heap = Heap::create(&d, "heap", 4 * MIB).unwrap();
    heap.check().unwrap();
    drop((heap, fill));
    for s in d.sections() {
        d.delete_section(&s.name).unwrap();
    }
    d.detach().unwrap();
    assert!(files().is_empty(), "nothing left in the tmpfs: {:?}", files());
}

#[test]
fn a_registry_left_unfinished_by_a_dead_creator_is_made_anew_by_the_next_attach_and_removed_by_gc() {
    use std::os::unix::fs::OpenOptionsExt;
    // What a creator killed inside `Registry::create` leaves: the object before it was sized,
    // or sized with a header whose `ready` word was never published.
    let leave_unfinished = |domain: &str, header: bool| {
        let path = object_path(&format!("shmgadget.{domain}:registry"));
        let f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path).unwrap();
        if header {
            f.set_len(MIB).unwrap();
            std::os::unix::fs::FileExt::write_all_at(&f, b"SHMGREG\x01", 0).unwrap();
        }
    };
    for header in [false, true] {
        let domain = unique_domain("unfreg");
        leave_unfinished(&domain, header);
        let err = Domain::attach_with(&domain, &DomainOptions { must_exist: true, ..small(GIB) }).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
        let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
        let s = d.create_section("works", 4096, &SectionOptions::new()).unwrap();
        drop(s);
        d.delete_section("works").unwrap();
        d.detach().unwrap();
        assert_clean(&domain);
    }
    let domain = unique_domain("unfreg-gc");
    leave_unfinished(&domain, true);
    let report = shmgadget::inspect::gc(Some(&domain), None, false).unwrap();
    assert_eq!(report.removed_domains, vec![domain.clone()], "{report:?}");
    assert_clean(&domain);
}

#[test]
fn a_creator_that_stays_alive_without_finishing_is_reported_by_pid_after_a_bounded_wait() {
    const TEST: &str = "a_creator_that_stays_alive_without_finishing_is_reported_by_pid_after_a_bounded_wait";
    match role().as_deref() {
        Some("stuck") => unfinished_creator(SectionKind::Heap),
        Some("opener") => {
            // A process of its own, so the shortened bound affects no other test.
            shmgadget::__testing::set_creator_wait(Duration::from_millis(300));
            let d = Domain::attach_with(&child_domain(), &small(GIB)).unwrap();
            let t = Instant::now();
            let err = Heap::create_or_open(&d, "stuck", 4 * MIB).unwrap_err();
            println!("WAITED_MS={}", t.elapsed().as_millis());
            println!("KIND={:?}", err.kind());
            println!("TEXT={err}");
            println!("OPEN_KIND={:?}", Heap::open(&d, "stuck").unwrap_err().kind());
            d.detach().unwrap();
        }
        _ => {
            let domain = unique_domain("stuck");
            let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
            let mut child = start_creator(TEST, "stuck", &domain, "stuck", &[]);
            let seen = run(TEST, "opener", &domain, &[]);
            assert!(seen["WAITED_MS"].parse::<u64>().unwrap() >= 300, "{seen:?}");
            assert_eq!(seen["KIND"], "Timeout", "{seen:?}");
            let text = &seen["TEXT"];
            assert!(text.contains(&format!("pid {}", child.id())) && !text.contains("died"), "{text}");
            assert_eq!(seen["OPEN_KIND"], "Timeout", "{seen:?}");
            kill9(&mut child);
            // Now it is dead: the same call makes the heap at once.
            let (heap, created) = Heap::create_or_open(&d, "stuck", 4 * MIB).unwrap();
            assert!(created);
            drop(heap);
            d.delete_section("stuck").unwrap();
            d.detach().unwrap();
            assert_clean(&domain);
        }
    }
}
