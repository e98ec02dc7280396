//! Renders arbitrary messages and tools (JSON) with the chat templates of the
//! test models, as every chat request is rendered.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    embody_engine::fuzzing::chat_template(data);
});
