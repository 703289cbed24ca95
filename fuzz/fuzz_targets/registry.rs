//! A domain registry over arbitrary bytes, through the validating parse on private memory.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| shmgadget::fuzzing::registry(data));
