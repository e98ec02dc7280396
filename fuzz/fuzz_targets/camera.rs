//! Feeds arbitrary camera messages (raw pixels, JPEG, PNG, ROS 2 Image and
//! CompressedImage) to the decoding every camera frame goes through.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    embody_robot_adapters::camera::decode::exercise(data);
});
