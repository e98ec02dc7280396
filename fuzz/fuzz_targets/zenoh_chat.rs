//! Feeds arbitrary payloads to the zenoh chat request reader (the `chat`
//! queryable and the requests topic).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    embody_robot_adapters::chat::exercise(data);
});
