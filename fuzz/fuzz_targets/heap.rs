//! A whole heap section image (control block, block chain, named-object table, cache slots
//! and stores) through the code `Heap` and the CLI run on it.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| shmgadget::fuzzing::heap(data));
