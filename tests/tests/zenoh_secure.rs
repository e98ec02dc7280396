//! The shipped hardened zenoh configuration (`configs/zenoh-secure.json5`)
//! on the real daemon, driven by the Python zenoh client: logins, and access
//! control that stops an impostor queryable, a snoop on the response topics
//! and a forged event (`tests/python/zenoh_secure.py` says what it checks).

use embody_tests::{free_port, repo_root, test_config, write_tiny_model, Daemon, TempDir};

#[test]
fn the_secure_configuration_refuses_impostors_snoops_and_forgers() {
    let dir = TempDir::new("embodyd-zenoh-secure");
    let users = dir.path().join("zenoh-users.txt");
    std::fs::write(&users, "robot:robot-pw\nplanner:planner-pw\n").unwrap();
    let shipped = std::fs::read_to_string(repo_root().join("configs/zenoh-secure.json5")).unwrap();
    assert!(shipped.contains("/etc/embodyd/zenoh-users.txt"));
    let secure = dir.path().join("zenoh-secure.json5");
    std::fs::write(
        &secure,
        shipped.replace("/etc/embodyd/zenoh-users.txt", users.to_str().unwrap()),
    )
    .unwrap();
    let port = free_port();
    let model = write_tiny_model(dir.path());
    let config = test_config(
        &model,
        &format!(
            "[zenoh]\nmode = \"router\"\nlisten = [\"tcp/127.0.0.1:{port}\"]\nconnect = []\nnode = \"sec\"\nconfig_file = \"{}\"\n\n[ros2]\nenabled = false\n",
            secure.display()
        ),
    );
    let d = Daemon::start(&config);
    let endpoint = format!("tcp/127.0.0.1:{port}");
    let out = d.python_checks(
        "zenoh_secure.py",
        &[&endpoint, "embody/sec", users.to_str().unwrap()],
    );
    let seen: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(seen["impostor_asked"], 0, "{seen}");
    assert_eq!(seen["snooped"], 0, "{seen}");
}
