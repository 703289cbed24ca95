//! `shm_q_read` and `shm_q_write` on a byte queue whose positions another process damaged:
//! an error code or a correct result, never a signal (the issue: unaligned positions made
//! `shm_q_read` read past the section's end) and never a wait over 10 s. Each damage is tried
//! by a fresh process that calls the C interface (this test binary, re-executed in a role).

mod common;

use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::time::{Duration, Instant};

use shmgadget::Domain;
use shmgadget::queue::ByteQueue;

const ROLE: &str = "SHM_NT_QDMG_ROLE";
const TEST: &str = "shm_q_read_and_write_on_damaged_positions_return_codes_not_signals";
/// Header offsets (queue layout 4): send position, receive position, the consumed position
/// in each of the receiver's two snapshots, the send position in each of the sender's two.
const SEND_POS: usize = 128;
const RECV_POS: usize = 256;
const CONSUMED_POS: [usize; 2] = [2688, 2720];
const SENT_SNAPSHOTS: [usize; 2] = [144, 176];
/// A damage that sets a position to 4 bytes before the end of the ring (see below).
const END: i64 = i64::MAX;

fn reader() {
    let name = std::ffi::CString::new("cq").unwrap();
    let mut q: usize = 0;
    let rc = shm_nt::shm_queue(name.as_ptr(), 4096, &mut q);
    println!("queue={rc}");
    if rc < 0 {
        return;
    }
    let mut buf = [0u8; 4096];
    for timeout in [0, 20, 0] {
        // SAFETY: `buf` is 4096 writable bytes.
        let n = unsafe { shm_nt::shm_q_read(q, buf.as_mut_ptr().cast(), buf.len() as _, timeout) };
        println!("read={n}");
        if n >= 0 {
            // Whatever was read is a message the parent sent: 8..64 bytes of its number.
            let m = &buf[..n as usize];
            assert!(!m.is_empty() && m.iter().all(|&b| b == m[0]), "shm_q_read returned bytes nobody sent: {m:?}");
        }
    }
    let msg = [9u8; 40];
    for timeout in [0, 20] {
        // SAFETY: `msg` is 40 readable bytes.
        let rc = unsafe { shm_nt::shm_q_write(q, msg.as_ptr().cast(), msg.len() as _, timeout) };
        println!("write={rc}");
    }
    shm_nt::shm_exit();
}

#[test]
fn shm_q_read_and_write_on_damaged_positions_return_codes_not_signals() {
    if std::env::var_os(ROLE).is_some() {
        reader();
        return;
    }
    let domain = format!("cnt-qdmg-{}", std::process::id());
    let d = Domain::attach(&domain).unwrap();
    let q = ByteQueue::create(&d, "cq", 4096).unwrap();
    let base = q.section().unwrap().as_ptr();
    let word = |off: usize| base.wrapping_add(off).cast::<u64>();
    let read = |off: usize| {
        // SAFETY: an 8-aligned word inside the mapped header; a racy read of shared memory, as
        // a debugger's.
        unsafe { word(off).read_volatile() }
    };
    let write = |offs: &[usize], v: u64| {
        for &o in offs {
            // SAFETY: an 8-aligned word inside the mapped header; a racy write into shared
            // memory is the point of the test.
            unsafe { word(o).write_volatile(v) }
        }
    };
    let mut codes = std::collections::BTreeMap::<String, u32>::new();
    // Damages: unaligned, far ahead, behind, near u64::MAX, for each position in turn.
    // A damaged consumed position is damaged in both snapshots (the receiver takes the newer).
    let damages: Vec<(&[usize], i64)> = [&[SEND_POS][..], &[RECV_POS], &CONSUMED_POS]
        .into_iter()
        .flat_map(|at| {
            [4, -4, 4092, -4092, 8 * 1000, -8 * 1000, 1 << 40, i64::MIN, 12, -12, END].map(|delta| (at, delta))
        })
        .collect();
    for (i, (at, delta)) in damages.iter().enumerate() {
        {
            // A fresh state: a few messages queued (some received and given back).
            let mut tx = q.sender().unwrap();
            for n in 0..(6 + i % 5) {
                tx.send(&vec![(n + 1) as u8; 8 + (n * 8) % 64]).unwrap();
            }
        }
        let v = if *delta == END {
            // The receiver 8 bytes before the end of the ring, the sender 4 bytes after it
            // (in its snapshots too): a sender there that trusted its position would write its
            // wrap marker across the end of the section.
            let r = (read(RECV_POS) | 4095) - 7;
            write(&[RECV_POS], r);
            write(&CONSUMED_POS, r);
            write(&[SEND_POS], r + 4);
            write(&SENT_SNAPSHOTS, r + 4);
            read(at[0])
        } else {
            read(at[0]).wrapping_add_signed(*delta)
        };
        write(at, v);
        let start = Instant::now();
        let out = Command::new(std::env::current_exe().unwrap())
            .args([TEST, "--exact", "--nocapture", "-q", "--test-threads=1"])
            .env(ROLE, "reader")
            .env("SHMGADGET_DOMAIN", &domain)
            .output()
            .unwrap();
        let took = start.elapsed();
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.signal(),
            None,
            "damage {delta:+} at {at:?}: the C reader died of a signal\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "damage {delta:+} at {at:?}: {:?}\n{text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(took < Duration::from_secs(10), "damage {delta:+} at {at:?}: took {took:?}");
        for l in text.lines().filter(|l| l.contains('=')) {
            let (k, v) = l.split_once('=').unwrap();
            let v: i64 = v.trim().parse().unwrap();
            *codes.entry(format!("{k}{}", if v >= 0 { ">=0".to_owned() } else { format!("={v}") })).or_default() += 1;
        }
        // Repair for the next round: an empty queue, all positions equal and aligned.
        let all = [SEND_POS, RECV_POS, CONSUMED_POS[0], CONSUMED_POS[1], SENT_SNAPSHOTS[0], SENT_SNAPSHOTS[1]];
        let top = all.map(read).into_iter().max().unwrap().next_multiple_of(8).min(1 << 50);
        write(&all, top);
    }
    eprintln!("{} damages, results: {codes:?}", damages.len());
    assert!(
        codes.keys().any(|k| k.contains(&format!("={}", shm_nt::SHM_ERR_CORRUPT))),
        "no damage was ever reported as corrupt: {codes:?}"
    );
    drop(q);
    d.delete_section("cq").unwrap();
    d.detach().unwrap();
    common::assert_no_leftovers(&domain);
}
