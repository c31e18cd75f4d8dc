//! Test support: a RabbitMQ vhost of the test's own, created and deleted with `rabbitmqctl`,
//! so tests can run in parallel against one broker.

#![allow(dead_code)]

use std::process::Command;

use serde_json::Value;

/// The broker's URL from `AMQP_URL`; fails the test with instructions when it is unset.
pub fn base_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| {
        panic!(
            "set AMQP_URL to a RabbitMQ broker, e.g. AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f \
             (the tests create and delete vhosts of their own with `rabbitmqctl`, which must be \
             able to reach that broker)"
        )
    })
}

/// Runs `rabbitmqctl args...`, panicking with its output when it fails.
pub fn rabbitmqctl(args: &[&str]) -> String {
    let output = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run rabbitmqctl (needed to create test vhosts): {e}"));
    assert!(
        output.status.success(),
        "rabbitmqctl {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `url` with its vhost replaced by `vhost` (which must need no percent-encoding).
fn with_vhost(url: &str, vhost: &str) -> String {
    let (url, query) = match url.find('?') {
        Some(i) => (&url[..i], &url[i..]),
        None => (url, ""),
    };
    let authority_start = url.find("://").map_or(0, |i| i + 3);
    let base = match url[authority_start..].find('/') {
        Some(i) => &url[..authority_start + i],
        None => url,
    };
    format!("{base}/{vhost}{query}")
}

/// The user name in `url`, `guest` if it has none.
fn user(url: &str) -> String {
    let authority_start = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[authority_start..];
    let authority = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
    match authority.rfind('@') {
        Some(at) => authority[..at]
            .split(':')
            .next()
            .unwrap_or("guest")
            .to_string(),
        None => "guest".to_string(),
    }
}

/// A vhost that exists for the life of this value (deleted on drop, even when the test fails).
pub struct TestVhost {
    pub name: String,
    /// The AMQP URL of this vhost.
    pub url: String,
}

impl TestVhost {
    pub fn new(test: &str) -> Self {
        let base = base_url();
        let name = format!("saga-amqp-test-{test}-{}", uuid::Uuid::new_v4().simple());
        rabbitmqctl(&["add_vhost", &name]);
        let vhost = TestVhost {
            url: with_vhost(&base, &name),
            name,
        };
        rabbitmqctl(&[
            "set_permissions",
            "-p",
            &vhost.name,
            &user(&base),
            ".*",
            ".*",
            ".*",
        ]);
        vhost
    }

    /// `rabbitmqctl <command> -p <vhost> --formatter json <columns...>`, parsed.
    pub fn list(&self, command: &str, columns: &[&str]) -> Vec<Value> {
        let mut args = vec![command, "-p", &self.name, "--formatter", "json", "--quiet"];
        args.extend_from_slice(columns);
        let out = rabbitmqctl(&args);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("rabbitmqctl output {out:?}: {e}"))
    }

    /// Closes every client connection to this vhost from the broker's side.
    pub fn close_all_connections(&self) {
        rabbitmqctl(&[
            "close_all_connections",
            "-p",
            &self.name,
            "closed by the test",
        ]);
    }
}

impl Drop for TestVhost {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["delete_vhost", &self.name])
            .output();
    }
}

#[test]
fn url_helpers() {
    assert_eq!(
        with_vhost("amqp://guest:guest@127.0.0.1:5672/%2f", "v"),
        "amqp://guest:guest@127.0.0.1:5672/v"
    );
    assert_eq!(
        with_vhost("amqp://h:5672?heartbeat=5", "v"),
        "amqp://h:5672/v?heartbeat=5"
    );
    assert_eq!(user("amqp://bob:pw@h/%2f"), "bob");
    assert_eq!(user("amqp://h/%2f"), "guest");
}
