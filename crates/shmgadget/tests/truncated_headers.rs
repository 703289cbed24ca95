//! Validate, then trust: a shared header cut short is a clean `Corrupt` error in the process
//! that opens it, never a SIGBUS or a read past the end.
//!
//! For each kind of shared object (the registry, a heap, a byte queue, a slot queue) the parent
//! builds a healthy one, truncates its backing object in the shm directory to less than its
//! header, and a fresh process (this test binary again, with a role) opens it and reports what
//! it got. A child killed by a signal fails the test (`run` asserts a successful exit), as does
//! any error kind other than `Corrupt`. The same is checked for sections too small for their
//! kind's header from the start (a one-page section of kind heap or queue).
#![cfg(unix)]

mod common;

use common::*;
use shmgadget::heap::Heap;
use shmgadget::queue::{ByteQueue, SlotQueue};
use shmgadget::{Domain, ErrorKind, SectionKind, SectionOptions, inspect};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
/// Bytes left of a truncated object: less than any of the headers (the registry's is 256).
/// 100 keeps the prefix (magic .. ready) intact, so only a size check can tell; 0 leaves no
/// byte at all, so any read of the header would be a SIGBUS.
const CUT: u64 = 100;
const CUTS: [u64; 2] = [0, CUT];

/// In a child: attaches the parent's domain, opens object `what` as its kind, and reports
/// `KIND=<error kind or Ok>` and `MSG=<message>`.
fn opener() {
    let domain = child_domain();
    let what = std::env::var("WHAT").unwrap();
    let attached = Domain::attach_with(&domain, &small(GIB));
    let r: shmgadget::Result<()> = match (what.as_str(), attached) {
        ("registry", a) => a.map(drop),
        (_, Err(e)) => Err(e),
        ("heap", Ok(d)) => Heap::open(&d, "obj").map(drop),
        ("bytes", Ok(d)) => ByteQueue::open(&d, "obj").map(drop),
        ("slots", Ok(d)) => SlotQueue::<u64>::open(&d, "obj").map(drop),
        (other, _) => panic!("unknown object kind {other}"),
    };
    match r {
        Ok(()) => println!("KIND=Ok"),
        Err(e) => {
            println!("KIND={:?}", e.kind());
            println!("MSG={}", e.to_string().replace('\n', " "));
        }
    }
}

/// Runs the opener for `what` in a fresh process; returns (kind, message).
fn open_in_child(test: &str, domain: &str, what: &str) -> (String, String) {
    let r = run(test, "opener", domain, &[("WHAT", what.to_owned())]);
    (r["KIND"].clone(), r.get("MSG").cloned().unwrap_or_default())
}

/// The object file of section `name` of `d`.
fn section_path(d: &Domain, name: &str) -> String {
    object_path(&d.section_info(name).unwrap().object)
}

fn truncate(path: &str, len: u64) {
    std::fs::OpenOptions::new().write(true).open(path).unwrap().set_len(len).unwrap();
}

/// Builds object `obj` of kind `what` in a new domain, truncates its backing object to `cut`
/// bytes, and has a fresh process open it; returns what it got after cleaning up.
fn truncated_section(test: &str, what: &str, cut: u64) -> (String, String) {
    let domain = unique_domain(what);
    let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
    match what {
        "heap" => drop(Heap::create(&d, "obj", 4 * MIB).unwrap()),
        "bytes" => drop(ByteQueue::create(&d, "obj", 64 << 10).unwrap()),
        "slots" => drop(SlotQueue::<u64>::create(&d, "obj", 1024).unwrap()),
        other => panic!("unknown object kind {other}"),
    }
    let path = section_path(&d, "obj");
    truncate(&path, cut);
    let got = open_in_child(test, &domain, what);
    d.delete_section("obj").unwrap();
    d.detach().unwrap();
    assert_clean(&domain);
    got
}

/// The child got `Corrupt`, with a message that says what it found: `found` in it.
fn assert_corrupt(what: &str, (kind, msg): &(String, String), found: &str) {
    assert_eq!(kind, "Corrupt", "{what}: {msg}");
    assert!(msg.contains(found), "{what}: the error should say what was found ({found:?}): {msg}");
}

#[test]
fn a_registry_truncated_below_its_header_is_corrupt_in_a_fresh_process() {
    if role().is_some() {
        return opener();
    }
    let test = "a_registry_truncated_below_its_header_is_corrupt_in_a_fresh_process";
    let domain = unique_domain("registry");
    let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
    // A persistent section keeps the registry after the last detach.
    drop(d.create_section("s", 4096, &SectionOptions::new()).unwrap());
    d.detach().unwrap();
    truncate(&object_path(&format!("shmgadget.{domain}:registry")), CUT);
    let got = open_in_child(test, &domain, "registry");
    assert_corrupt("registry", &got, &format!("its {CUT} bytes are too few for a registry header"));
    // Inspection (which reads without mapping) reports it too, without failing.
    let err = inspect::inspect_domain(&domain, None).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    inspect::gc(Some(&domain), None, true).unwrap();
    assert_clean(&domain);
}

#[test]
fn a_heap_truncated_below_its_header_is_corrupt_in_a_fresh_process() {
    if role().is_some() {
        return opener();
    }
    for cut in CUTS {
        let got = truncated_section("a_heap_truncated_below_its_header_is_corrupt_in_a_fresh_process", "heap", cut);
        // Refused when mapping, before the header check: its object is shorter than the section.
        assert_corrupt("heap", &got, &format!("is {cut} bytes"));
    }
}

#[test]
fn a_byte_queue_truncated_below_its_header_is_corrupt_in_a_fresh_process() {
    if role().is_some() {
        return opener();
    }
    for cut in CUTS {
        let got =
            truncated_section("a_byte_queue_truncated_below_its_header_is_corrupt_in_a_fresh_process", "bytes", cut);
        // Refused when mapping, before the header check: its object is shorter than the section.
        assert_corrupt("byte queue", &got, &format!("is {cut} bytes"));
    }
}

#[test]
fn a_slot_queue_truncated_below_its_header_is_corrupt_in_a_fresh_process() {
    if role().is_some() {
        return opener();
    }
    for cut in CUTS {
        let got =
            truncated_section("a_slot_queue_truncated_below_its_header_is_corrupt_in_a_fresh_process", "slots", cut);
        // Refused when mapping, before the header check: its object is shorter than the section.
        assert_corrupt("slot queue", &got, &format!("is {cut} bytes"));
    }
}

/// A section of the right kind but one page long passes every check made before the header's
/// own (its object has the size the registry records): the header check must refuse it on its
/// size, before reading a header that would run past the section.
#[test]
fn a_one_page_section_of_kind_heap_or_queue_is_corrupt_when_opened_as_one() {
    if role().is_some() {
        return opener();
    }
    let test = "a_one_page_section_of_kind_heap_or_queue_is_corrupt_when_opened_as_one";
    for (what, kind) in [("heap", SectionKind::Heap), ("bytes", SectionKind::Queue), ("slots", SectionKind::Queue)] {
        let domain = unique_domain("onepage");
        let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
        drop(d.create_section("obj", 4096, &SectionOptions::new().kind(kind)).unwrap());
        let got = open_in_child(test, &domain, what);
        assert_corrupt(what, &got, "4096 bytes");
        assert!(got.1.contains("too small for a") || got.1.contains("too few for a"), "{what}: {}", got.1);
        d.delete_section("obj").unwrap();
        d.detach().unwrap();
        assert_clean(&domain);
    }
}
