//! The slot-queue target: a queue over arbitrary header and ring bytes (see shmgadget::fuzzing).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| shmgadget::fuzzing::queue_slots(data));
