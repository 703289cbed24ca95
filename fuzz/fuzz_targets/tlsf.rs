//! The TLSF allocator over arbitrary control-block and block-area bytes.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| shmgadget::fuzzing::tlsf(data));
