//! Hugging Face folders: config.json, a zero byte, then a safetensors file.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    embody_engine::fuzzing::hf(data);
});
