//! Feeds arbitrary text to the tokenizer (special parsing on and off) and,
//! as a user message, through the guard that keeps control-token text in
//! messages from becoming control tokens.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    embody_engine::fuzzing::tokenizer(data);
});
