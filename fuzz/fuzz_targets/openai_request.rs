//! Feeds arbitrary bytes to the OpenAI request parser and the conversion to
//! the protocol's Request that the HTTP server and the zenoh `chat`
//! queryable run on every body.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    embody_protocol::openai::exercise(data);
});
