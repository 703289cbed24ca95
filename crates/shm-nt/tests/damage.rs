//! The C interface on a heap damaged at random by another process (this test): `shm_heap`,
//! `shm_heap_check`, `shm_list_heap`, `shm_alloc` and `shm_free` in a C program return errors
//! or correct results: no signal, no internal error, no wait over 10 s.
//! `SHMGADGET_DAMAGE_SEEDS` sets the number of seeds (default 60).

mod common;

use std::alloc::Layout;
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::time::Duration;

use shmgadget::heap::{AREA_OFFSET, Heap};
use shmgadget::{Domain, DomainOptions};

const RESERVED: u64 = 4 << 20;
/// Where the heap's lock word lies in its header; bounded waits on a damaged lock are tested
/// with the lock repair, not here.
const LOCK_AT: usize = 128;

fn rng(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// 1 to 6 random values in the header (not the lock word) or the first 64 KiB of blocks.
fn damage(base: *mut u8, seed: u64) -> String {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let lock = LOCK_AT..LOCK_AT + size_of::<shmgadget::sync::RawMutex>();
    let mut what = Vec::new();
    for _ in 0..1 + rng(&mut s) % 6 {
        let width = 1usize << (rng(&mut s) % 4);
        let at = loop {
            let at = if rng(&mut s) % 2 == 0 {
                (rng(&mut s) % (12 << 10)) as usize
            } else {
                AREA_OFFSET as usize + (rng(&mut s) % (64 << 10)) as usize
            } / width
                * width;
            if at + width <= lock.start || at >= lock.end {
                break at;
            }
        };
        let value = match rng(&mut s) % 5 {
            0 => rng(&mut s),
            1 => rng(&mut s) % 64,
            2 => 1 << 40,
            3 => (rng(&mut s) % (1 << 16)) & !15,
            _ => u64::MAX,
        };
        // SAFETY: inside the mapped heap section (at most AREA_OFFSET + 64 KiB of 4 MiB),
        // aligned volatile stores: the damage another process could do.
        unsafe {
            let p = base.add(at);
            match width {
                1 => p.write_volatile(value as u8),
                2 => p.cast::<u16>().write_volatile(value as u16),
                4 => p.cast::<u32>().write_volatile(value as u32),
                _ => p.cast::<u64>().write_volatile(value),
            }
        }
        what.push(format!("{at:#x}/{width}={value:#x}"));
    }
    what.join(",")
}

#[test]
fn the_c_interface_on_a_damaged_heap_returns_errors_never_crashes() {
    let seeds: u64 = std::env::var("SHMGADGET_DAMAGE_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let exe = std::env::temp_dir().join(format!("shm_nt_damaged_heap_{}", std::process::id()));
    common::compile_c("damaged_heap.c", &exe);
    let domain = format!("cnt-dmg-{}", std::process::id());
    let d = Domain::attach_with(&domain, &DomainOptions { window_size: 1 << 30, ..Default::default() }).unwrap();
    let mut errors = 0;
    for seed in 1..=seeds {
        let heap = Heap::create(&d, "victim", RESERVED).unwrap();
        for k in 0..3u64 {
            heap.find_or_init::<u64>(&format!("n{k}"), || k).unwrap();
        }
        let blocks: Vec<_> =
            (0..80).map(|i| heap.alloc(Layout::from_size_align(16 + (i * 37) % 3000, 16).unwrap()).unwrap()).collect();
        for p in blocks.into_iter().step_by(2) {
            // SAFETY: ours, unused afterwards.
            unsafe { heap.free(p).unwrap() };
        }
        let what = damage(heap.section().as_ptr(), seed);
        let mut child = common::launch(&exe)
            .args(["victim", &RESERVED.to_string()])
            .env("SHMGADGET_DOMAIN", &domain)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let status =
            common::wait_bounded(&mut child, Duration::from_secs(10), &format!("seed {seed} ({what}): the C program"));
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            status.signal().is_none() && status.success() && text.contains("done"),
            "seed {seed} ({what}): the C program ended with {status}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!text.contains("INTERNAL"), "seed {seed} ({what}): {text}");
        if std::env::var_os("SHMGADGET_DAMAGE_VERBOSE").is_some() {
            eprintln!("seed {seed} ({what}): {text}");
        }
        errors += text.lines().filter(|l| l.contains(": ")).count();
        drop(heap);
        d.delete_section("victim").unwrap();
    }
    eprintln!("{seeds} seeds: the C program reported {errors} errors");
    assert!(errors > 0, "the damage was never noticed");
    let _ = std::fs::remove_file(&exe);
    d.detach().unwrap();
    common::assert_no_leftovers(&domain);
}
