//! Reading a system's vhost through the RabbitMQ management HTTP API, the way an operator sees
//! it in the management UI: queues, exchanges, bindings, consumers, connections, and "Get
//! messages" (which hands the messages back to the queue).

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::env::Management;

/// A path segment (vhost, queue or exchange name) percent-encoded for the management API
/// (`/` is the default vhost's name, and must become `%2F`).
pub fn encode_segment(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

impl Management {
    fn http() -> anyhow::Result<reqwest::Client> {
        reqwest::Client::builder()
            .timeout(Duration::from_secs(15))
            .build()
            .context("an HTTP client")
    }

    /// `GET <path>` (e.g. `/api/queues/v`), as JSON; an error unless 200.
    pub async fn get_json(&self, path: &str) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.url);
        let response = Self::http()?
            .get(&url)
            .basic_auth(&self.user, Some(&self.password))
            .send()
            .await
            .with_context(|| format!("the management API did not answer GET {url}"))?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        if !status.is_success() {
            bail!("GET {url}: {status} {text}");
        }
        serde_json::from_str(&text).with_context(|| format!("GET {url}: not JSON: {text}"))
    }

    /// `POST <path>` with a JSON body, as JSON; an error unless 2xx.
    pub async fn post_json(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.url);
        let response = Self::http()?
            .post(&url)
            .basic_auth(&self.user, Some(&self.password))
            .json(body)
            .send()
            .await
            .with_context(|| format!("the management API did not answer POST {url}"))?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        if !status.is_success() {
            bail!("POST {url} {body}: {status} {text}");
        }
        serde_json::from_str(&text).with_context(|| format!("POST {url}: not JSON: {text}"))
    }

    /// Every queue of `vhost` (`GET /api/queues/{vhost}`).
    pub async fn queues(&self, vhost: &str) -> anyhow::Result<Vec<Value>> {
        array(
            self.get_json(&format!("/api/queues/{}", encode_segment(vhost)))
                .await?,
        )
    }

    /// One exchange (`GET /api/exchanges/{vhost}/{name}`).
    pub async fn exchange(&self, vhost: &str, name: &str) -> anyhow::Result<Value> {
        self.get_json(&format!(
            "/api/exchanges/{}/{}",
            encode_segment(vhost),
            encode_segment(name)
        ))
        .await
    }

    /// The bindings whose source is exchange `name`
    /// (`GET /api/exchanges/{vhost}/{name}/bindings/source`).
    pub async fn bindings_from(&self, vhost: &str, name: &str) -> anyhow::Result<Vec<Value>> {
        array(
            self.get_json(&format!(
                "/api/exchanges/{}/{}/bindings/source",
                encode_segment(vhost),
                encode_segment(name)
            ))
            .await?,
        )
    }

    /// Every consumer of `vhost` (`GET /api/consumers/{vhost}`).
    pub async fn consumers(&self, vhost: &str) -> anyhow::Result<Vec<Value>> {
        array(
            self.get_json(&format!("/api/consumers/{}", encode_segment(vhost)))
                .await?,
        )
    }

    /// Every connection to `vhost` (`GET /api/vhosts/{vhost}/connections`).
    pub async fn connections(&self, vhost: &str) -> anyhow::Result<Vec<Value>> {
        array(
            self.get_json(&format!(
                "/api/vhosts/{}/connections",
                encode_segment(vhost)
            ))
            .await?,
        )
    }

    /// Closes every client connection to `vhost`, as a broker restart or a network cut would
    /// (`DELETE /api/connections/{name}`); returns how many it closed.
    pub async fn close_connections(&self, vhost: &str) -> anyhow::Result<usize> {
        let connections = self.connections(vhost).await?;
        for connection in &connections {
            let name = connection["name"]
                .as_str()
                .context("a connection without a name")?;
            let url = format!("{}/api/connections/{}", self.url, encode_segment(name));
            let response = Self::http()?
                .delete(&url)
                .basic_auth(&self.user, Some(&self.password))
                .header("X-Reason", "a test cuts the connection")
                .send()
                .await
                .with_context(|| format!("DELETE {url}"))?;
            // 404: it closed by itself meanwhile.
            if !response.status().is_success()
                && response.status() != reqwest::StatusCode::NOT_FOUND
            {
                bail!("DELETE {url}: {}", response.status());
            }
        }
        Ok(connections.len())
    }

    /// "Get messages" of the management UI: up to `count` messages of `queue`, handed back to
    /// the queue afterwards (`ackmode: ack_requeue_true`), payloads as text where they are.
    pub async fn peek_messages(
        &self,
        vhost: &str,
        queue: &str,
        count: u32,
    ) -> anyhow::Result<Vec<Value>> {
        array(
            self.post_json(
                &format!(
                    "/api/queues/{}/{}/get",
                    encode_segment(vhost),
                    encode_segment(queue)
                ),
                &json!({"count": count, "ackmode": "ack_requeue_true", "encoding": "auto"}),
            )
            .await?,
        )
    }

    /// Polls [`peek_messages`](Self::peek_messages) until `queue` holds a message; `None` after
    /// `timeout`.
    pub async fn wait_peek(
        &self,
        vhost: &str,
        queue: &str,
        timeout: Duration,
    ) -> anyhow::Result<Option<Value>> {
        let started = Instant::now();
        loop {
            if let Some(first) = self
                .peek_messages(vhost, queue, 1)
                .await?
                .into_iter()
                .next()
            {
                return Ok(Some(first));
            }
            if started.elapsed() > timeout {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

fn array(value: Value) -> anyhow::Result<Vec<Value>> {
    match value {
        Value::Array(items) => Ok(items),
        other => bail!("expected a JSON array from the management API, got {other}"),
    }
}

/// The client-provided name of a connection as the management API shows it
/// (`user_provided_name`, or `client_properties.connection_name`).
pub fn user_provided_name(connection: &Value) -> Option<&str> {
    connection["user_provided_name"]
        .as_str()
        .or_else(|| connection["client_properties"]["connection_name"].as_str())
}

#[cfg(test)]
mod tests {
    use super::encode_segment;

    #[test]
    fn segments_are_encoded() {
        assert_eq!(encode_segment("/"), "%2F");
        assert_eq!(encode_segment("saga-system-a1"), "saga-system-a1");
        assert_eq!(
            encode_segment("saga.commands.orders"),
            "saga.commands.orders"
        );
        assert_eq!(encode_segment("a b"), "a%20b");
    }
}
