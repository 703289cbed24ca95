//! Damaged queues, from another process: a victim process holds a live queue of each kind
//! (sender and receiver attached, messages in flight), the test process writes random bytes
//! into its header (and, for a slot queue, its slot heads), and the victim then runs every
//! operation: `try_recv`, `recv_timeout`, `recv_into`, `try_send`, `send_timeout`, inspection,
//! then the same again after reopening the queue by name. Each must return an error or a
//! correct result (a message some sender really sent, byte for byte), never a signal, a panic
//! or a wait over 10 s; the test process inspects the damaged queue too, and runs the CLI's
//! `info` on it every few seeds when the `shmgadget` binary is built next to this test (as
//! `cargo test --workspace` does).
//!
//! Seeds per kind: `SHMG_QUEUE_DAMAGE_SEEDS` (default 150, a few seconds).
//!
//! What "correct" can mean: a queue has no checksums, so a position damaged to another
//! plausible value (a record boundary the ring really holds) delivers the record found there,
//! an old one or a repeated one. To make everything else detectable, every payload word has a
//! non-zero upper half (so a damaged position that lands inside a payload reads a record
//! length over the limit, and is reported), and the victim first runs the ring through a
//! full lap (so no zeroed, never-written record is left to find).
#![cfg(unix)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::Child;
use std::time::{Duration, Instant};

use common::*;
use shmgadget::queue::{ByteQueue, SlotQueue};
use shmgadget::{Domain, DomainOptions, ErrorKind};

const MIB: u64 = 1 << 20;
/// The longest any single call may take (the bound).
const LIMIT: Duration = Duration::from_secs(10);
/// Timeouts given to the timed calls (short: an empty queue waits that long).
const SHORT: Duration = Duration::from_millis(2);
const BYTE_RING: u64 = 4096;
const SLOTS: u64 = 16;
/// The first bytes of a queue header hold every word but the peer tables.
const HOT: u64 = 512;
/// Offsets of the header's words (queue layout 4): capacity, slot size, send position and
/// count, the byte-queue sender's two snapshots (position and count), receive position and
/// count, the eventcounts, the first sender's and receiver's token and intent, the byte-queue
/// receiver's two snapshots (consumed position and count), and the layout version.
const FIELDS: [u64; 22] =
    [24, 32, 128, 136, 144, 168, 176, 200, 256, 264, 384, 388, 392, 520, 528, 1552, 1560, 2688, 2712, 2720, 2744, 16];
const SEND_POS: u64 = 128;
const RECV_POS: u64 = 256;
const DATA_OFFSET: u64 = shmgadget::queue::DATA_OFFSET;

fn seeds() -> u64 {
    std::env::var("SHMG_QUEUE_DAMAGE_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(150)
}

/// splitmix64: a tiny deterministic generator, so a failing seed replays.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A payload word: upper half `0xC0DE` and the message's number, lower half its index.
fn word(msg: u32, i: u32) -> u64 {
    ((0xC0DE_0000 | (msg & 0xFFFF)) as u64) << 32 | i as u64
}

fn message(msg: u32) -> Vec<u8> {
    // Only the low 16 bits of the number are in the payload: the length depends on them alone.
    let words = 1 + (msg & 0xFFFF) % 13;
    (0..words).flat_map(|i| word(msg, i).to_le_bytes()).collect()
}

/// Whether `m` is a message `message` makes (for some number below `sent`).
fn well_formed(m: &[u8], sent: u32) -> bool {
    if m.is_empty() || m.len() % 8 != 0 {
        return false;
    }
    let first = u64::from_le_bytes(m[..8].try_into().unwrap());
    let n = ((first >> 32) & 0xFFFF) as u32;
    // The message numbers wrap at 16 bits in the payload; `sent` stays far below that here.
    n < sent.max(1) && m == message(n)
}

/// Times `f`, failing if it took over LIMIT.
fn timed<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let r = f();
    let took = start.elapsed();
    assert!(took < LIMIT, "{what} took {took:?}");
    r
}

/// Errors an operation on a damaged queue may give; anything else is a failure.
fn acceptable(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::Corrupt
            | ErrorKind::WouldBlock
            | ErrorKind::Timeout
            | ErrorKind::Disconnected
            | ErrorKind::AlreadyExists
            | ErrorKind::RegistryFull
            | ErrorKind::InvalidArgument
            | ErrorKind::InvalidSize
    )
}

fn check<T>(what: &str, r: &shmgadget::Result<T>, errors: &mut u32) {
    if let Err(e) = r {
        assert!(acceptable(e.kind()), "{what}: unexpected error {e}");
        *errors += 1;
    }
}

/// Byte queue: every operation on the live (damaged) handles, then on fresh ones.
fn byte_victim_ops(d: &Domain, name: &str, sent: &mut u32) -> (u32, u32) {
    let (mut ok, mut errors) = (0u32, 0u32);
    let q = ByteQueue::open(d, name).unwrap();
    let mut tx = q.sender().unwrap();
    let mut rx = q.receiver().unwrap();
    // A full lap first (see the module docs), then a few messages left queued.
    let mut passed = 0;
    while passed < 2 * BYTE_RING {
        let m = message(*sent);
        tx.send_timeout(&m, LIMIT).unwrap();
        *sent += 1;
        passed += m.len() as u64 + 8;
        let got = rx.recv_timeout(LIMIT).unwrap();
        assert_eq!(&*got, &m[..]);
    }
    for _ in 0..5 {
        tx.send_timeout(&message(*sent), LIMIT).unwrap();
        *sent += 1;
    }
    println!("READY");
    wait_for_go();
    byte_round(&q, &mut tx, &mut rx, sent, &mut ok, &mut errors);
    drop(rx);
    drop(tx);
    let q = match timed("open", || ByteQueue::open(d, name)) {
        Ok(q) => q,
        Err(e) => {
            check::<()>("open", &Err(e), &mut errors);
            return (ok, errors);
        }
    };
    let t = timed("sender", || q.sender());
    check("sender", &t, &mut errors);
    let r = timed("receiver", || q.receiver());
    check("receiver", &r, &mut errors);
    if let (Ok(mut tx), Ok(mut rx)) = (t, r) {
        byte_round(&q, &mut tx, &mut rx, sent, &mut ok, &mut errors);
    }
    (ok, errors)
}

fn byte_round(
    q: &ByteQueue,
    tx: &mut shmgadget::queue::ByteSender<'_>,
    rx: &mut shmgadget::queue::ByteReceiver<'_>,
    sent: &mut u32,
    ok: &mut u32,
    errors: &mut u32,
) {
    for i in 0..6u32 {
        let got = timed("try_recv", || rx.try_recv().map(|m| m.to_vec()));
        check("try_recv", &got, errors);
        if let Ok(m) = &got {
            assert!(well_formed(m, *sent), "try_recv returned a message nobody sent: {m:?}");
            *ok += 1;
        }
        let got = timed("recv_timeout", || rx.recv_timeout(SHORT).map(|m| m.to_vec()));
        check("recv_timeout", &got, errors);
        if let Ok(m) = &got {
            assert!(well_formed(m, *sent), "recv_timeout returned a message nobody sent: {m:?}");
            *ok += 1;
        }
        let mut buf = [0u8; 256];
        let got = timed("recv_into", || rx.recv_into(&mut buf, Some(SHORT)));
        check("recv_into", &got, errors);
        if let Ok(n) = got {
            assert!(well_formed(&buf[..n], *sent), "recv_into returned a message nobody sent");
            *ok += 1;
        }
        let m = message(*sent);
        *sent += 1;
        let r = if i % 2 == 0 {
            timed("try_send", || tx.try_send(&m))
        } else {
            timed("send_timeout", || tx.send_timeout(&m, SHORT))
        };
        check("send", &r, errors);
        *ok += r.is_ok() as u32;
        let info = timed("inspect", || shmgadget::queue::inspect(q.section().unwrap()));
        check("inspect", &info, errors);
    }
}

/// Slot queue: as `byte_victim_ops`.
fn slot_victim_ops(d: &Domain, name: &str, sent: &mut u64) -> (u32, u32) {
    let (mut ok, mut errors) = (0u32, 0u32);
    let q = SlotQueue::<u64>::open(d, name).unwrap();
    let mut tx = q.sender().unwrap();
    let mut rx = q.receiver().unwrap();
    for _ in 0..3 * SLOTS {
        tx.send_timeout(0xC0DE << 48 | *sent, LIMIT).unwrap();
        *sent += 1;
        rx.recv_timeout(LIMIT).unwrap();
    }
    for _ in 0..5 {
        tx.send_timeout(0xC0DE << 48 | *sent, LIMIT).unwrap();
        *sent += 1;
    }
    println!("READY");
    wait_for_go();
    slot_round(&q, &mut tx, &mut rx, sent, &mut ok, &mut errors);
    drop(rx);
    drop(tx);
    let q = match timed("open", || SlotQueue::<u64>::open(d, name)) {
        Ok(q) => q,
        Err(e) => {
            check::<()>("open", &Err(e), &mut errors);
            return (ok, errors);
        }
    };
    let t = timed("sender", || q.sender());
    check("sender", &t, &mut errors);
    let r = timed("receiver", || q.receiver());
    check("receiver", &r, &mut errors);
    if let (Ok(mut tx), Ok(mut rx)) = (t, r) {
        slot_round(&q, &mut tx, &mut rx, sent, &mut ok, &mut errors);
    }
    (ok, errors)
}

fn slot_round(
    q: &SlotQueue<u64>,
    tx: &mut shmgadget::queue::SlotSender<'_, u64>,
    rx: &mut shmgadget::queue::SlotReceiver<'_, u64>,
    sent: &mut u64,
    ok: &mut u32,
    errors: &mut u32,
) {
    let good = |v: u64, sent: u64| v >> 48 == 0xC0DE && (v & 0xFFFF_FFFF_FFFF) < sent;
    for i in 0..6u32 {
        let got = timed("try_recv", || rx.try_recv());
        check("try_recv", &got, errors);
        if let Ok(v) = got {
            assert!(good(v, *sent), "try_recv returned a value nobody sent: {v:#x}");
            *ok += 1;
        }
        let got = timed("recv_timeout", || rx.recv_timeout(SHORT));
        check("recv_timeout", &got, errors);
        if let Ok(v) = got {
            assert!(good(v, *sent), "recv_timeout returned a value nobody sent: {v:#x}");
            *ok += 1;
        }
        let v = 0xC0DE << 48 | *sent;
        *sent += 1;
        let r = if i % 2 == 0 {
            timed("try_send", || tx.try_send(v))
        } else {
            timed("send_timeout", || tx.send_timeout(v, SHORT))
        };
        check("send", &r, errors);
        *ok += r.is_ok() as u32;
        let info = timed("inspect", || shmgadget::queue::inspect(q.section().unwrap()));
        check("inspect", &info, errors);
    }
}

fn wait_for_go() {
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "GO", "unexpected command {line:?}");
}

/// The victim: for each `QUEUE <name>` line, runs the operations on that queue.
fn victim(slots: bool) {
    let d = Domain::attach_with(&child_domain(), &DomainOptions { must_exist: true, ..small(64 * MIB) }).unwrap();
    let (mut sent_b, mut sent_s) = (0u32, 0u64);
    let stdin = std::io::stdin();
    loop {
        let mut line = String::new();
        if stdin.read_line(&mut line).unwrap() == 0 {
            return;
        }
        let Some(name) = line.trim().strip_prefix("QUEUE ") else { return };
        let (ok, errors) =
            if slots { slot_victim_ops(&d, name, &mut sent_s) } else { byte_victim_ops(&d, name, &mut sent_b) };
        println!("DONE ok={ok} errors={errors}");
        std::io::stdout().flush().unwrap();
    }
}

/// The CLI binary built next to this test, if any (`target/debug/shmgadget`).
fn cli() -> Option<std::path::PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let bin = exe.parent()?.parent()?.join("shmgadget");
    bin.is_file().then_some(bin)
}

/// The damager: the test process.
fn damage_queues(test: &str, slots: bool) {
    let domain = unique_domain(if slots { "qdmg-s" } else { "qdmg-b" });
    let d = Domain::attach_with(&domain, &small(64 * MIB)).unwrap();
    let mut child = spawn(test, "victim", &domain, &[]);
    let mut stdin = child.stdin.take().unwrap();
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(l).is_err() {
                return;
            }
        }
    });
    let expect = |child: &mut Child, want: &str, seed: u64| -> String {
        let deadline = Instant::now() + LIMIT * 3;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left.min(Duration::from_millis(100))) {
                Ok(l) if l.starts_with(want) => return l,
                Ok(_) => {}
                Err(_) => {
                    if let Some(status) = child.try_wait().unwrap() {
                        panic!("seed {seed}: the victim died: {status}");
                    }
                    assert!(Instant::now() < deadline, "seed {seed}: the victim did not answer {want} in time");
                }
            }
        }
    };
    let cli = cli();
    let (mut ok, mut errors, mut corrupt_seen, mut cli_runs) = (0u64, 0u64, 0u64, 0u64);
    for seed in 0..seeds() {
        let name = format!("q{seed}");
        // The queue stays open here (a transient section lives while someone has it).
        let (bq, sq) = if slots {
            (None, Some(SlotQueue::<u64>::create(&d, &name, SLOTS).unwrap()))
        } else {
            (Some(ByteQueue::create(&d, &name, BYTE_RING).unwrap()), None)
        };
        let section = d.open_section(&name).unwrap();
        writeln!(stdin, "QUEUE {name}").unwrap();
        expect(&mut child, "READY", seed);
        let word_at = |off: u64| {
            // SAFETY: an 8-aligned offset inside the mapped header; a racy read of shared
            // memory, as a debugger's.
            unsafe { std::ptr::read_volatile(section.as_ptr().add(off as usize).cast::<u64>()) }
        };
        // The layout this test assumes (FIELDS) is the library's.
        assert!(word_at(SEND_POS) > word_at(RECV_POS) && word_at(24) == if slots { SLOTS } else { BYTE_RING });
        // 1 to 4 writes of 4 bytes: mostly into the words that matter (often a small change
        // of the value there, which only range and alignment checks can catch), sometimes
        // anywhere in the header, and (slot queue) into the slot heads.
        let mut rng = Rng(seed ^ if slots { 0x5107 } else { 0xB17E });
        for _ in 0..1 + rng.below(4) {
            let off = match rng.below(10) {
                0..=3 => FIELDS[rng.below(FIELDS.len() as u64) as usize],
                4 | 5 => rng.below(HOT / 4) * 4,
                6 | 7 if slots => DATA_OFFSET + rng.below(SLOTS) * 32 + rng.below(4) * 4,
                _ => rng.below(DATA_OFFSET / 4) * 4,
            };
            // SAFETY: `off + 4` is inside the mapped section (header or ring); a racy access
            // to shared memory is the point of the test (the library reads it through
            // atomics).
            let old = unsafe { std::ptr::read_volatile(section.as_ptr().add(off as usize).cast::<u32>()) };
            let v = match rng.below(6) {
                0 => rng.next() as u32,
                1 => rng.below(16) as u32,
                2 => u32::MAX - rng.below(16) as u32,
                3 => 1u32 << rng.below(32),
                _ => old.wrapping_add(rng.below(129) as u32).wrapping_sub(64),
            };
            // SAFETY: as above.
            unsafe { std::ptr::write_volatile(section.as_ptr().add(off as usize).cast::<u32>(), v) };
        }
        // The victim is idle now (it waits for GO): inspection and the CLI see the same bytes.
        let inspected = timed("inspect (damager)", || shmgadget::queue::inspect(&section));
        let damaged = inspected.as_ref().is_err_and(|e| e.kind() == ErrorKind::Corrupt);
        if let Err(e) = &inspected {
            assert!(acceptable(e.kind()), "seed {seed}: inspect: {e}");
            corrupt_seen += damaged as u64;
        }
        if let Some(bin) = cli.as_ref().filter(|_| damaged || seed % 10 == 0) {
            let out = timed("shmgadget info", || {
                std::process::Command::new(bin).args(["--domain", &domain, "info", &name]).output().unwrap()
            });
            let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
            assert!(out.status.code().is_some(), "seed {seed}: `shmgadget info` died: {:?}", out.status);
            // A damaged queue is reported as such (exit status 1), a healthy one with its state.
            let want = if damaged { (1, "DAMAGED") } else { (0, " queue, ") };
            assert!(
                out.status.code() == Some(want.0) && text.contains(want.1),
                "seed {seed}: `shmgadget info` on a {} queue: {:?}\n{text}",
                if damaged { "damaged" } else { "healthy" },
                out.status
            );
            cli_runs += 1;
        }
        writeln!(stdin, "GO").unwrap();
        let done = expect(&mut child, "DONE", seed);
        let field = |k: &str| -> u64 {
            done.split_whitespace().find_map(|f| f.strip_prefix(k)?.strip_prefix('=')?.parse().ok()).unwrap()
        };
        ok += field("ok");
        errors += field("errors");
        drop(section);
        drop((bq, sq));
        let _ = d.delete_section(&name);
    }
    drop(stdin);
    let status = wait(&mut child, LIMIT);
    assert!(status.success(), "victim: {status}");
    eprintln!(
        "{} seeds: {ok} correct results, {errors} errors, {corrupt_seen} damaged queues inspected as Corrupt, {cli_runs} `shmgadget info` runs",
        seeds()
    );
    assert!(ok > 0 && errors > 0 && corrupt_seen > 0, "the damage never showed, or nothing ever worked");
    drop(d);
    assert_clean(&domain);
}

#[test]
fn a_byte_queue_damaged_by_another_process_gives_errors_or_correct_results() {
    const TEST: &str = "a_byte_queue_damaged_by_another_process_gives_errors_or_correct_results";
    match role().as_deref() {
        Some("victim") => victim(false),
        _ => damage_queues(TEST, false),
    }
}

#[test]
fn a_slot_queue_damaged_by_another_process_gives_errors_or_correct_results() {
    const TEST: &str = "a_slot_queue_damaged_by_another_process_gives_errors_or_correct_results";
    match role().as_deref() {
        Some("victim") => victim(true),
        _ => damage_queues(TEST, true),
    }
}
