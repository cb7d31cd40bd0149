//! Starting `floe dev` as a process, shared by the integration tests.

#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub struct Dev {
    pub child: Child,
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `floe dev` on free ports with `data` as its folder and waits for
/// its endpoints file.
pub fn start(data: &Path) -> (Dev, Value) {
    let endpoints = data.join("endpoints.json");
    let _ = std::fs::remove_file(&endpoints);
    let child = Command::new(env!("CARGO_BIN_EXE_floe"))
        .args(["dev", "--signal-port", "0", "--control-port", "0"])
        .args(["--turn-port", "0", "--turn-http-port", "0", "--data-dir"])
        .arg(data)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn floe dev");
    let dev = Dev { child };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(text) = std::fs::read_to_string(&endpoints)
            && let Ok(v) = serde_json::from_str::<Value>(&text)
        {
            return (dev, v);
        }
        assert!(
            Instant::now() < deadline,
            "floe dev did not come up in 30 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
