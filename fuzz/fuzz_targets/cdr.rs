//! Feeds arbitrary bytes to the ROS 2 message readers (std_msgs/String,
//! sensor_msgs/Image, sensor_msgs/CompressedImage) that run on every CDR
//! message embodyd receives; whatever reads back must write back equal.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    embody_robot_adapters::ros2::msgs::exercise(data);
});
