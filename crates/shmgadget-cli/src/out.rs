//! Writing to stdout and stderr without panicking on a closed pipe.
//!
//! `println!` panics when stdout is a pipe whose reader has gone (`shmgadget ls | head -1`).
//! Unix tools stop writing quietly instead; so do we: the first failed write to stdout with
//! `BrokenPipe` sets [`STDOUT_CLOSED`], every later line is dropped, and the command carries on
//! to its normal end (so it still detaches and cleans up) and exits with its normal status.
//! Any other write error is reported once on stderr and makes the exit status 1. Writes to a
//! closed stderr are dropped silently: there is nowhere left to say so.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

/// Set once a write to stdout failed (broken pipe or otherwise): later output is dropped.
static STDOUT_CLOSED: AtomicBool = AtomicBool::new(false);
/// Set when a write to stdout failed for a reason other than a closed pipe.
static STDOUT_FAILED: AtomicBool = AtomicBool::new(false);

/// Writes one line to stdout (see the module comment for what happens on a closed pipe).
pub fn line(args: std::fmt::Arguments<'_>) {
    // Relaxed: a flag only this process's threads read and write; no data hangs off it.
    if STDOUT_CLOSED.load(Ordering::Relaxed) {
        return;
    }
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.write_all(b"\n")).and_then(|()| out.flush()) {
        STDOUT_CLOSED.store(true, Ordering::Relaxed);
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            STDOUT_FAILED.store(true, Ordering::Relaxed);
            err_line(format_args!("shmgadget: cannot write to stdout: {e}"));
        }
    }
}

/// Writes one line to stderr, dropping it if stderr is closed.
pub fn err_line(args: std::fmt::Arguments<'_>) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_fmt(args).and_then(|()| err.write_all(b"\n"));
}

/// Whether a write to stdout failed for a reason other than a closed pipe (exit status 1).
pub fn failed() -> bool {
    STDOUT_FAILED.load(Ordering::Relaxed)
}

/// `println!` that never panics: see [`line`].
macro_rules! outln {
    () => { $crate::out::line(format_args!("")) };
    ($($arg:tt)*) => { $crate::out::line(format_args!($($arg)*)) };
}

/// `eprintln!` that never panics: see [`err_line`].
macro_rules! errln {
    ($($arg:tt)*) => { $crate::out::err_line(format_args!($($arg)*)) };
}

pub(crate) use {errln, outln};
