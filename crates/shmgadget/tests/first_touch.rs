//! Map on first touch, across real processes: pointers into sections a process never opened.
#![cfg(unix)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use shmgadget::{Domain, DomainOptions, SectionOptions};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

fn addr_env() -> usize {
    let s = std::env::var("ADDR").unwrap();
    usize::from_str_radix(s.trim_start_matches("0x"), 16).unwrap()
}

/// Runs a child and returns its exit status and stderr (for crash tests).
fn run_crashing(test: &str, role: &str, domain: &str, env: &[(&str, String)]) -> (std::process::ExitStatus, String) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1", "-q"])
        .env(ROLE, role)
        .env(DOMAIN, domain)
        .envs(env.iter().map(|(k, v)| (*k, v.clone())))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
    let status = wait(&mut child, Duration::from_secs(60));
    (status, reader.join().unwrap())
}

#[test]
fn pointer_from_another_process_into_an_unopened_section_just_works() {
    match role().as_deref() {
        Some("toucher") => {
            let d = Domain::attach_with(&child_domain(), &small(GIB)).unwrap();
            let p = addr_env() as *mut u64;
            // SAFETY: the parent created a section at this address and wrote the value; we
            // never opened it: the first access faults and the handler maps it.
            let value = unsafe { p.read_volatile() };
            // SAFETY: as above; the parent reads this slot only after we exit.
            unsafe { p.add(1).write_volatile(value + 1) };
            println!("VALUE={value:#x}");
            println!("MAPS={}", shmgadget::first_touch_maps());
            drop(d);
        }
        _ => {
            let domain = unique_domain("ft-ptr");
            let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
            let s = d.create_section("data", MIB, &SectionOptions::new().transient()).unwrap();
            let p = s.as_ptr().cast::<u64>();
            // SAFETY: first two words of our fresh section; the child runs after this write.
            unsafe { p.write_volatile(0xfeed_f00d) };
            let r = run(
                "pointer_from_another_process_into_an_unopened_section_just_works",
                "toucher",
                &domain,
                &[("ADDR", format!("{:#x}", p as usize))],
            );
            assert_eq!(r["VALUE"], "0xfeedf00d");
            assert_eq!(r["MAPS"], "1", "exactly one first-touch mapping");
            // SAFETY: the child wrote the second word before exiting.
            assert_eq!(unsafe { p.add(1).read_volatile() }, 0xfeed_f00e);
            drop(s);
            d.detach().unwrap();
            assert_clean(&domain);
        }
    }
}

#[test]
fn sixteen_threads_touching_sixteen_new_sections_map_each_exactly_once() {
    match role().as_deref() {
        Some("threads") => {
            let d = Domain::attach_with(&child_domain(), &small(GIB)).unwrap();
            // Addresses from the registry listing; nothing is mapped yet.
            let addrs: Vec<usize> = d.sections().iter().map(|s| s.address as usize).collect();
            assert_eq!(addrs.len(), 16);
            let barrier = std::sync::Barrier::new(16);
            let sum: u64 = std::thread::scope(|scope| {
                let handles: Vec<_> = (0..16)
                    .map(|t| {
                        let (addrs, barrier) = (&addrs, &barrier);
                        scope.spawn(move || {
                            barrier.wait();
                            // Every thread touches every section, starting at a different one.
                            (0..16)
                                .map(|i| {
                                    let a = addrs[(t + i) % 16] as *const u64;
                                    // SAFETY: each address is a live section's first word,
                                    // written by the parent before we started.
                                    unsafe { a.read_volatile() }
                                })
                                .sum::<u64>()
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).sum()
            });
            println!("SUM={sum}");
            println!("MAPS={}", shmgadget::first_touch_maps());
            let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
            let mapped_lines = addrs.iter().filter(|a| maps.lines().any(|l| l.starts_with(&format!("{a:x}-")))).count();
            println!("LINES={mapped_lines}");
        }
        _ => {
            let domain = unique_domain("ft-16");
            let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
            let sections: Vec<_> = (0..16u64)
                .map(|i| {
                    let s = d.create_section(&format!("s{i}"), 64 * 1024, &SectionOptions::new().transient()).unwrap();
                    // SAFETY: first word of a fresh section of ours.
                    unsafe { s.as_ptr().cast::<u64>().write(i + 1) };
                    s
                })
                .collect();
            let r = run("sixteen_threads_touching_sixteen_new_sections_map_each_exactly_once", "threads", &domain, &[]);
            assert_eq!(r["SUM"], (16 * (1..=16).sum::<u64>()).to_string());
            assert_eq!(r["MAPS"], "16", "each section mapped once, not once per thread");
            assert_eq!(r["LINES"], "16");
            drop(sections);
            d.detach().unwrap();
            assert_clean(&domain);
        }
    }
}

#[test]
fn a_section_created_after_attach_is_reachable_by_first_touch() {
    match role().as_deref() {
        Some("early") => {
            let d = Domain::attach_with(&child_domain(), &small(GIB)).unwrap();
            println!("READY");
            let mut line = String::new();
            std::io::stdin().read_line(&mut line).unwrap();
            let addr = usize::from_str_radix(line.trim().trim_start_matches("0x"), 16).unwrap();
            // SAFETY: the parent created the section after we attached and wrote the value
            // before sending us its address.
            let v = unsafe { (addr as *const u64).read_volatile() };
            println!("VALUE={v}");
            drop(d);
        }
        _ => {
            let domain = unique_domain("ft-late");
            let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
            let mut child = spawn("a_section_created_after_attach_is_reachable_by_first_touch", "early", &domain, &[]);
            let (tx, rx) = mpsc::channel();
            let out = child.stdout.take().unwrap();
            std::thread::spawn(move || {
                for l in BufReader::new(out).lines().map_while(Result::ok) {
                    let _ = tx.send(l);
                }
            });
            let next_report = || loop {
                let l = rx.recv_timeout(Duration::from_secs(30)).expect("child went silent");
                if !l.is_empty() && !l.starts_with("running") {
                    return l;
                }
            };
            assert_eq!(next_report(), "READY");
            let s = d.create_section("late", 4096, &SectionOptions::new().transient()).unwrap();
            // SAFETY: first word of our fresh section.
            unsafe { s.as_ptr().cast::<u64>().write(4242) };
            writeln!(child.stdin.as_mut().unwrap(), "{:#x}", s.as_ptr() as usize).unwrap();
            assert_eq!(next_report(), "VALUE=4242");
            assert!(wait(&mut child, Duration::from_secs(30)).success());
            drop(s);
            d.detach().unwrap();
            assert_clean(&domain);
        }
    }
}

#[test]
fn faults_that_are_not_ours_still_crash_as_before() {
    const TEST: &str = "faults_that_are_not_ours_still_crash_as_before";
    match role().as_deref() {
        Some("null") => {
            let _d = Domain::attach_with(&child_domain(), &small(GIB)).unwrap();
            let p = std::hint::black_box(std::ptr::null::<u64>());
            // SAFETY: deliberately invalid: this process must die with SIGSEGV.
            let v = unsafe { p.read_volatile() };
            println!("{v}");
        }
        Some("hole") => {
            let d = Domain::attach_with(&child_domain(), &small(GIB)).unwrap();
            let p = (d.window().0 + 512 * MIB as usize) as *const u64;
            // SAFETY: deliberately invalid: inside the window where no section lives.
            let v = unsafe { p.read_volatile() };
            println!("{v}");
        }
        Some("deleted") => {
            let _d = Domain::attach_with(&child_domain(), &small(GIB)).unwrap();
            // SAFETY: deliberately invalid: the section at ADDR was deleted before we started.
            let v = unsafe { (addr_env() as *const u64).read_volatile() };
            println!("{v}");
        }
        Some("overflow") => {
            let _d = Domain::attach_with(&child_domain(), &small(GIB)).unwrap();
            #[allow(unconditional_recursion)] // the point: overflow the stack
            fn recurse(n: u64) -> u64 {
                let buf = std::hint::black_box([n; 64]);
                recurse(buf[3] + 1) + buf[7]
            }
            println!("{}", recurse(0));
        }
        _ => {
            let domain = unique_domain("ft-crash");
            let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
            let (status, _) = run_crashing(TEST, "null", &domain, &[]);
            assert_eq!(status.signal(), Some(libc::SIGSEGV), "null dereference: {status}");
            let (status, _) = run_crashing(TEST, "hole", &domain, &[]);
            assert_eq!(status.signal(), Some(libc::SIGSEGV), "window hole: {status}");
            let s = d.create_section("gone", 4096, &SectionOptions::new().transient()).unwrap();
            let addr = format!("{:#x}", s.as_ptr() as usize);
            drop(s);
            d.delete_section("gone").unwrap();
            let (status, _) = run_crashing(TEST, "deleted", &domain, &[("ADDR", addr)]);
            assert_eq!(status.signal(), Some(libc::SIGSEGV), "deleted section must not be remapped: {status}");
            let (status, stderr) = run_crashing(TEST, "overflow", &domain, &[]);
            assert!(stderr.contains("has overflowed its stack"), "Rust's message survives: {stderr}");
            assert_eq!(status.signal(), Some(libc::SIGABRT), "{status}");
            d.detach().unwrap();
            assert_clean(&domain);
        }
    }
}

#[test]
fn ensure_mapped_lets_a_system_call_read_an_untouched_section() {
    match role().as_deref() {
        Some("writer") => {
            let _d = Domain::attach_with(&child_domain(), &small(GIB)).unwrap();
            let addr = addr_env() as *const u8;
            let mut fds = [0; 2];
            // SAFETY: pipe(2) with a valid two-element array.
            assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
            // SAFETY: write(2) reads 16 bytes at `addr`; if they are not mapped the kernel
            // returns EFAULT instead of faulting.
            let before = unsafe { libc::write(fds[1], addr.cast(), 16) };
            let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
            println!("BEFORE={before} ERRNO={errno}");
            shmgadget::ensure_mapped(addr, 16).unwrap();
            // SAFETY: as above; now mapped.
            let after = unsafe { libc::write(fds[1], addr.cast(), 16) };
            let mut buf = [0u8; 16];
            // SAFETY: read(2) into our 16-byte buffer.
            unsafe { libc::read(fds[0], buf.as_mut_ptr().cast(), 16) };
            println!("AFTER={after}");
            println!("DATA={}", String::from_utf8_lossy(&buf));
            let outside = shmgadget::ensure_mapped(std::ptr::null(), 1).unwrap_err();
            println!("OUTSIDE={:?}", outside.kind());
        }
        _ => {
            let domain = unique_domain("ft-ensure");
            let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
            let s = d.create_section("buf", 4096, &SectionOptions::new().transient()).unwrap();
            // SAFETY: our fresh section.
            unsafe { s.as_ptr().copy_from_nonoverlapping(b"sixteen bytes!!!".as_ptr(), 16) };
            let r = run(
                "ensure_mapped_lets_a_system_call_read_an_untouched_section",
                "writer",
                &domain,
                &[("ADDR", format!("{:#x}", s.as_ptr() as usize))],
            );
            // BEFORE and ERRNO share a line; the parser splits on the first '='.
            assert_eq!(r["BEFORE"], format!("-1 ERRNO={}", libc::EFAULT));
            assert_eq!(r["AFTER"], "16");
            assert_eq!(r["DATA"], "sixteen bytes!!!");
            assert_eq!(r["OUTSIDE"], "InvalidArgument");
            drop(s);
            d.detach().unwrap();
            assert_clean(&domain);
        }
    }
}

#[test]
fn eager_mode_needs_no_handler() {
    match role().as_deref() {
        Some("eager") => {
            let opts = DomainOptions { must_exist: true, ..small(GIB) };
            assert!(opts.eager, "SHMGADGET_EAGER=1 selects eager mode");
            let d = Domain::attach_with(&child_domain(), &opts).unwrap();
            println!("HANDLER={}", shmgadget::handler_installed());
            // SAFETY: attach mapped every existing section; the parent wrote this word.
            let v = unsafe { (addr_env() as *const u64).read_volatile() };
            println!("VALUE={v}");
            println!("MAPS={}", shmgadget::first_touch_maps());
            drop(d);
        }
        _ => {
            let domain = unique_domain("ft-eager");
            let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
            let s = d.create_section("e", 4096, &SectionOptions::new().transient()).unwrap();
            // SAFETY: our fresh section.
            unsafe { s.as_ptr().cast::<u64>().write(77) };
            let env = [("ADDR", format!("{:#x}", s.as_ptr() as usize)), ("SHMGADGET_EAGER", "1".to_owned())];
            let r = run("eager_mode_needs_no_handler", "eager", &domain, &env);
            assert_eq!(r["HANDLER"], "false");
            assert_eq!(r["VALUE"], "77");
            assert_eq!(r["MAPS"], "0");
            drop(s);
            d.detach().unwrap();
            assert_clean(&domain);
        }
    }
}

static mut HOST_HANDLER_HITS: u32 = 0;

extern "C" fn host_handler(_sig: libc::c_int) {
    // SAFETY: single-threaded child; _exit is async-signal-safe.
    unsafe {
        HOST_HANDLER_HITS += 1;
        libc::_exit(42);
    }
}

#[test]
fn a_replaced_handler_is_noticed_and_chained_to() {
    match role().as_deref() {
        Some("host") => {
            let opts = small(GIB);
            let d = Domain::attach_with(&child_domain(), &opts).unwrap();
            // A host installs its own SIGSEGV handler over ours.
            // SAFETY: a valid sigaction naming a plain handler.
            unsafe {
                let mut act: libc::sigaction = std::mem::zeroed();
                act.sa_sigaction = host_handler as extern "C" fn(libc::c_int) as libc::sighandler_t;
                libc::sigemptyset(&mut act.sa_mask);
                assert_eq!(libc::sigaction(libc::SIGSEGV, &act, std::ptr::null_mut()), 0);
            }
            assert!(!shmgadget::handler_installed());
            // The next attach notices and puts ours back in front.
            let again = Domain::attach_with(&child_domain(), &opts).unwrap();
            assert!(shmgadget::handler_installed());
            // SAFETY: the parent's section, never opened here: first touch.
            let v = unsafe { (addr_env() as *const u64).read_volatile() };
            assert_eq!(v, 99);
            drop((d, again));
            // A fault that is not ours reaches the host's handler, which exits with 42.
            let p = std::hint::black_box(std::ptr::null::<u64>());
            // SAFETY: deliberately invalid.
            let v = unsafe { p.read_volatile() };
            println!("{v}");
        }
        _ => {
            let domain = unique_domain("ft-chain");
            let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
            let s = d.create_section("c", 4096, &SectionOptions::new().transient()).unwrap();
            // SAFETY: our fresh section.
            unsafe { s.as_ptr().cast::<u64>().write(99) };
            let env = [("ADDR", format!("{:#x}", s.as_ptr() as usize))];
            let (status, stderr) = run_crashing("a_replaced_handler_is_noticed_and_chained_to", "host", &domain, &env);
            assert_eq!(status.code(), Some(42), "the host's handler ran: {status} {stderr}");
            drop(s);
            d.detach().unwrap();
            assert_clean(&domain);
        }
    }
}

/// The lowest descriptor number not in use: with `RLIMIT_NOFILE` set to it, every open fails
/// with `EMFILE`.
fn lowest_free_descriptor() -> u64 {
    // SAFETY: dup(2) of stderr, closed at once; only learns the number the kernel hands out.
    unsafe {
        let fd = libc::dup(2);
        assert!(fd >= 0);
        libc::close(fd);
        fd as u64
    }
}

/// Creates one-page mappings that cannot merge (alternating protections) until the kernel
/// refuses more (`vm.max_map_count`): mapping a section then fails with `ENOMEM`.
fn exhaust_mappings() {
    for n in 0.. {
        let prot = if n % 2 == 0 { libc::PROT_READ } else { libc::PROT_NONE };
        // SAFETY: a new private anonymous mapping wherever the kernel likes; never used.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), 4096, prot, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) };
        if p == libc::MAP_FAILED {
            return;
        }
    }
}

fn limit_descriptors(n: u64) {
    let lim = libc::rlimit { rlim_cur: n, rlim_max: n };
    // SAFETY: setrlimit(2) with a valid struct.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0, "setrlimit");
}

#[test]
fn a_first_touch_that_cannot_map_says_why_on_stderr_and_still_crashes() {
    const TEST: &str = "a_first_touch_that_cannot_map_says_why_on_stderr_and_still_crashes";
    // (role, what the parent does to the object, the cause the line must name, ensure_mapped's kind)
    const CASES: [(&str, &str, &str); 5] = [
        ("descriptors", "EMFILE", "Os"),
        ("mappings", "ENOMEM", "Os"),
        ("truncated", "is 4096 bytes but the section has 65536", "Corrupt"),
        ("unlinked", "ENOENT", "NotFound"),
        ("permission", "EACCES", "PermissionDenied"),
    ];
    match role().as_deref() {
        Some(cause) if CASES.iter().any(|c| c.0 == cause) => {
            let _d = Domain::attach_with(&child_domain(), &small(GIB)).unwrap();
            let addr = addr_env();
            match cause {
                "descriptors" => limit_descriptors(lowest_free_descriptor()),
                "mappings" => exhaust_mappings(),
                // SAFETY: geteuid/setuid(2); as root we become `nobody`, for whom the object
                // (mode 000, owned by root) cannot be opened. A non-root owner cannot open a
                // mode-000 object either.
                "permission" if unsafe { libc::geteuid() } == 0 => assert_eq!(unsafe { libc::setuid(65534) }, 0),
                _ => {}
            }
            match shmgadget::ensure_mapped(addr as *const u8, 8) {
                Ok(()) => eprintln!("ENSURE=mapped"),
                Err(e) => eprintln!("ENSURE={:?}: {e}", e.kind()),
            }
            // SAFETY: deliberately crashing: the section at ADDR cannot be mapped.
            let v = unsafe { (addr as *const u64).read_volatile() };
            println!("{v}");
        }
        _ => {
            let domain = unique_domain("ft-fail");
            let d = Domain::attach_with(&domain, &small(GIB)).unwrap();
            for (cause, expected, kind) in CASES {
                let name = format!("c-{cause}");
                let s = d.create_section(&name, 64 * 1024, &SectionOptions::new().transient()).unwrap();
                // SAFETY: our fresh section.
                unsafe { s.as_ptr().cast::<u64>().write(5) };
                let addr = s.as_ptr() as usize + 16;
                let path = object_path(&d.section_info(&name).unwrap().object);
                match cause {
                    "truncated" => std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(4096).unwrap(),
                    "unlinked" => std::fs::remove_file(&path).unwrap(),
                    "permission" => {
                        use std::os::unix::fs::PermissionsExt;
                        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o000)).unwrap()
                    }
                    _ => {}
                }
                let (status, stderr) = run_crashing(TEST, cause, &domain, &[("ADDR", format!("{addr:#x}"))]);
                assert_eq!(status.signal(), Some(libc::SIGSEGV), "{cause}: still a SIGSEGV: {status}\n{stderr}");
                let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("shmgadget: ")).collect();
                assert_eq!(lines.len(), 1, "{cause}: one line from the handler:\n{stderr}");
                let line = lines[0];
                for part in [format!("{addr:#x}"), format!("section \"{name}\""), format!("domain \"{domain}\"")] {
                    assert!(line.contains(&part), "{cause}: the line names {part}: {line}");
                }
                assert!(line.contains(expected), "{cause}: the line names the cause {expected:?}: {line}");
                let ensure = stderr.lines().find_map(|l| l.strip_prefix("ENSURE=")).unwrap_or("(none)");
                eprintln!("{cause}:\n  handler: {line}\n  ensure_mapped: {ensure}");
                assert!(ensure.starts_with(&format!("{kind}: ")), "{cause}: ensure_mapped fails with {kind}: {ensure}");
                assert!(ensure.contains(&name), "{cause}: ensure_mapped's error names the section: {ensure}");
                if cause == "descriptors" {
                    assert!(ensure.contains("RLIMIT_NOFILE"), "says which limit: {ensure}");
                }
                if cause == "mappings" {
                    assert!(ensure.contains("max_map_count") && line.contains("max_map_count"), "{ensure}\n{line}");
                }
                drop(s);
                let deleted = d.delete_section(&name);
                assert!(deleted.is_ok() || cause == "unlinked", "{cause}: {deleted:?}");
            }
            d.detach().unwrap();
            assert_clean(&domain);
        }
    }
}
