//! Eager mode through the C interface: a C program attached with `SHMGADGET_EAGER=1` frees and
//! reallocates blocks of a heap that another process created after it attached.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;
use std::time::Duration;

use shmgadget::Domain;
use shmgadget::heap::Heap;

#[test]
fn an_eager_c_program_frees_and_reallocs_blocks_of_a_heap_created_after_it_attached() {
    const LEN: usize = 1000;
    let exe = std::env::temp_dir().join(format!("shm_nt_eager_{}", std::process::id()));
    common::compile_c("eager.c", &exe);
    let domain = format!("cnt-eager-{}", std::process::id());
    let d = Domain::attach(&domain).unwrap();

    let mut child = common::launch(&exe)
        .env("SHMGADGET_DOMAIN", &domain)
        .env("SHMGADGET_EAGER", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().and_then(Result::ok);
    assert_eq!(first.as_deref(), Some("READY"), "the C program did not start");

    // Created only now, after the C program attached (eagerly: nothing maps it on touch).
    let heap = Heap::create(&d, "late", 16 << 20).unwrap();
    let layout = |n| std::alloc::Layout::from_size_align(n, 16).unwrap();
    let a = heap.alloc(layout(64)).unwrap();
    let b = heap.alloc(layout(LEN)).unwrap();
    // SAFETY: a fresh block of LEN bytes, ours until the C program takes it over.
    unsafe { (0..LEN).for_each(|i| b.as_ptr().add(i).write((i % 251) as u8)) };
    writeln!(child.stdin.as_mut().unwrap(), "{:#x} {:#x} {LEN}", a.as_ptr() as usize, b.as_ptr() as usize).unwrap();

    let status = common::wait_bounded(&mut child, Duration::from_secs(60), "the C program");
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let stderr = std::io::read_to_string(child.stderr.take().unwrap()).unwrap_or_default();
    let checked = heap.check();
    let used = heap.stats().map(|s| s.blocks.used_blocks);
    drop(heap);
    d.detach().unwrap();
    // Clean up before judging, so a failure leaves nothing behind either.
    common::clean(&domain);
    let _ = std::fs::remove_file(&exe);
    assert!(status.success(), "the C program failed: {status}\nstdout: {rest:?}\nstderr: {stderr}");
    assert!(rest.iter().any(|l| l == "eager ok"), "{rest:?}\n{stderr}");
    checked.unwrap();
    assert_eq!(used.unwrap(), 0, "the C program freed every block");
}
