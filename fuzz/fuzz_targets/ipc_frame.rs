//! Feeds arbitrary bytes to the IPC frame decoder the daemon runs on every
//! connection; any frame it accepts must re-encode to the same frame.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    embody_protocol::wire::exercise(data);
});
