//! File-backed sections inside a domain window (issue 16): a heap in a user's file survives
//! every process and the domain's removal, and is adopted and walked by pointer in a new
//! domain; bad files are refused with clear errors; a full filesystem is `OutOfSpace`.
//! Real separate processes throughout.
#![cfg(unix)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use common::*;
use shmgadget::heap::Heap;
use shmgadget::{Domain, DomainOptions, ErrorKind, SectionOptions};

const GIB: u64 = 1 << 30;

fn file_path(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("shmg-fs-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("heap.shmg")
}

fn cleanup(path: &Path) {
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_dir(path.parent().unwrap());
}

fn at(base: u64) -> DomainOptions {
    DomainOptions { window_base: Some(base), window_size: GIB, ..Default::default() }
}

fn env_path() -> PathBuf {
    PathBuf::from(std::env::var("FILE").unwrap())
}

/// A node of the list: a value and a raw pointer to the next node (null at the end).
#[repr(C)]
struct Node {
    value: u64,
    next: *mut Node,
}

#[test]
fn a_heap_in_a_file_outlives_every_process_and_its_domain_and_is_walked_by_pointer_in_a_new_domain() {
    const TEST: &str =
        "a_heap_in_a_file_outlives_every_process_and_its_domain_and_is_walked_by_pointer_in_a_new_domain";
    const BASE: u64 = 0x3a00_0000_0000;
    const N: u64 = 5_000;
    match role().as_deref() {
        Some("builder") => {
            let d = Domain::attach_with(&child_domain(), &at(BASE)).unwrap();
            let (heap, created) = Heap::create_in_file(&d, "persist", &env_path(), 64 << 20).unwrap();
            assert!(created);
            let (head, _) = heap.find_or_init("head", || AtomicU64::new(0)).unwrap();
            let mut next: *mut Node = std::ptr::null_mut();
            for i in (0..N).rev() {
                let p = heap.alloc(std::alloc::Layout::new::<Node>()).unwrap().cast::<Node>().as_ptr();
                // SAFETY: a fresh block of the heap, sized and aligned for a Node.
                unsafe { p.write(Node { value: i * 3, next }) };
                next = p;
            }
            // Release: the list is written before the head that reaches it.
            head.store(next as u64, Ordering::Release);
            let info = heap.section().info();
            println!("ADDR={:#x}", info.address);
            println!("FILE={}", info.file.unwrap().display());
            drop(heap);
            d.detach().unwrap();
        }
        Some("walker") => {
            let d = Domain::attach_with(&child_domain(), &at(BASE)).unwrap();
            let (heap, created) = Heap::create_in_file(&d, "again", &env_path(), 1 << 20).unwrap();
            println!("CREATED={created}");
            println!("ADDR={:#x}", heap.section().info().address);
            let head = heap.find::<AtomicU64>("head").unwrap();
            // Acquire: pairs with the builder's Release store.
            let mut p = head.load(Ordering::Acquire) as *const Node;
            let (mut count, mut sum) = (0u64, 0u64);
            while !p.is_null() {
                // SAFETY: every pointer was written by the builder into this file's heap, which
                // is mapped at the same address here.
                let n = unsafe { &*p };
                sum += n.value;
                count += 1;
                p = n.next;
            }
            println!("COUNT={count}");
            println!("SUM={sum}");
            // Still a working heap: allocate and free.
            let b = heap.alloc(std::alloc::Layout::from_size_align(100, 8).unwrap()).unwrap();
            // SAFETY: allocated just above from this heap.
            unsafe { heap.free(b) }.unwrap();
            heap.check().unwrap();
            drop(heap);
            d.detach().unwrap();
        }
        _ => {
            let path = file_path("heap");
            let env = [("FILE", path.display().to_string())];
            let first = unique_domain("fsb");
            let built = run(TEST, "builder", &first, &env);
            assert_eq!(built["FILE"], path.display().to_string());
            // Every process is gone; the domain is removed: only the file remains.
            shmgadget::admin::remove_domain(&first, None, false, false).unwrap();
            assert_clean(&first);
            assert!(path.exists());
            let second = unique_domain("fsw");
            let walked = run(TEST, "walker", &second, &env);
            assert_eq!(walked["CREATED"], "false", "the heap was adopted, not made anew");
            assert_eq!(walked["ADDR"], built["ADDR"], "placed at the recorded address");
            assert_eq!(walked["COUNT"], N.to_string());
            assert_eq!(walked["SUM"], (3 * N * (N - 1) / 2).to_string());
            shmgadget::admin::remove_domain(&second, None, false, false).unwrap();
            assert_clean(&second);
            cleanup(&path);
        }
    }
}

#[test]
fn another_process_of_the_domain_opens_the_file_section_and_shares_its_bytes() {
    const TEST: &str = "another_process_of_the_domain_opens_the_file_section_and_shares_its_bytes";
    const BASE: u64 = 0x3b00_0000_0000;
    match role().as_deref() {
        Some("reader") => {
            let d = Domain::attach_with(&child_domain(), &at(BASE)).unwrap();
            let s = d.open_section("data").unwrap();
            // SAFETY: inside the section; the writer wrote these bytes before starting us.
            let got = unsafe { std::slice::from_raw_parts(s.as_ptr().add(8192), 5) };
            println!("GOT={}", String::from_utf8_lossy(got));
            println!("FILE={}", s.info().file.map(|p| p.display().to_string()).unwrap_or_default());
            // SAFETY: inside the section; the parent waits for us before reading.
            unsafe { s.as_ptr().add(100).copy_from_nonoverlapping(b"back".as_ptr(), 4) };
            d.detach().unwrap();
        }
        _ => {
            let path = file_path("share");
            let name = unique_domain("fss");
            let d = Domain::attach_with(&name, &at(BASE)).unwrap();
            let s = d.create_section("data", 1 << 20, &SectionOptions::new().file(&path)).unwrap();
            s.commit(3 * 4096).unwrap();
            // SAFETY: inside the committed section; nobody else runs yet.
            unsafe { s.as_ptr().add(8192).copy_from_nonoverlapping(b"hello".as_ptr(), 5) };
            let got = run(TEST, "reader", &name, &[]);
            assert_eq!(got["GOT"], "hello");
            assert_eq!(got["FILE"], path.display().to_string());
            // SAFETY: inside the section; the reader has exited.
            assert_eq!(unsafe { std::slice::from_raw_parts(s.as_ptr().add(100), 4) }, b"back");
            // In the file, after its header page.
            let bytes = std::fs::read(&path).unwrap();
            assert_eq!(&bytes[..8], b"SHMGFILE");
            assert_eq!(&bytes[4096 + 8192..4096 + 8192 + 5], b"hello");
            assert_eq!(bytes.len(), 4096 + (1 << 20), "header page + the whole capacity (sparse)");
            let info = d.section_info("data").unwrap();
            assert_eq!(info.file.as_deref(), Some(path.as_path()));
            assert!(info.resident.unwrap() >= 3 * 4096, "{info:?}");
            drop(s);
            d.delete_section("data").unwrap();
            assert!(path.exists(), "deleting the section leaves the file");
            d.detach().unwrap();
            assert_clean(&name);
            cleanup(&path);
        }
    }
}

#[test]
fn bad_files_and_taken_addresses_are_refused_with_clear_errors() {
    const BASE: u64 = 0x3c00_0000_0000;
    let path = file_path("bad");
    let dir = path.parent().unwrap().to_owned();
    let file = |p: &Path| SectionOptions::new().file(p);

    // A file placed once records its address (the first range of a fresh window); in a new
    // domain whose first section takes that range, the file is refused, naming the occupant.
    let first = unique_domain("fsx0");
    let d0 = Domain::attach_with(&first, &at(BASE)).unwrap();
    let s = d0.create_section("first", 4 << 20, &file(&path)).unwrap();
    let addr = s.as_ptr() as u64;
    drop(s);
    d0.detach().unwrap();
    shmgadget::admin::remove_domain(&first, None, false, false).unwrap();
    let name = unique_domain("fsx");
    let d = Domain::attach_with(&name, &at(BASE)).unwrap();
    let blocker = d.create_section("blocker", 4 << 20, &SectionOptions::new()).unwrap();
    assert_eq!(blocker.as_ptr() as u64, addr, "a fresh window places its first section first");
    let e = d.create_section("again", 4 << 20, &file(&path)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::WindowUnavailable, "{e}");
    assert!(e.to_string().contains("\"blocker\""), "names the occupant: {e}");
    drop(blocker);
    d.delete_section("blocker").unwrap();

    // Another live domain maps it: refused while that holds it.
    let again = d.create_section("again", 4 << 20, &file(&path)).unwrap();
    assert_eq!(again.as_ptr() as u64, addr);
    let other_name = unique_domain("fsy");
    let other = Domain::attach_with(&other_name, &at(BASE + 2 * GIB)).unwrap();
    let e = other.create_section("steal", 4 << 20, &file(&path)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::WouldBlock, "{e}");
    let e = shmgadget::MappedFile::open(&path).err().unwrap();
    assert_eq!(e.kind(), ErrorKind::WouldBlock, "{e}");
    drop(again);
    d.delete_section("again").unwrap();
    d.detach().unwrap();

    // Outside the other domain's window: never placed elsewhere.
    let e = other.create_section("steal", 4 << 20, &file(&path)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::WindowUnavailable, "{e}");
    assert!(e.to_string().contains("outside domain"), "{e}");

    // A damaged header.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[20] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let e = other.create_section("x", 4 << 20, &file(&path)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("damaged"), "{e}");

    // Too short.
    let short = dir.join("short");
    std::fs::write(&short, b"tiny").unwrap();
    let e = other.create_section("x", 4 << 20, &file(&short)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("shorter than"), "{e}");

    // A directory, a symbolic link, a missing directory on the path.
    let e = other.create_section("x", 4 << 20, &file(&dir)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    assert!(e.to_string().contains("directory"), "{e}");
    let link = dir.join("link");
    std::os::unix::fs::symlink(&short, &link).unwrap();
    let e = other.create_section("x", 4 << 20, &file(&link)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    assert!(e.to_string().contains("symbolic link"), "{e}");
    let e = other.create_section("x", 4 << 20, &file(&dir.join("no/such/file"))).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");

    // Another user's file (only root can make one to test with).
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let theirs = dir.join("theirs");
        std::fs::write(&theirs, vec![0u8; 8192]).unwrap();
        std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
        let e = other.create_section("x", 4 << 20, &file(&theirs)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
        let _ = std::fs::remove_file(&theirs);
    } else {
        eprintln!("skipped the other-owner case: making another user's file needs root");
    }
    assert!(other.sections().is_empty(), "no failed attempt left a section behind");
    other.detach().unwrap();
    assert_clean(&name);
    assert_clean(&other_name);
    for p in [&short, &link] {
        let _ = std::fs::remove_file(p);
    }
    cleanup(&path);
}

#[test]
fn committing_a_file_section_on_a_full_filesystem_is_out_of_space_not_sigbus() {
    const TEST: &str = "committing_a_file_section_on_a_full_filesystem_is_out_of_space_not_sigbus";
    match role().as_deref() {
        Some("grower") => {
            let d = Domain::attach_with(&child_domain(), &at(0x3e00_0000_0000)).unwrap();
            let s = d.create_section("big", 32 << 20, &SectionOptions::new().file(env_path())).unwrap();
            s.commit(4096).unwrap();
            // SAFETY: the first page is committed.
            unsafe { s.as_ptr().write_bytes(0xab, 4096) };
            let e = s.commit(16 << 20).unwrap_err();
            println!("KIND={:?}", e.kind());
            // SAFETY: still mapped and committed.
            println!("BYTE={:#x}", unsafe { s.as_ptr().add(4095).read() });
            drop(s);
            d.delete_section("big").unwrap();
            d.detach().unwrap();
        }
        _ => {
            let Some(fs) = Tmpfs::mount("fs-full", "size=4m") else { return };
            let mnt = fs.path.clone();
            let file = mnt.join("grow.shmg");
            let name = unique_domain("fsf");
            // `run` fails the test if the child dies (a SIGBUS would).
            let r = run(TEST, "grower", &name, &[("FILE", file.display().to_string())]);
            drop(fs);
            assert_eq!(r["KIND"], "OutOfSpace", "{r:?}");
            assert_eq!(r["BYTE"], "0xab", "committed data intact");
            assert_clean(&name);
        }
    }
}

#[test]
fn a_first_touch_of_a_file_section_not_opened_here_maps_it_from_its_file_after_the_same_checks() {
    const TEST: &str = "a_first_touch_of_a_file_section_not_opened_here_maps_it_from_its_file_after_the_same_checks";
    const BASE: u64 = 0x3f40_0000_0000;
    match role().as_deref() {
        Some("toucher") => {
            let _d = Domain::attach_with(&child_domain(), &at(BASE)).unwrap();
            let addr: usize = std::env::var("ADDR").unwrap().parse().unwrap();
            if std::env::var_os("OTHER_THREAD").is_some() {
                // A thread that never attached has only Rust's small signal stack: the handler
                // reports instead of following the link (in a debug build at least).
                let v = std::thread::spawn(move || {
                    // SAFETY: inside the section (see above).
                    unsafe { (addr as *const u64).read_volatile() }
                })
                .join()
                .unwrap();
                println!("READ={v:#x}");
                return;
            }
            // SAFETY: inside the file-backed section; the first touch maps it (or, in the
            // damaged case, the handler reports and the process dies).
            let v = unsafe { (addr as *const u64).read_volatile() };
            // SAFETY: as above, now mapped.
            unsafe { (addr as *mut u64).add(1).write_volatile(v + 1) };
            println!("READ={v:#x}");
            println!("MAPS={}", shmgadget::first_touch_maps());
        }
        _ => {
            let path = file_path("touch");
            let name = unique_domain("fst");
            let d = Domain::attach_with(&name, &at(BASE)).unwrap();
            let s = d.create_section("data", 1 << 20, &SectionOptions::new().file(&path)).unwrap();
            s.commit(4096).unwrap();
            // SAFETY: inside the committed section.
            unsafe { s.as_ptr().cast::<u64>().write_volatile(0xf11e) };
            let spawn_with = |other_thread: bool| {
                let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
                if other_thread {
                    cmd.env("OTHER_THREAD", "1");
                }
                let mut child = cmd
                    .args([TEST, "--exact", "--nocapture", "--test-threads=1", "-q"])
                    .env(ROLE, "toucher")
                    .env(DOMAIN, &name)
                    .env("ADDR", (s.as_ptr() as usize).to_string())
                    .env_remove("SHMGADGET_EAGER")
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap();
                let (so, se) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
                let so = std::thread::spawn(move || std::io::read_to_string(so).unwrap_or_default());
                let se = std::thread::spawn(move || std::io::read_to_string(se).unwrap_or_default());
                let status = wait(&mut child, std::time::Duration::from_secs(60));
                (status, so.join().unwrap(), se.join().unwrap())
            };
            let spawn = || spawn_with(false);
            if cfg!(debug_assertions) {
                use std::os::unix::process::ExitStatusExt;
                let (status, out, err) = spawn_with(true);
                assert_eq!(status.signal(), Some(libc::SIGSEGV), "{status:?}\n{out}\n{err}");
                assert!(err.contains("signal stack has only"), "a clear report, not a crash in the handler: {err}");
            }
            let (status, out, err) = spawn();
            assert!(status.success(), "{status:?}\n{out}\n{err}");
            assert!(out.contains("READ=0xf11e") && out.contains("MAPS=1"), "mapped on first touch: {out}\n{err}");
            // SAFETY: inside the section; the child has exited.
            assert_eq!(unsafe { s.as_ptr().cast::<u64>().add(1).read_volatile() }, 0xf11f, "its write is shared");
            let on_disk = std::fs::read(&path).unwrap();
            assert_eq!(u64::from_le_bytes(on_disk[4096 + 8..4096 + 16].try_into().unwrap()), 0xf11f, "in the file");

            // The handler checks the file as an open does: a header that no longer records
            // this address is refused (reported, then the fault goes on), not mapped.
            {
                use std::os::unix::fs::FileExt;
                let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
                f.write_all_at(&0x1000u64.to_le_bytes(), 16).unwrap();
            }
            let (status, out, err) = spawn();
            use std::os::unix::process::ExitStatusExt;
            assert_eq!(status.signal(), Some(libc::SIGSEGV), "{status:?}\n{out}\n{err}");
            assert!(err.contains("does not record this address and size"), "{err}");
            drop(s);
            d.delete_section("data").unwrap();
            d.detach().unwrap();
            assert_clean(&name);
            cleanup(&path);
        }
    }
}
