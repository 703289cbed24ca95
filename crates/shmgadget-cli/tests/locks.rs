//! A lock word (the registry's, a heap's) set to a holder that is dead or never existed, as an
//! operator's stray write would (or a holder killed between taking the word and recording
//! itself): `gc`, `create`, `rm` and `heap --check` report it within 10 s instead of hanging,
//! plain `gc` removes nothing, and `gc --force` breaks the lock within 10 s, after which the
//! domain works (create, open, alloc) in separate processes. A heap lock whose word alone
//! names a thread that does not exist, in a domain whose processes all share our pid
//! namespace, is instead taken over by its next locker (`heap --check`), as a dead holder's.

mod common;

use common::{ShmDir, cli, objects, run_bounded};

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// The registry lock's first word (glibc `__lock`, the holder's tid) at offset 192.
const REGISTRY_LOCK_WORD: usize = 192;
/// A heap's lock word: the control block's `RawMutex` at 128, its glibc mutex 32 bytes in.
const HEAP_LOCK_WORD: usize = 128 + 32;
/// The registry's lock-owner token word (offset 120; low half the incarnation, high half the
/// slot + 1).
const REGISTRY_LOCK_OWNER: usize = 120;
/// A heap lock's recorded owner token (the `RawMutex`'s `owner_token`, 24 bytes in).
const HEAP_LOCK_OWNER: usize = 128 + 24;
/// No such thread can exist (above any pid_max, inside the tid mask).
const ABSENT_TID: u32 = 0x3fff_fff0;
/// A token for process slot 7, incarnation 1: a registration nobody holds.
const DEAD_TOKEN: (u32, u32) = (1, 8);

/// Whether the mounted `/proc` is this process's pid namespace's (`/proc/self` names our pid):
/// only then can thread ids be judged there, and a lock word naming a gone thread be taken over.
fn proc_is_ours() -> bool {
    std::fs::read_link("/proc/self").ok().and_then(|p| p.to_str()?.parse::<u32>().ok()) == Some(std::process::id())
}

/// The cases: (name, lock word, a recorded owner token, what the report says of the holder).
type Case = (&'static str, u32, Option<(u32, u32)>, String);

fn cases() -> Vec<Case> {
    let dead = dead_pid();
    let me = std::process::id();
    vec![
        ("absent", ABSENT_TID, None, format!("thread {ABSENT_TID} (no registration recorded), which does not exist")),
        ("dead", dead, None, format!("thread {dead} (no registration recorded), which does not exist")),
        // A live thread (this test's) in the word, but the recorded holder's registration is dead.
        ("token", me, Some(DEAD_TOKEN), format!("slot 7 (thread {me}), which is not alive")),
    ]
}

/// The pid of a process that has exited and been reaped (a dead holder).
fn dead_pid() -> u32 {
    let mut child = Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    pid
}

/// Writes `word` at `at` of object `object`, as a stray write would.
fn poke(dir: &Path, object: &str, at: usize, word: u32) {
    let path = dir.join(object);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[at..at + 4].copy_from_slice(&word.to_le_bytes());
    // Write in place (the object keeps its identity and its other pages).
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&bytes[at..at + 4], at as u64).unwrap();
}

/// A domain with a persistent raw section `keep` and a persistent heap `h`; returns the heap's
/// object name.
fn setup(dir: &Path, domain: &str) -> String {
    let (code, _, se) = run_bounded(cli(dir, domain, &["create", "keep", "--size", "4K"]), "setup create");
    assert_eq!(code, 0, "{se}");
    let (code, _, se) = run_bounded(cli(dir, domain, &["create", "h", "--size", "1M", "--kind", "heap"]), "setup heap");
    assert_eq!(code, 0, "{se}");
    objects(dir, domain).into_iter().find(|o| o.ends_with(":h")).expect("the heap's object")
}

/// After the repair: create, open and alloc work (CLI and the library, in other processes).
fn domain_works(dir: &Path, domain: &str, what: &str) {
    let (code, _, se) = run_bounded(cli(dir, domain, &["create", "n", "--size", "4K"]), &format!("{what}: create"));
    assert_eq!(code, 0, "{what}: create after the repair: {se}");
    let (code, _, se) = run_bounded(cli(dir, domain, &["rm", "n"]), &format!("{what}: rm"));
    assert_eq!(code, 0, "{what}: rm after the repair: {se}");
    let (code, so, se) = run_bounded(cli(dir, domain, &["heap", "h", "--check"]), &format!("{what}: heap --check"));
    assert_eq!(code, 0, "{what}: heap --check after the repair: {so}{se}");
    let mut lib = Command::new(std::env::current_exe().unwrap());
    lib.args(["--exact", "alloc_role", "--nocapture", "--test-threads=1"])
        .env("SHMGADGET_LOCKS_ROLE", domain)
        .env("SHMGADGET_SHM_DIR", dir);
    let (code, so, se) = run_bounded(lib, &format!("{what}: library calls"));
    assert!(so.contains("alloc role done"), "{what}: the library role failed ({code}): {so}{se}");
}

/// Removes whatever is left of the domain.
fn clean(dir: &Path, domain: &str) {
    run_bounded(cli(dir, domain, &["gc", "--force"]), "cleanup gc --force");
    for o in objects(dir, domain) {
        let _ = std::fs::remove_file(dir.join(o));
    }
}

/// Not a test of its own: the child process of `domain_works` that opens and allocates.
#[test]
fn alloc_role() {
    let Ok(domain) = std::env::var("SHMGADGET_LOCKS_ROLE") else { return };
    use shmgadget::{Domain, DomainOptions};
    let opts = DomainOptions { must_exist: true, ..Default::default() };
    let d = Domain::attach_with(&domain, &opts).expect("attach");
    let s = d.open_section("keep").expect("open keep");
    // SAFETY: a live section's mapping covers its length.
    let _ = unsafe { std::ptr::read_volatile(s.as_ptr()) };
    let h = shmgadget::heap::Heap::open(&d, "h").expect("open the heap");
    let layout = std::alloc::Layout::from_size_align(1000, 8).unwrap();
    let p = h.alloc(layout).expect("alloc");
    // SAFETY: `p` came from this heap and is not used after.
    unsafe { h.free(p) }.expect("free");
    h.check().expect("check");
    d.detach().expect("detach");
    println!("alloc role done");
}

fn skip_in_role() -> bool {
    std::env::var_os("SHMGADGET_LOCKS_ROLE").is_some()
}

#[test]
fn a_registry_lock_word_naming_a_dead_or_absent_holder_is_reported_and_gc_force_repairs_it() {
    if skip_in_role() {
        return;
    }
    let dir = ShmDir::new("locks-reg");
    for (case, tid, token, holder) in cases() {
        let domain = format!("lk-reg-{case}");
        let registry = format!("shmgadget.{domain}:registry");
        setup(&dir.0, &domain);
        let before = objects(&dir.0, &domain);
        poke(&dir.0, &registry, REGISTRY_LOCK_WORD, tid);
        if let Some((lo, hi)) = token {
            poke(&dir.0, &registry, REGISTRY_LOCK_OWNER, lo);
            poke(&dir.0, &registry, REGISTRY_LOCK_OWNER + 4, hi);
        }
        for args in [&["gc"][..], &["create", "n2", "--size", "4K"], &["rm", "keep"]] {
            let start = Instant::now();
            let (code, so, se) = run_bounded(cli(&dir.0, &domain, args), &format!("{case}: {args:?}"));
            assert_ne!(code, 0, "{case}: {args:?} on a stuck registry lock exits non-zero: {so}{se}");
            assert!(
                se.contains(&format!("registry lock of domain {domain} is held by {holder}")),
                "{case}: {args:?} names the lock and its holder: {se}"
            );
            assert!(se.contains("gc --domain") && se.contains("--force"), "{case}: {args:?} says what to do: {se}");
            assert!(start.elapsed() < Duration::from_secs(10), "{case}: {args:?} took {:?}", start.elapsed());
        }
        assert_eq!(objects(&dir.0, &domain), before, "{case}: nothing removed while the lock is stuck");
        let start = Instant::now();
        let (code, so, se) = run_bounded(cli(&dir.0, &domain, &["gc", "--force"]), &format!("{case}: gc --force"));
        assert_eq!(code, 0, "{case}: gc --force: {so}{se}");
        assert!(so.contains("broke a lock"), "{case}: gc --force says it broke the lock: {so}");
        assert!(start.elapsed() < Duration::from_secs(10));
        assert_eq!(objects(&dir.0, &domain), before, "{case}: gc --force keeps the persistent sections");
        domain_works(&dir.0, &domain, case);
        clean(&dir.0, &domain);
    }
}

#[test]
fn a_heap_lock_word_naming_a_dead_or_absent_holder_is_taken_over_or_reported_and_gc_force_repairs_it() {
    if skip_in_role() {
        return;
    }
    let dir = ShmDir::new("locks-heap");
    for (case, tid, token, holder) in cases() {
        if token.is_none() && !proc_is_ours() {
            eprintln!("{case}: skipped (the mounted /proc is not this pid namespace's)");
            continue;
        }
        let domain = format!("lk-heap-{case}");
        let heap = setup(&dir.0, &domain);
        let before = objects(&dir.0, &domain);
        poke(&dir.0, &heap, HEAP_LOCK_WORD, tid);
        if let Some((lo, hi)) = token {
            poke(&dir.0, &heap, HEAP_LOCK_OWNER, lo);
            poke(&dir.0, &heap, HEAP_LOCK_OWNER + 4, hi);
        }
        let start = Instant::now();
        let (code, so, se) =
            run_bounded(cli(&dir.0, &domain, &["heap", "h", "--check"]), &format!("{case}: heap --check"));
        if token.is_none() {
            // Only the word names a holder, a thread that does not exist, and every process of
            // the domain is in one pid namespace (the CLI alone): `heap --check` takes the lock
            // over as a dead holder's and recovers the heap; nothing is left for `gc`.
            assert_eq!(code, 0, "{case}: heap --check takes over a lock whose thread is gone: {so}{se}");
            assert!(so.contains("recoveries  1"), "{case}: the heap was recovered: {so}");
            assert!(start.elapsed() < Duration::from_secs(10));
            let (code, so, se) = run_bounded(cli(&dir.0, &domain, &["gc", "--force"]), &format!("{case}: gc --force"));
            assert_eq!(code, 0, "{case}: gc --force: {so}{se}");
            assert!(!so.contains("broke a lock"), "{case}: no lock is left to break: {so}");
            assert_eq!(objects(&dir.0, &domain), before, "{case}: the persistent sections stay");
            domain_works(&dir.0, &domain, case);
            clean(&dir.0, &domain);
            continue;
        }
        assert_ne!(code, 0, "{case}: heap --check on a stuck lock exits non-zero: {so}{se}");
        assert!(
            se.contains(&format!("the lock of heap \"h\" is held by {holder}")),
            "{case}: heap --check names the lock and its holder: {se}"
        );
        assert!(start.elapsed() < Duration::from_secs(10));
        let (code, so, se) = run_bounded(cli(&dir.0, &domain, &["gc"]), &format!("{case}: gc"));
        assert_ne!(code, 0, "{case}: plain gc reports the stuck heap lock: {so}{se}");
        assert!(
            se.contains(&format!("the lock of heap \"h\" is held by {holder}")) && se.contains("--force"),
            "{case}: {se}"
        );
        assert_eq!(objects(&dir.0, &domain), before, "{case}: plain gc removes nothing");
        let start = Instant::now();
        let (code, so, se) = run_bounded(cli(&dir.0, &domain, &["gc", "--force"]), &format!("{case}: gc --force"));
        assert_eq!(code, 0, "{case}: gc --force: {so}{se}");
        assert!(so.contains("broke a lock") && so.contains("heap"), "{case}: {so}");
        assert!(start.elapsed() < Duration::from_secs(10));
        assert_eq!(objects(&dir.0, &domain), before, "{case}: gc --force keeps the persistent sections");
        domain_works(&dir.0, &domain, case);
        clean(&dir.0, &domain);
    }
}

/// A heap lock word naming a live thread (this test's) with no registration recorded: not
/// proven gone, so `heap --check` waits its bound and reports a live holder (`Timeout`), and
/// neither `gc` nor `gc --force` breaks the lock; once the "holder" lets go, all works.
#[test]
fn a_heap_lock_held_by_a_live_thread_times_out_and_gc_force_leaves_it_alone() {
    if skip_in_role() {
        return;
    }
    let dir = ShmDir::new("locks-live");
    let domain = "lk-live";
    let heap = setup(&dir.0, domain);
    let me = std::process::id();
    poke(&dir.0, &heap, HEAP_LOCK_WORD, me);
    let start = Instant::now();
    let (code, so, se) = run_bounded(cli(&dir.0, domain, &["heap", "h", "--check"]), "heap --check");
    assert_ne!(code, 0, "{so}{se}");
    assert!(
        se.contains(&format!("the lock of heap \"h\" is held by thread {me} of pid {me}"))
            && se.contains("(alive) for more than"),
        "heap --check reports a live holder: {se}"
    );
    assert!(start.elapsed() >= Duration::from_secs(4), "it waited its bound: {:?}", start.elapsed());
    let (_, so, se) = run_bounded(cli(&dir.0, domain, &["gc", "--force"]), "gc --force");
    assert!(!so.contains("broke a lock"), "gc --force breaks no live holder's lock: {so}{se}");
    let (code, _, _) = run_bounded(cli(&dir.0, domain, &["heap", "h", "--check"]), "heap --check again");
    assert_ne!(code, 0, "the lock is still held");
    poke(&dir.0, &heap, HEAP_LOCK_WORD, 0);
    domain_works(&dir.0, domain, "released");
    clean(&dir.0, domain);
}
