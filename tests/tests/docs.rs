//! Docs that are written from a source of truth stay in step with it.

use embody_tests::repo_root;

/// docs/configuration.md is `scripts/config-doc.py`'s rendering of the
/// comments in configs/default.toml: a field added to the config without a
/// fresh doc fails here.
#[test]
fn the_configuration_doc_is_written_from_the_default_config() {
    let out = std::process::Command::new("python3")
        .arg(repo_root().join("scripts/config-doc.py"))
        .arg("--check")
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc = std::fs::read_to_string(repo_root().join("docs/configuration.md")).unwrap();
    let config: toml::Table = std::fs::read_to_string(repo_root().join("configs/default.toml"))
        .unwrap()
        .parse()
        .unwrap();
    for (section, fields) in &config {
        let fields = fields.as_table().expect("a section");
        assert!(doc.contains(&format!("## [{section}]")), "[{section}]");
        for name in fields.keys() {
            assert!(
                doc.contains(&format!("| `{name}` |")),
                "{section}.{name} is not in docs/configuration.md"
            );
        }
    }
}
