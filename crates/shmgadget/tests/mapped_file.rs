//! Data files mapped at the address they record (issue 16, the base of file-backed
//! sections), across real processes.
#![cfg(unix)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use shmgadget::{ErrorKind, FlushMode, MappedFile};

const PAGE: usize = 4096;

fn file_path(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("shmg-mf-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("data.shmg")
}

fn cleanup(path: &Path) {
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_dir(path.parent().unwrap());
}

fn path_env() -> PathBuf {
    PathBuf::from(std::env::var("FILE").unwrap())
}

/// A node of the linked list: a value and a raw pointer to the next node (null at the end).
#[repr(C)]
struct Node {
    value: u64,
    next: *mut Node,
}

#[test]
fn a_pointer_linked_list_built_in_a_file_is_walked_by_a_later_process_after_the_builder_is_gone() {
    const TEST: &str = "a_pointer_linked_list_built_in_a_file_is_walked_by_a_later_process_after_the_builder_is_gone";
    const BASE: usize = 0x3100_0000_0000;
    const N: u64 = 10_000;
    match role().as_deref() {
        Some("builder") => {
            let mut f = MappedFile::create(&path_env(), BASE, 64 << 20, 0).unwrap();
            f.commit(N * 16 + 16).unwrap();
            let nodes = f.as_ptr().cast::<Node>();
            // Built back to front, scattered: node i lives at slot (i * 7919) % N.
            let mut next: *mut Node = std::ptr::null_mut();
            for i in (0..N).rev() {
                let slot = (i * 7919) % N;
                // SAFETY: slot < N and the first N * 16 bytes are committed and mapped; nothing
                // else uses the file.
                unsafe {
                    let n = nodes.add(slot as usize);
                    n.write(Node { value: i * 3, next });
                    next = n;
                }
            }
            // The head pointer goes at the end of the node array.
            // SAFETY: inside the committed data, after the nodes.
            unsafe { nodes.add(N as usize).cast::<*mut Node>().write(next) };
            f.flush(0, f.len() as u64, FlushMode::Sync).unwrap();
            println!("HEAD={:#x}", next as usize);
        }
        Some("walker") => {
            let f = MappedFile::open(&path_env()).unwrap();
            assert_eq!(f.as_ptr() as usize, BASE, "placed at the recorded address");
            // SAFETY: the head pointer the builder wrote after the nodes.
            let mut p = unsafe { f.as_ptr().cast::<Node>().add(N as usize).cast::<*mut Node>().read() };
            let (mut count, mut sum) = (0u64, 0u64);
            while !p.is_null() {
                // SAFETY: every pointer in the list was written by the builder and points at a
                // node inside the data, mapped at the same address here.
                let n = unsafe { &*p };
                sum += n.value;
                count += 1;
                p = n.next;
            }
            println!("COUNT={count}");
            println!("SUM={sum}");
        }
        _ => {
            let path = file_path("list");
            let env = [("FILE", path.display().to_string())];
            let built = run(TEST, "builder", "unused", &env);
            assert!(built["HEAD"].starts_with("0x31"), "{built:?}");
            let walked = run(TEST, "walker", "unused", &env);
            assert_eq!(walked["COUNT"], N.to_string());
            assert_eq!(walked["SUM"], (3 * N * (N - 1) / 2).to_string());
            cleanup(&path);
        }
    }
}

#[test]
fn bytes_flushed_synchronously_are_in_the_file_when_the_writer_is_killed_at_once() {
    const TEST: &str = "bytes_flushed_synchronously_are_in_the_file_when_the_writer_is_killed_at_once";
    match role().as_deref() {
        Some("writer") => {
            let f = MappedFile::create(&path_env(), 0x3200_0000_0000, 1 << 20, 3 * PAGE as u64).unwrap();
            // SAFETY: inside the committed data; nobody else uses the file.
            unsafe { f.as_ptr().add(PAGE + 5).copy_from_nonoverlapping(b"durable!".as_ptr(), 8) };
            f.flush(PAGE as u64 + 5, 8, FlushMode::Sync).unwrap();
            println!("FLUSHED");
            loop {
                std::thread::sleep(Duration::from_secs(60));
            }
        }
        _ => {
            let path = file_path("flush");
            let mut child = spawn(TEST, "writer", "unused", &[("FILE", path.display().to_string())]);
            wait_for_line(&mut child, "FLUSHED");
            kill9(&mut child);
            // A plain read of the file from disk: data starts after the header page.
            let bytes = std::fs::read(&path).unwrap();
            assert_eq!(bytes.len(), 4 * PAGE, "header page + three data pages");
            assert_eq!(&bytes[PAGE + PAGE + 5..PAGE + PAGE + 13], b"durable!");
            assert_eq!(&bytes[..8], b"SHMGFILE");
            // The kernel released the dead writer's lock: the file opens again.
            let f = MappedFile::open(&path).unwrap();
            assert_eq!(f.as_ptr() as usize, 0x3200_0000_0000);
            let q = shmgadget::query(f.as_ptr() as usize + PAGE + 5);
            assert_eq!(q.place, shmgadget::Place::MappedFile);
            assert_eq!((q.offset, q.file.as_deref()), (Some(PAGE as u64 + 5), Some(path.to_str().unwrap())));
            assert_eq!((q.mapped, q.protection), (Some(true), Some("read_write")));
            let q = shmgadget::query(f.as_ptr() as usize + 4 * PAGE);
            assert_eq!((q.place, q.mapped), (shmgadget::Place::MappedFile, Some(false)), "reserved beyond the data");
            drop(f);
            cleanup(&path);
        }
    }
}

#[test]
fn a_file_open_in_another_live_process_is_refused_until_that_process_is_gone() {
    const TEST: &str = "a_file_open_in_another_live_process_is_refused_until_that_process_is_gone";
    match role().as_deref() {
        Some("holder") => {
            let _f = MappedFile::open(&path_env()).unwrap();
            println!("HOLDING");
            loop {
                std::thread::sleep(Duration::from_secs(60));
            }
        }
        _ => {
            let path = file_path("busy");
            drop(MappedFile::create(&path, 0x3300_0000_0000, 1 << 20, PAGE as u64).unwrap());
            let mut child = spawn(TEST, "holder", "unused", &[("FILE", path.display().to_string())]);
            wait_for_line(&mut child, "HOLDING");
            let e = MappedFile::open(&path).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::WouldBlock);
            assert!(e.to_string().contains("is mapped by another live handle"), "{e}");
            kill9(&mut child);
            let f = MappedFile::open(&path).unwrap();
            let e = MappedFile::open(&path).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::WouldBlock, "a second handle in the same process is refused too");
            drop(f);
            cleanup(&path);
        }
    }
}

#[test]
fn a_file_whose_recorded_range_is_taken_fails_naming_the_occupant_and_is_never_placed_elsewhere() {
    const TEST: &str = "a_file_whose_recorded_range_is_taken_fails_naming_the_occupant_and_is_never_placed_elsewhere";
    const BASE: usize = 0x3400_0000_0000;
    match role().as_deref() {
        Some("maker") => {
            drop(MappedFile::create(&path_env(), BASE + PAGE * 4, 1 << 20, PAGE as u64).unwrap());
        }
        _ => {
            let first = file_path("taken-a");
            let second = file_path("taken-b");
            // This process maps `first` over the range `second` will record.
            let f = MappedFile::create(&first, BASE, 1 << 20, PAGE as u64).unwrap();
            run(TEST, "maker", "unused", &[("FILE", second.display().to_string())]);
            let e = MappedFile::open(&second).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::WindowUnavailable);
            let msg = e.to_string();
            assert!(msg.contains("cannot map") && msg.contains("at its recorded address 0x340000004000"), "{msg}");
            assert!(msg.contains(&first.display().to_string()), "names the occupant: {msg}");
            assert!(msg.contains("never mapped elsewhere"), "{msg}");
            drop(f);
            let g = MappedFile::open(&second).unwrap();
            assert_eq!(g.as_ptr() as usize, BASE + PAGE * 4, "once free, the recorded address");
            drop(g);
            cleanup(&first);
            cleanup(&second);
        }
    }
}

#[test]
fn bad_paths_and_damaged_files_are_refused_with_what_is_wrong() {
    let path = file_path("bad");
    let dir = path.parent().unwrap().to_path_buf();
    let kind_msg = |r: shmgadget::Result<MappedFile>| {
        let e = r.unwrap_err();
        (e.kind(), e.to_string())
    };

    let (k, m) = kind_msg(MappedFile::open(&dir.join("missing")));
    assert_eq!(k, ErrorKind::NotFound, "{m}");
    assert!(m.contains("does not exist"), "{m}");

    let (k, m) = kind_msg(MappedFile::open(&dir));
    assert_eq!(k, ErrorKind::InvalidArgument, "{m}");
    assert!(m.contains("is a directory"), "{m}");

    drop(MappedFile::create(&path, 0x3500_0000_0000, 1 << 20, PAGE as u64).unwrap());
    let link = dir.join("link");
    std::os::unix::fs::symlink(&path, &link).unwrap();
    let (k, m) = kind_msg(MappedFile::open(&link));
    assert_eq!(k, ErrorKind::InvalidArgument, "{m}");
    assert!(m.contains("is a symbolic link, refused"), "{m}");
    std::fs::remove_file(&link).unwrap();

    let (k, m) = kind_msg(MappedFile::create(&path, 0x3500_0000_0000, 1 << 20, 0));
    assert_eq!(k, ErrorKind::AlreadyExists, "{m}");

    let short = dir.join("short");
    std::fs::write(&short, [0u8; 100]).unwrap();
    let (k, m) = kind_msg(MappedFile::open(&short));
    assert_eq!(k, ErrorKind::Corrupt, "{m}");
    assert!(m.contains("shorter than its 4096-byte header page"), "{m}");
    std::fs::remove_file(&short).unwrap();

    // A damaged header: one byte of the recorded address changed.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[17] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let (k, m) = kind_msg(MappedFile::open(&path));
    assert_eq!(k, ErrorKind::Corrupt, "{m}");
    assert!(m.contains("damaged or foreign header") && m.contains("checksum"), "{m}");
    bytes[17] ^= 1;
    // Data no longer whole pages: truncated by something else.
    bytes.truncate(PAGE + 100);
    std::fs::write(&path, &bytes).unwrap();
    let (k, m) = kind_msg(MappedFile::open(&path));
    assert_eq!(k, ErrorKind::Corrupt, "{m}");
    assert!(m.contains("truncated or extended by something else"), "{m}");

    let (k, m) = kind_msg(MappedFile::create(&dir.join("odd"), 0x3500_0000_0001, 1 << 20, 0));
    assert_eq!(k, ErrorKind::InvalidArgument, "{m}");
    assert!(!dir.join("odd").exists(), "a refused create leaves no file");

    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let theirs = dir.join("theirs");
        drop(MappedFile::create(&theirs, 0x3500_0000_0000, 1 << 20, 0).unwrap());
        std::os::unix::fs::chown(&theirs, Some(65534), None).unwrap();
        let (k, m) = kind_msg(MappedFile::open(&theirs));
        assert_eq!(k, ErrorKind::PermissionDenied, "{m}");
        assert!(m.contains("belongs to uid 65534"), "{m}");
        std::fs::remove_file(&theirs).unwrap();
    } else {
        eprintln!("skipped the other-owner case: chown needs root");
    }
    cleanup(&path);
}

#[test]
fn growing_a_file_on_a_full_filesystem_is_out_of_space_and_never_a_sigbus() {
    const TEST: &str = "growing_a_file_on_a_full_filesystem_is_out_of_space_and_never_a_sigbus";
    match role().as_deref() {
        Some("grower") => {
            let mut f = MappedFile::create(&path_env(), 0x3600_0000_0000, 64 << 20, PAGE as u64).unwrap();
            // SAFETY: the first data page is committed.
            unsafe { f.as_ptr().write_bytes(0xab, PAGE) };
            let e = f.commit(32 << 20).unwrap_err();
            println!("KIND={:?}", e.kind());
            println!("MSG={e}");
            println!("LEN={}", f.len());
            // SAFETY: still mapped and committed.
            println!("BYTE={:#x}", unsafe { f.as_ptr().add(PAGE - 1).read() });
            println!("FILE={}", std::fs::metadata(path_env()).unwrap().len());
        }
        _ => {
            let Some(fs) = Tmpfs::mount("mf-full", "size=4m") else { return };
            let mnt = fs.path.clone();
            let file = mnt.join("grow.shmg");
            // `run` fails the test if the child dies (a SIGBUS would).
            let r = run(TEST, "grower", "unused", &[("FILE", file.display().to_string())]);
            drop(fs);
            assert_eq!(r["KIND"], "OutOfSpace", "{r:?}");
            assert!(r["MSG"].contains("filesystem is full"), "{r:?}");
            assert_eq!(r["LEN"], PAGE.to_string(), "the mapping is as it was");
            assert_eq!(r["BYTE"], "0xab", "committed data intact");
            assert_eq!(r["FILE"], (2 * PAGE).to_string(), "the file is as long as it was");
        }
    }
}
