//! Feeds arbitrary bytes to the image decoder and the vision preprocessing
//! that every image a request sends goes through.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    embody_engine::fuzzing::image(data);
});
