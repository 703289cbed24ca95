//! The Windows backend across real processes (issue 15), run under Wine in CI (`.ci/windows`):
//! the test binary is started again as children, as the Linux tests do. Tests that need what
//! Wine lacks are skipped there with a printed reason.
#![cfg(windows)]

mod win;

use std::time::Duration;

use shmgadget::{Domain, SectionOptions};
use win::*;

const MIB: u64 = 1 << 20;
/// Window of the test domains: small, because Wine reserves it in 64 MiB pieces per process.
const WINDOW: u64 = 256 * MIB;

/// A node of a pointer-linked list that lives in a section: `next` is an absolute address,
/// valid in every process because the section is at the same address everywhere.
#[repr(C)]
struct Node {
    value: u64,
    next: *const Node,
}

#[test]
fn two_processes_same_address_linked_list_explicit_open_and_first_touch() {
    const TEST: &str = "two_processes_same_address_linked_list_explicit_open_and_first_touch";
    match role().as_deref() {
        Some("open") => {
            let d = Domain::attach_with(&child_domain(), &small(WINDOW)).unwrap();
            let s = d.open_section("list").unwrap();
            println!("ADDR={:#x}", s.as_ptr() as usize);
            let mut p = s.as_ptr() as *const Node;
            let mut sum = 0;
            while !p.is_null() {
                // SAFETY: the parent built the list inside the section and does not change it.
                unsafe {
                    sum += (*p).value;
                    p = (*p).next;
                }
            }
            println!("SUM={sum}");
        }
        Some("touch") => {
            let d = Domain::attach_with(&child_domain(), &small(WINDOW)).unwrap();
            // No open: the first read faults, the vectored handler maps the section.
            let mut p = addr_env() as *const Node;
            let mut sum = 0;
            while !p.is_null() {
                // SAFETY: as above; the section is mapped by the fault handler on first touch.
                unsafe {
                    sum += (*p).value;
                    p = (*p).next;
                }
            }
            // Write back through the pointer: the parent sees it.
            // SAFETY: the first node, in a live section; the parent reads it after we exit.
            unsafe { (*(addr_env() as *mut Node)).value += 1000 };
            println!("SUM={sum}");
            println!("MAPS={}", shmgadget::first_touch_maps());
            drop(d);
        }
        _ => {
            let domain = unique_domain("list");
            let d = Domain::attach_with(&domain, &small(WINDOW)).unwrap();
            let s = d.create_section("list", MIB, &SectionOptions::new().transient()).unwrap();
            let base = s.as_ptr() as *mut Node;
            for i in 0..100usize {
                // SAFETY: 100 nodes of 16 bytes inside our fresh 1 MiB section.
                unsafe {
                    let next = if i == 99 { std::ptr::null() } else { base.add(i + 1) as *const Node };
                    base.add(i).write(Node { value: i as u64 + 1, next });
                }
            }
            let r = run(TEST, "open", &domain, &[]);
            assert_eq!(r["ADDR"], format!("{:#x}", base as usize), "same address in both processes");
            assert_eq!(r["SUM"], "5050");
            let r = run(TEST, "touch", &domain, &[("ADDR", format!("{:#x}", base as usize))]);
            assert_eq!(r["SUM"], "5050");
            assert_eq!(r["MAPS"], "1", "exactly one first-touch mapping");
            // SAFETY: the child wrote the first node's value before exiting.
            assert_eq!(unsafe { (*base).value }, 1001);
            drop(s);
            d.detach().unwrap();
            assert_clean(&domain);
        }
    }
}

#[test]
fn wine_is_detected_at_run_time() {
    // Not a behaviour test: prints where the suite runs, so the log says which tests skip.
    eprintln!("running under Wine: {}", under_wine());
    let _ = Duration::ZERO;
}
