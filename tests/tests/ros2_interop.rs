//! embodyd as a ROS 2 node, checked from a real peer: `tests/python/ros2_interop.py`
//! (eclipse-zenoh and rosbags) publishes rosbags-serialized images and
//! prompts on rmw_zenoh's keys with its attachment, reads the answer back as
//! a `std_msgs/msg/String`, and reads embodyd's liveliness tokens as the ROS
//! graph would. The type hashes the peer uses are computed by rosbags; here
//! they are compared with the constants embodyd holds.

use embody_robot_adapters::ros2::msgs::{COMPRESSED_IMAGE, IMAGE, STRING};
use embody_tests::{
    free_port, repo_root, test_config, test_python, write_tiny_model, Daemon, TempDir,
};

#[test]
fn a_rosbags_peer_sends_images_and_prompts_and_reads_the_answer() {
    let models = TempDir::new("ros2-tiny");
    let model = write_tiny_model(models.path());
    let port = free_port();
    let config = test_config(
        &model,
        &format!(
            r#"[zenoh]
listen = ["tcp/127.0.0.1:{port}"]
connect = []
node = "ri"

[ros2]
max_tokens = 6

[[cameras]]
name = "front"
key = "/camera/image_raw"
format = "ros2_image"

[[cameras]]
name = "front_c"
key = "/camera/compressed"
format = "ros2_compressed_image"

[[tasks]]
name = "front"
camera = "front"
prompt = "What is in front?"
period_ms = 300
ros2_topic = "/embodyd/front_task"
"#
        ),
    );
    let d = Daemon::start(&config);
    // coreutils' timeout: a peer waiting for a message that never comes fails
    // the test instead of hanging it.
    let out = std::process::Command::new("timeout")
        .arg("120")
        .arg(test_python())
        .arg(repo_root().join("tests/python/ros2_interop.py"))
        .arg(format!("tcp/127.0.0.1:{port}"))
        .output()
        .expect("running the Python peer");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the ROS 2 peer failed:\n{stdout}\n{}\n--- embodyd log ---\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.log()
    );
    let seen: serde_json::Value = serde_json::from_str(stdout.trim()).expect("the peer's JSON");
    for ty in [STRING, IMAGE, COMPRESSED_IMAGE] {
        assert_eq!(
            seen["hashes"][ty.name].as_str(),
            Some(ty.hash),
            "rosbags' RIHS01 hash of {}",
            ty.name
        );
    }
    let log = d.log();
    assert!(
        log.contains("malformed std_msgs/msg/String on /embodyd/prompt")
            && log.contains("camera frame refused: malformed sensor_msgs/msg/Image"),
        "{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
    // Its prompts are counted in /metrics.
    assert!(d.requests_total("ros2", "ok") >= 1);
}
