//! A prefork server written in C (`tests/c/prefork.c`): forked workers are participants of their
//! own, a killed worker is seen dead by its partner only, and the parent's `shm_exit` while they
//! run disturbs nothing.

mod common;

use std::time::Duration;

#[test]
fn a_c_prefork_server_with_four_workers_survives_a_killed_worker_and_its_own_exit() {
    let exe = std::env::temp_dir().join(format!("shm_nt_prefork_{}", std::process::id()));
    common::compile_c("prefork.c", &exe);
    let domain = format!("cnt-prefork-{}", std::process::id());
    let mut child =
        common::launch(&exe).env("SHMGADGET_DOMAIN", &domain).stdout(std::process::Stdio::piped()).spawn().unwrap();
    let status = common::wait_bounded(&mut child, Duration::from_secs(240), "the prefork server");
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(status.success(), "the prefork server failed: {status}; {text}");
    assert_eq!(text.trim(), "CODES 0 0 0 -9", "workers' exit codes");

    // Everyone is gone; the heap is consistent and holds nothing.
    let opts = shmgadget::DomainOptions { must_exist: true, ..Default::default() };
    let d = shmgadget::Domain::attach_with(&domain, &opts).unwrap();
    let alive: Vec<_> = d.processes().into_iter().filter(|p| p.alive).collect();
    assert_eq!(alive.len(), 1, "only this test is attached: {alive:?}");
    let heap = shmgadget::heap::Heap::open(&d, "heap").unwrap();
    heap.check().unwrap();
    let s = heap.stats().unwrap();
    assert!(s.blocks.used_blocks <= s.recoveries, "every block was freed: {s:?}");
    drop(heap);
    for s in d.sections() {
        d.delete_section(&s.name).unwrap();
    }
    d.detach().unwrap();
    common::assert_no_leftovers(&domain);
    let _ = std::fs::remove_file(exe);
}
