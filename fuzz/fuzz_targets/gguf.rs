//! Feeds arbitrary bytes to the GGUF reader and everything that reads a parsed
//! file's metadata and tensors: none of it may panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    embody_engine::fuzzing::gguf(data);
});
