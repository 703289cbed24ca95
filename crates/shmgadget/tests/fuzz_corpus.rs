//! Replays every fuzz target's seeds and committed corpus (`fuzz/corpus/<target>/`) through
//! the same entry points the fuzzer calls, so CI checks without a fuzzer that no input that
//! was ever interesting (or once crashed) panics again. Run the fuzzers themselves with
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run <target>` from the repository root (see fuzz/README.md).
#![cfg(unix)]

use std::path::Path;

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus").join(target);
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            let bytes = std::fs::read(e.path()).unwrap();
            out.push((e.file_name().to_string_lossy().into_owned(), bytes));
        }
    }
    out.sort();
    out
}

fn replay(target: &str, seeds: Vec<Vec<u8>>, run: fn(&[u8])) {
    let files = corpus(target);
    for (i, seed) in seeds.iter().enumerate() {
        run(seed);
        // Every prefix too: a truncated structure is a case of its own.
        for cut in [0, 1, 31, 33, seed.len() / 2] {
            run(&seed[..cut.min(seed.len())]);
        }
        // And single-byte damage at spread positions.
        for pos in (0..seed.len()).step_by(97) {
            let mut bad = seed.clone();
            bad[pos] ^= 0x5a ^ (i as u8);
            run(&bad);
        }
    }
    for (name, bytes) in &files {
        let r = std::panic::catch_unwind(|| run(bytes));
        assert!(r.is_ok(), "fuzz/corpus/{target}/{name} panics");
    }
}

#[test]
fn tlsf_inputs_from_the_corpus_never_panic() {
    replay("tlsf", shmgadget::fuzzing::tlsf_seeds(), shmgadget::fuzzing::tlsf);
}

#[test]
fn registry_inputs_from_the_corpus_never_panic() {
    let seeds = shmgadget::fuzzing::registry_seeds();
    // The seeds are real registries: each must parse, or the target fuzzes nothing.
    assert_eq!(seeds.len(), 4);
    // The last seed has grown: two segments backed (`segments_backed`, header offset 76).
    assert_eq!(u32::from_le_bytes(seeds[3][76..80].try_into().unwrap()), 2, "the last seed grew");
    assert!(seeds.iter().all(|s| shmgadget::fuzzing::registry_is_sound(s)), "a real registry scans as damaged");
    replay("registry", seeds, shmgadget::fuzzing::registry);
}

#[test]
fn heap_inputs_from_the_corpus_never_panic() {
    replay("heap", shmgadget::fuzzing::heap_seeds(), shmgadget::fuzzing::heap);
}

/// Not a check: `SHMGADGET_WRITE_SEEDS=DIR cargo test -p shmgadget --test fuzz_corpus --
/// --ignored write_seeds` writes every target's generated seeds into `DIR/<target>/`, to start
/// a fuzzer's corpus from real structures.
#[test]
#[ignore = "writes seed files; run with SHMGADGET_WRITE_SEEDS=DIR"]
fn write_seeds() {
    let dir = std::env::var_os("SHMGADGET_WRITE_SEEDS").expect("SHMGADGET_WRITE_SEEDS=DIR names where to write");
    for (target, seeds) in [
        ("tlsf", shmgadget::fuzzing::tlsf_seeds()),
        ("registry", shmgadget::fuzzing::registry_seeds()),
        ("heap", shmgadget::fuzzing::heap_seeds()),
        ("queue_bytes", shmgadget::fuzzing::queue_bytes_seeds()),
        ("queue_slots", shmgadget::fuzzing::queue_slots_seeds()),
    ] {
        let d = Path::new(&dir).join(target);
        std::fs::create_dir_all(&d).unwrap();
        for (i, s) in seeds.iter().enumerate() {
            std::fs::write(d.join(format!("seed-{i}")), s).unwrap();
        }
    }
}

#[test]
fn queue_bytes_inputs_from_the_corpus_never_panic() {
    replay("queue_bytes", shmgadget::fuzzing::queue_bytes_seeds(), shmgadget::fuzzing::queue_bytes);
}

#[test]
fn queue_slots_inputs_from_the_corpus_never_panic() {
    replay("queue_slots", shmgadget::fuzzing::queue_slots_seeds(), shmgadget::fuzzing::queue_slots);
}
