//! Synchronisation costs, each next to its reference measured in the same run.
//!
//! * `lock_unlock`: uncontended `Mutex<u64>` lock+unlock against a raw `pthread_mutex_t`, both
//!   a default one and one configured like ours (process-shared, robust).
//! * `ping_pong`: a round trip between two processes through two shared semaphores, against
//!   the same round trip through two pipes. The partner process is this benchmark binary
//!   re-executed with `SHMG_BENCH_PARTNER` set.
//!
//! Run: `cargo bench -p shmgadget --bench sync`.

use std::hint::black_box;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use criterion::Criterion;
use shmgadget::sync::{Mutex, Semaphore};
use shmgadget::{Domain, DomainOptions, SectionOptions};

const PARTNER: &str = "SHMG_BENCH_PARTNER";

fn pthread_mutex(robust: bool) -> Box<libc::pthread_mutex_t> {
    // SAFETY: standard pthread initialisation of a heap-allocated mutex that is never moved.
    unsafe {
        let m: Box<libc::pthread_mutex_t> = Box::new(std::mem::zeroed());
        let mut attr: libc::pthread_mutexattr_t = std::mem::zeroed();
        libc::pthread_mutexattr_init(&mut attr);
        if robust {
            libc::pthread_mutexattr_setpshared(&mut attr, libc::PTHREAD_PROCESS_SHARED);
            libc::pthread_mutexattr_setrobust(&mut attr, libc::PTHREAD_MUTEX_ROBUST);
        }
        let p = Box::into_raw(m);
        libc::pthread_mutex_init(p, &attr);
        Box::from_raw(p)
    }
}

fn lock_unlock(c: &mut Criterion) {
    let mut g = c.benchmark_group("lock_unlock");
    g.measurement_time(Duration::from_secs(3));
    for (name, robust) in [("raw_pthread_default", false), ("raw_pthread_robust_pshared", true)] {
        let mut m = pthread_mutex(robust);
        let p: *mut libc::pthread_mutex_t = &mut *m;
        g.bench_function(name, |b| {
            b.iter(|| {
                // SAFETY: an initialised mutex, locked and unlocked by this thread.
                unsafe {
                    libc::pthread_mutex_lock(black_box(p));
                    libc::pthread_mutex_unlock(p);
                }
            })
        });
    }
    let storage = Box::new(std::mem::MaybeUninit::<Mutex<u64>>::zeroed());
    // SAFETY: all-zero bytes are a valid (uninitialised) Mutex<u64>; it is initialised below.
    let m: &Mutex<u64> = unsafe { storage.assume_init_ref() };
    m.init(0).unwrap();
    g.bench_function("shmgadget_mutex", |b| {
        b.iter(|| {
            // Same work as the raw references: lock, unlock, nothing in between.
            drop(black_box(black_box(m).lock().unwrap()));
        })
    });
    g.finish();
}

/// Runs `rounds` round trips against a partner; the closure does one.
fn timed(rounds: u64, mut one: impl FnMut()) -> Duration {
    let start = Instant::now();
    for _ in 0..rounds {
        one();
    }
    start.elapsed()
}

fn spawn_partner(kind: &str, extra: &[(&str, String)]) -> Child {
    Command::new(std::env::current_exe().unwrap()).env(PARTNER, kind).envs(extra.iter().cloned()).spawn().unwrap()
}

fn ping_pong(c: &mut Criterion) {
    let mut g = c.benchmark_group("ping_pong");
    g.measurement_time(Duration::from_secs(4));

    // Pipes: parent writes a byte to `to`, the partner echoes it back on `back`.
    let (mut to, mut back) = ([0i32; 2], [0i32; 2]);
    // SAFETY: pipe(2) with valid arrays; the descriptors are inherited by the partner.
    unsafe {
        libc::pipe(to.as_mut_ptr());
        libc::pipe(back.as_mut_ptr());
    }
    let mut partner = spawn_partner(
        "pipe",
        &[
            ("PIPE_IN", to[0].to_string()),
            ("PIPE_OUT", back[1].to_string()),
            ("PIPE_UNUSED", format!("{},{}", to[1], back[0])),
        ],
    );
    g.bench_function("pipe", |b| {
        b.iter_custom(|rounds| {
            timed(rounds, || {
                let mut byte = 1u8;
                // SAFETY: one-byte writes and reads on our pipe ends.
                unsafe {
                    libc::write(to[1], (&raw const byte).cast(), 1);
                    libc::read(back[0], (&raw mut byte).cast(), 1);
                }
            })
        })
    });
    // SAFETY: closing our write end makes the partner's read return 0, which ends it.
    unsafe { libc::close(to[1]) };
    partner.wait().unwrap();

    // Semaphores in a section: parent posts `ping`, the partner posts `pong` back.
    let domain_name = format!("bench-sync-{}", std::process::id());
    let opts = DomainOptions { window_size: 1 << 30, ..Default::default() };
    let domain = Domain::attach_with(&domain_name, &opts).unwrap();
    let section = domain.create_section("pp", 4096, &SectionOptions::new().transient()).unwrap();
    let (ping, pong) = (section.at::<Semaphore>(0).unwrap(), section.at::<Semaphore>(64).unwrap());
    ping.init(0).unwrap();
    pong.init(0).unwrap();
    let stop = section.at::<AtomicU32>(128).unwrap();
    let mut partner = spawn_partner("sem", &[("DOMAIN", domain_name.clone())]);
    g.bench_function("semaphore", |b| {
        b.iter_custom(|rounds| {
            timed(rounds, || {
                ping.post().unwrap();
                pong.wait().unwrap();
            })
        })
    });
    stop.store(1, Ordering::Relaxed);
    ping.post().unwrap();
    partner.wait().unwrap();
    g.finish();
    drop(section);
    domain.detach().unwrap();
}

fn partner(kind: &str) {
    match kind {
        "pipe" => {
            let fd_in: i32 = std::env::var("PIPE_IN").unwrap().parse().unwrap();
            let fd_out: i32 = std::env::var("PIPE_OUT").unwrap().parse().unwrap();
            // Close the parent's ends we inherited, or our own copy of its write end would keep
            // the pipe open and we would never see end-of-file.
            for fd in std::env::var("PIPE_UNUSED").unwrap().split(',') {
                // SAFETY: closing inherited descriptors this process does not use.
                unsafe { libc::close(fd.parse().unwrap()) };
            }
            let mut byte = 0u8;
            // SAFETY: one-byte reads and writes on inherited pipe ends.
            while unsafe { libc::read(fd_in, (&raw mut byte).cast(), 1) } == 1 {
                // SAFETY: as above.
                unsafe { libc::write(fd_out, (&raw const byte).cast(), 1) };
            }
        }
        "sem" => {
            let opts = DomainOptions { window_size: 1 << 30, must_exist: true, ..Default::default() };
            let domain = Domain::attach_with(&std::env::var("DOMAIN").unwrap(), &opts).unwrap();
            let section = domain.open_section("pp").unwrap();
            let (ping, pong) = (section.at::<Semaphore>(0).unwrap(), section.at::<Semaphore>(64).unwrap());
            let stop = section.at::<AtomicU32>(128).unwrap();
            loop {
                ping.wait().unwrap();
                if stop.load(Ordering::Relaxed) == 1 {
                    break;
                }
                pong.post().unwrap();
            }
        }
        other => panic!("unknown partner {other}"),
    }
}

fn main() {
    if let Ok(kind) = std::env::var(PARTNER) {
        partner(&kind);
        return;
    }
    let mut c = Criterion::default().configure_from_args();
    lock_unlock(&mut c);
    ping_pong(&mut c);
    c.final_summary();
}
