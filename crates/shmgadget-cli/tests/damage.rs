//! A registry damaged at random, then every command run on it in separate processes: each one
//! exits with an error or a correct result (no signal, no panic, no wait over 10 s), and plain
//! `gc` never deletes a persistent section's object.
//!
//! `SHMGADGET_DAMAGE_SEEDS=N` runs N random seeds instead of the default (sized for CI);
//! `SHMGADGET_DAMAGE_FROM=S` starts at seed S (to replay a failure).

mod common;

use common::{ShmDir, cli, objects, run_bounded};

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const DEFAULT_SEEDS: u64 = 30;
/// Bytes of the registry lock word (a glibc robust mutex at offset 192): damaged like any
/// other bytes, since every wait for that lock is bounded.
const LOCK: std::ops::Range<u64> = 192..232;

/// xorshift64*: reproducible damage from a seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn read_u64(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
}

fn read_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
}

/// Offsets of the first section entry, process entry and chunk-table entry: segment 0's
/// (header offset 56), plus the in-segment offsets of the process entries and chunk table
/// (header offsets 64 and 68).
fn table_offsets(bytes: &[u8]) -> (usize, usize, usize) {
    let seg0 = read_u64(bytes, 56) as usize;
    (seg0, seg0 + read_u32(bytes, 64) as usize, seg0 + read_u32(bytes, 68) as usize)
}

/// A domain with a persistent raw section `keep` and a persistent heap `h`; returns their
/// objects and the registry path.
fn setup(dir: &Path, domain: &str) -> (Vec<String>, PathBuf) {
    let (code, _, se) = run_bounded(cli(dir, domain, &["create", "keep", "--size", "4K"]), "setup create");
    assert_eq!(code, 0, "{se}");
    let (code, _, se) = run_bounded(cli(dir, domain, &["create", "h", "--size", "1M", "--kind", "heap"]), "setup heap");
    assert_eq!(code, 0, "{se}");
    let persistent: Vec<String> = objects(dir, domain).into_iter().filter(|o| !o.ends_with(":registry")).collect();
    assert_eq!(persistent.len(), 2, "{persistent:?}");
    (persistent, dir.join(format!("shmgadget.{domain}:registry")))
}

/// Every command and the library calls, on whatever the registry now holds.
fn exercise(dir: &Path, domain: &str, persistent: &[String], what: &str) {
    let still_there = |after: &str| {
        let now = objects(dir, domain);
        for o in persistent {
            assert!(now.contains(o), "{what}: persistent object {o} deleted ({after}); left: {now:?}");
        }
    };
    for args in [&["domains"][..], &["ls"], &["ls", "--json"], &["info", "keep"], &["domains", "--json"]] {
        run_bounded(cli(dir, domain, args), &format!("{what}: {args:?}"));
    }
    let (code, so, se) = run_bounded(cli(dir, domain, &["gc"]), &format!("{what}: gc"));
    still_there("by the first plain gc");
    if se.contains("damage") {
        assert_ne!(code, 0, "{what}: gc reported damage but exited 0: {so}{se}");
    }
    let (code, _, _) = run_bounded(cli(dir, domain, &["create", "n", "--size", "4K"]), &format!("{what}: create"));
    if code == 0 {
        run_bounded(cli(dir, domain, &["rm", "n"]), &format!("{what}: rm"));
    }
    run_bounded(cli(dir, domain, &["heap", "h", "--check"]), &format!("{what}: heap --check"));
    let mut lib = Command::new(std::env::current_exe().unwrap());
    lib.args(["--exact", "library_calls_role", "--nocapture", "--test-threads=1"])
        .env("SHMGADGET_DAMAGE_ROLE", domain)
        .env("SHMGADGET_SHM_DIR", dir);
    let (_, so, _) = run_bounded(lib, &format!("{what}: library calls"));
    assert!(so.contains("library calls done"), "{what}: the library role did not finish: {so}");
    run_bounded(cli(dir, domain, &["gc"]), &format!("{what}: gc again"));
    still_there("by create/rm/heap/library calls or the second plain gc");
}

/// Removes whatever is left of the domain (gc --force, then by hand).
fn clean(dir: &Path, domain: &str) {
    run_bounded(cli(dir, domain, &["gc", "--force"]), "cleanup gc --force");
    for o in objects(dir, domain) {
        let _ = std::fs::remove_file(dir.join(o));
    }
}

/// Not a test of its own: the child process of `exercise` that makes the library calls.
#[test]
fn library_calls_role() {
    let Ok(domain) = std::env::var("SHMGADGET_DAMAGE_ROLE") else { return };
    use shmgadget::{Domain, DomainOptions, SectionOptions};
    let _ = shmgadget::inspect::list_domains(None);
    let _ = shmgadget::inspect::inspect_domain(&domain, None);
    let opts = DomainOptions { must_exist: true, ..Default::default() };
    if let Ok(d) = Domain::attach_with(&domain, &opts) {
        let _ = d.sections();
        if let Ok(s) = d.open_section("keep") {
            // SAFETY: a live section's mapping covers its length; byte reads are fine.
            let _ = unsafe { std::ptr::read_volatile(s.as_ptr()) };
            let _ = s.info();
        }
        if let Ok(s) = d.create_section("lib", 4096, &SectionOptions::new()) {
            drop(s);
            let _ = d.delete_section("lib");
        }
        if let Ok(h) = shmgadget::heap::Heap::open(&d, "h") {
            let _ = h.check();
            let _ = h.stats();
        }
        let _ = d.detach();
    }
    println!("library calls done");
}

#[test]
fn random_registry_damage_never_crashes_a_command_and_plain_gc_keeps_persistent_data() {
    if std::env::var_os("SHMGADGET_DAMAGE_ROLE").is_some() {
        return;
    }
    let seeds = std::env::var("SHMGADGET_DAMAGE_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(DEFAULT_SEEDS);
    let from: u64 = std::env::var("SHMGADGET_DAMAGE_FROM").ok().and_then(|s| s.parse().ok()).unwrap_or(0);
    let dir = ShmDir::new("damage");
    let mut damaged_reports = 0;
    for seed in from..from + seeds {
        let domain = format!("dmg{seed}");
        let (persistent, reg) = setup(&dir.0, &domain);
        let mut bytes = std::fs::read(&reg).unwrap();
        let (sections, procs, chunks) = table_offsets(&bytes);
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let mut hits = Vec::new();
        for _ in 0..1 + rng.below(3) {
            // Where the state is: header, the registry lock (1 in 8), the used section entries,
            // the used process entries, the chunk table's first chunks.
            let at = loop {
                let at = match rng.below(8) {
                    0..=3 => match rng.below(256 + 160 * 3) {
                        at if at < 256 => at,
                        at => sections as u64 + at - 256,
                    },
                    4 => LOCK.start - 3 + rng.below(LOCK.end - LOCK.start + 3),
                    5 | 6 => procs as u64 + rng.below(64 * 3),
                    _ => chunks as u64 + rng.below(4 * 8),
                };
                if (at as usize + 4) <= bytes.len() {
                    break at as usize;
                }
            };
            let v = (rng.next() as u32).to_le_bytes();
            bytes[at..at + 4].copy_from_slice(&v);
            hits.push(format!("{at}={v:02x?}"));
        }
        std::fs::write(&reg, &bytes).unwrap();
        let what = format!("seed {seed} ({})", hits.join(", "));
        exercise(&dir.0, &domain, &persistent, &what);
        let (_, _, se) = run_bounded(cli(&dir.0, &domain, &["gc"]), "count");
        damaged_reports += se.contains("damage") as u32;
        clean(&dir.0, &domain);
    }
    eprintln!("{seeds} seeds, {damaged_reports} left reported as damaged");
}

/// The two cases: one byte of a name set to `!`, and `slots_high` set to 0.
#[test]
fn a_damaged_name_or_high_water_mark_is_listed_as_damage_and_plain_gc_keeps_everything() {
    if std::env::var_os("SHMGADGET_DAMAGE_ROLE").is_some() {
        return;
    }
    let dir = ShmDir::new("damage-named");
    for (case, at, value) in [("name", 80, b"!".to_vec()), ("slots_high", 112, 0u32.to_le_bytes().to_vec())] {
        let domain = format!("dmg-{case}");
        let (persistent, reg) = setup(&dir.0, &domain);
        let mut bytes = std::fs::read(&reg).unwrap();
        // The name is a field of section entry 0, at the start of segment 0.
        let at = if case == "name" { table_offsets(&bytes).0 + at } else { at };
        bytes[at..at + value.len()].copy_from_slice(&value);
        std::fs::write(&reg, &bytes).unwrap();
        let (code, so, se) = run_bounded(cli(&dir.0, &domain, &["ls"]), "ls");
        if case == "name" {
            assert_ne!(code, 0, "ls on a damaged entry exits non-zero");
            assert!(so.contains("DAMAGED") && so.contains("!eep"), "ls lists the damaged entry: {so}");
            assert!(se.contains("is not 1-63 characters"), "and says what failed: {se}");
        }
        assert!(so.contains("keep") || so.contains("!eep"), "{case}: ls hides nothing: {so}");
        assert!(so.contains(" h "), "{case}: ls hides nothing: {so}");
        let (code, so, se) = run_bounded(cli(&dir.0, &domain, &["gc"]), "gc");
        assert_ne!(code, 0, "{case}: gc exits non-zero on damage: {so}{se}");
        assert!(se.contains("damage"), "{case}: {se}");
        assert!(!so.contains("removed"), "{case}: plain gc removed something: {so}");
        let now = objects(&dir.0, &domain);
        for o in &persistent {
            assert!(now.contains(o), "{case}: plain gc deleted {o}");
        }
        let (code, so, se) = run_bounded(cli(&dir.0, &domain, &["gc", "--force"]), "gc --force");
        assert!(!so.contains("removed orphaned"), "{case}: --force removed a damaged entry's object: {so}{se}");
        let _ = code;
        exercise(&dir.0, &domain, &persistent, case);
        clean(&dir.0, &domain);
    }
}

/// A lock word that names a holder which never releases it: plain gc reports the domain
/// within its bounded wait (a few seconds, not for ever) and exits non-zero, removing nothing.
#[test]
fn a_damaged_registry_lock_word_makes_gc_report_instead_of_hanging() {
    if std::env::var_os("SHMGADGET_DAMAGE_ROLE").is_some() {
        return;
    }
    let dir = ShmDir::new("damage-lock");
    let domain = "dmg-lock";
    let (persistent, reg) = setup(&dir.0, domain);
    let mut bytes = std::fs::read(&reg).unwrap();
    bytes[LOCK.start as usize..LOCK.start as usize + 4].copy_from_slice(&0x1234_5678u32.to_le_bytes());
    std::fs::write(&reg, &bytes).unwrap();
    let start = Instant::now();
    let (code, so, se) = run_bounded(cli(&dir.0, domain, &["gc"]), "gc on a damaged lock");
    assert_ne!(code, 0, "{so}{se}");
    assert!(se.contains("lock"), "gc names the lock: {se}");
    assert!(start.elapsed() < Duration::from_secs(10));
    let now = objects(&dir.0, domain);
    assert!(persistent.iter().all(|o| now.contains(o)), "{now:?}");
    for o in objects(&dir.0, domain) {
        let _ = std::fs::remove_file(dir.0.join(o));
    }
}
