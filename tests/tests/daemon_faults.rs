//! Fault tolerance of the real `embodyd`: the decoder is killed (a panic on
//! its thread, injected through the socket) while requests stream, twenty
//! times in a row. Every request it held must end with an error event, none
//! may hang, queued requests must complete after the restart, and status
//! must answer within a second of each restart.

use std::time::{Duration, Instant};

use embody_client::{Client, ErrorCode, Event, Fault, FinishReason, Request, SamplingParams};
use embody_tests::{smollm2, test_config, Daemon};

fn greedy(text: &str, max_tokens: u32) -> Request {
    Request::user(text)
        .max_tokens(max_tokens)
        .sampling(SamplingParams::greedy())
}

async fn next(s: &mut embody_client::ChatStream) -> Event {
    tokio::time::timeout(Duration::from_secs(120), s.next())
        .await
        .expect("an event within 120 s: a request hangs")
        .expect("the stream has not ended")
}

async fn terminal(s: &mut embody_client::ChatStream) -> Event {
    loop {
        let ev = next(s).await;
        if ev.is_terminal() {
            assert!(
                s.next().await.is_none(),
                "nothing follows the terminal event"
            );
            return ev;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_decoder_killed_mid_stream_twenty_times() {
    let config = test_config(
        &smollm2(),
        "[decoder]\nmax_running = 2\n\n[supervisor]\nrestart_backoff_ms = 50\n\n[testing]\nfault_injection = true\n",
    );
    let d = Daemon::start(&config);
    let client = Client::connect(&d.socket).await.unwrap();
    let started = Instant::now();
    let mut worst_status = Duration::ZERO;
    for round in 1..=20u64 {
        // Two requests stream (both slots), two wait in the queue.
        let mut running = Vec::new();
        for q in [
            "Describe a robot arm in detail.",
            "Describe a mobile robot in detail.",
        ] {
            running.push(client.chat(greedy(q, 400)).await.unwrap());
        }
        for s in &mut running {
            while !matches!(next(s).await, Event::Delta { .. }) {}
        }
        let mut queued = Vec::new();
        for q in ["Say yes.", "Say no."] {
            queued.push(client.chat(greedy(q, 3)).await.unwrap());
        }
        // Admission is asynchronous: wait until the daemon holds both in its queue.
        let asked = Instant::now();
        loop {
            let st = embody_tests::status(&d.socket).unwrap();
            if (st.running, st.queued) == (2, 2) {
                break;
            }
            assert!(
                asked.elapsed() < Duration::from_secs(10),
                "round {round}: {st:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        client.inject_fault(Fault::PanicDecoder).await.unwrap();
        for s in &mut running {
            match terminal(s).await {
                Event::Error { code, message } => {
                    assert_eq!(
                        code,
                        ErrorCode::DecoderRestarted,
                        "round {round}: {message}"
                    );
                    assert!(message.contains("fault injection"), "{message}");
                }
                other => panic!("round {round}: an in-flight request ended with {other:?}"),
            }
        }
        // Status answers within a second of the crash, while the decoder restarts.
        let asked = Instant::now();
        let st = tokio::time::timeout(Duration::from_secs(1), client.status())
            .await
            .unwrap_or_else(|_| panic!("round {round}: status took more than a second"))
            .unwrap();
        worst_status = worst_status.max(asked.elapsed());
        assert_eq!(st.decoder_restarts, round, "round {round}: {st:?}");
        // The queued requests survive and are served by the new decoder.
        for s in &mut queued {
            match terminal(s).await {
                Event::Finished { reason, usage } => {
                    assert_ne!(reason, FinishReason::Cancelled);
                    assert!(usage.completion_tokens >= 1, "round {round}");
                }
                other => panic!("round {round}: a queued request ended with {other:?}"),
            }
        }
    }
    let st = embody_tests::status(&d.socket).unwrap();
    assert!(st.ready && st.healthy, "{st:?}");
    assert_eq!(
        (st.decoder_restarts, st.running, st.queued),
        (20, 0, 0),
        "{st:?}"
    );
    // The log tells each failure.
    let log = d.log();
    assert_eq!(log.matches("panicked at").count(), 20, "{log}");
    assert_eq!(log.matches("decoder thread failed").count(), 20, "{log}");
    assert_eq!(log.matches("restarted child=Decoder").count(), 20, "{log}");
    // And the daemon serves as before.
    let mut s = client.chat(greedy("Name a color.", 4)).await.unwrap();
    assert!(matches!(terminal(&mut s).await, Event::Finished { .. }));
    eprintln!(
        "20 decoder kills in {:.1} s; slowest status during a restart: {} ms",
        started.elapsed().as_secs_f64(),
        worst_status.as_millis()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_injection_is_refused_unless_switched_on() {
    let d = Daemon::start(&test_config(&smollm2(), ""));
    let client = Client::connect(&d.socket).await.unwrap();
    match client.inject_fault(Fault::PanicDecoder).await {
        Err(embody_client::ClientError::Refused { code, message }) => {
            assert_eq!(code, ErrorCode::Forbidden);
            assert!(message.contains("fault_injection = true"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    let st = client.status().await.unwrap();
    assert_eq!(st.decoder_restarts, 0);
}
