//! The real binary as a child process.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// A free port on 127.0.0.1 (bound then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct ServerProcess {
    pub child: Child,
    pub addr: String,
    pub metrics_addr: String,
}

impl ServerProcess {
    /// Starts `fusion-serve serve` with `args` on free ports and waits for SERVING.
    pub async fn start(args: &[&str]) -> Self {
        let (port, metrics) = (free_port(), free_port());
        let addr = format!("127.0.0.1:{port}");
        let metrics_addr = format!("127.0.0.1:{metrics}");
        let child = Command::new(env!("CARGO_BIN_EXE_fusion-serve"))
            .args([
                "serve",
                "--grpc-addr",
                &addr,
                "--metrics-addr",
                &metrics_addr,
            ])
            .args(args)
            .stdin(Stdio::null())
            .spawn()
            .expect("starting fusion-serve");
        let server = Self {
            child,
            addr,
            metrics_addr,
        };
        server.wait_status(1, Duration::from_secs(180)).await;
        server
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn health(&self) -> Option<i32> {
        let channel = Channel::from_shared(self.url())
            .ok()?
            .connect()
            .await
            .ok()?;
        HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .ok()
            .map(|r| r.into_inner().status)
    }

    /// Polls health until it reports `status` (1 SERVING, 2 NOT_SERVING).
    pub async fn wait_status(&self, status: i32, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if self.health().await == Some(status) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "health never reported {status} on {}",
                self.addr
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn sigterm(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -TERM failed");
    }

    /// Waits for the process to exit (bounded) and returns its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("the server did not exit within {within:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
