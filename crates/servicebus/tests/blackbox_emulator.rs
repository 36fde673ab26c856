//! The compiled `steward-sb-emulator` binary, from the outside: started on a free
//! port, used over HTTP with shared access signatures, stopped with SIGTERM.

#![allow(clippy::unwrap_used)]

use std::process::Stdio;
use std::time::{Duration, SystemTime};

use reqwest::StatusCode;
use steward_servicebus::emulator::sas_token;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStderr, Command};

const KEY_NAME: &str = "RootManageSharedAccessKey";
const KEY: &str = "YmxhY2tib3gta2V5";
const LIMIT: Duration = Duration::from_secs(30);

/// Starts the binary on port 0 and reads the address it logs.
async fn start(args: &[&str]) -> (Child, String, tokio::task::JoinHandle<Vec<String>>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_steward-sb-emulator"))
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .env("RUST_LOG", "info")
        .env_remove("SERVICE_BUS_SAS_KEY_NAME")
        .env_remove("SERVICE_BUS_SAS_KEY")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = tokio::time::timeout(LIMIT, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("listening") {
                let addr = line.split("addr=").nth(1).unwrap().split_whitespace().next().unwrap();
                return addr.to_owned();
            }
        }
        panic!("the emulator exited without saying where it listens");
    })
    .await
    .expect("the emulator did not log its address in time");
    (child, addr, tokio::spawn(collect(lines)))
}

async fn collect(mut lines: tokio::io::Lines<BufReader<ChildStderr>>) -> Vec<String> {
    let mut rest = Vec::new();
    while let Ok(Some(line)) = lines.next_line().await {
        rest.push(line);
    }
    rest
}

fn token(path: &str) -> String {
    let resource = format!("https://blackbox.servicebus.windows.net{path}");
    sas_token(&resource, KEY_NAME, KEY, SystemTime::now() + Duration::from_secs(600))
}

/// Ensures that the standalone emulator serves the REST protocol with SAS checks,
/// honours its flags, and exits 0 on SIGTERM.
#[tokio::test]
async fn binary_serves_rest_protocol_and_exits_cleanly_on_sigterm() {
    let (mut child, addr, logs) = start(&[
        "--sas-key-name",
        KEY_NAME,
        "--sas-key",
        KEY,
        "--lock-duration",
        "20s",
        "--max-delivery-count",
        "3",
        "--session-queue",
        "deploymentstatus",
    ])
    .await;
    let http = reqwest::Client::new();
    let base = format!("http://{addr}");

    let sent = http
        .post(format!("{base}/jobs/messages"))
        .header("Authorization", token("/jobs"))
        .header("BrokerProperties", r#"{"MessageId":"bb-1","CorrelationId":"c-1"}"#)
        .header("Attempt", "1")
        .body("hello from outside")
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), StatusCode::CREATED);

    let unsigned = http.post(format!("{base}/jobs/messages/head?timeout=0")).send().await.unwrap();
    assert_eq!(unsigned.status(), StatusCode::UNAUTHORIZED);

    let locked = http
        .post(format!("{base}/jobs/messages/head?timeout=5"))
        .header("Authorization", token("/jobs/messages/head"))
        .send()
        .await
        .unwrap();
    assert_eq!(locked.status(), StatusCode::CREATED);
    let props: serde_json::Value =
        serde_json::from_str(locked.headers()["brokerproperties"].to_str().unwrap()).unwrap();
    assert_eq!(props["MessageId"], "bb-1");
    assert_eq!(props["CorrelationId"], "c-1");
    assert_eq!(props["DeliveryCount"], 1);
    assert_eq!(locked.headers()["attempt"], "1");
    let location = locked.headers()["location"].to_str().unwrap().to_owned();
    assert!(location.starts_with(&format!("{base}/jobs/messages/")), "{location}");
    assert_eq!(locked.text().await.unwrap(), "hello from outside");

    let lock_path = &location[base.len()..];
    let completed =
        http.delete(&location).header("Authorization", token(lock_path)).send().await.unwrap();
    assert_eq!(completed.status(), StatusCode::OK);
    let empty = http
        .delete(format!("{base}/jobs/messages/head?timeout=0"))
        .header("Authorization", token("/jobs"))
        .send()
        .await
        .unwrap();
    assert_eq!(empty.status(), StatusCode::NO_CONTENT);

    let sessions = http
        .post(format!("{base}/deploymentstatus/messages/head?timeout=0"))
        .header("Authorization", token("/deploymentstatus"))
        .send()
        .await
        .unwrap();
    assert_eq!(sessions.status(), StatusCode::METHOD_NOT_ALLOWED);

    let pid = child.id().unwrap().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status().await.unwrap();
    assert!(killed.success());
    let status =
        tokio::time::timeout(LIMIT, child.wait()).await.expect("no exit after SIGTERM").unwrap();
    assert_eq!(status.code(), Some(0), "exit status {status}");
    let logs = logs.await.unwrap();
    assert!(logs.iter().any(|line| line.contains("shutting down")), "{logs:?}");
}

/// Ensures that bad flags are refused with a usage error rather than a half-configured
/// emulator.
#[tokio::test]
async fn binary_refuses_bad_flags() {
    for args in [
        &["--max-delivery-count", "0"][..],
        &["--lock-duration", "forever"],
        &["--sas-key-name", "only-a-name"],
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_steward-sb-emulator"))
            .args(args)
            .env_remove("SERVICE_BUS_SAS_KEY_NAME")
            .env_remove("SERVICE_BUS_SAS_KEY")
            .output()
            .await
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        assert!(!output.stderr.is_empty(), "{args:?}");
    }
}
