//! Speculative decoding by prompt lookup in the real daemon: one SmolLM2 file
//! served twice, with drafts and without, must answer every request the same
//! (greedy, seeded sampling, a JSON schema with logprobs, concurrent
//! requests), and the drafted copy must need fewer forward passes than
//! tokens on an answer that repeats its prompt
//! (tests/python/speculative.py holds the checks, with the `openai` client).

use embody_tests::{smollm2, test_config, Daemon};

#[test]
fn drafts_change_the_speed_and_nothing_else() {
    let path = smollm2();
    let config = test_config(
        &path,
        &format!(
            "[http]\nbind = \"127.0.0.1:0\"\n\n\
             [[models]]\nname = \"drafted\"\npath = \"{0}\"\ndraft_tokens = 8\n\n\
             [[models]]\nname = \"plain\"\npath = \"{0}\"\ndraft_tokens = 0\n",
            path.display()
        ),
    );
    let mut d = Daemon::start(&config);
    let stdout = d.python_checks("speculative.py", &[&d.http_url()]);
    eprintln!("{stdout}");
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("ok ")).count(),
        4,
        "{stdout}"
    );
    d.signal(libc::SIGTERM);
    let status = d
        .wait_exit(std::time::Duration::from_secs(30))
        .expect("embodyd exits");
    assert!(status.success(), "{status}\n{}", d.log());
}
