//! `amqps://` against the TLS listener of the fault suite's RabbitMQ node, whose certificate is
//! signed by a private CA that `scripts/fault-services` makes (`FAULT_TLS_DIR`).

use std::path::PathBuf;

use saga_amqp::lapin::{
    BasicProperties,
    options::{BasicGetOptions, BasicPublishOptions, QueueDeclareOptions},
    types::FieldTable,
};
use saga_amqp::{AmqpError, Tls};

const RUN_FAULT_SERVICES: &str = "run `scripts/fault-services` as root first: it starts a \
     RabbitMQ node with a TLS listener on 127.0.0.1:5674 and makes its CA under \
     /var/tmp/saga-faults/tls (or set FAULT_AMQPS_URL and FAULT_TLS_DIR)";

fn var(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_owned())
}

fn amqps_url() -> String {
    var("FAULT_AMQPS_URL", "amqps://guest:guest@127.0.0.1:5674/%2f")
}

/// `name` in the fault suite's TLS directory: `ca.pem` signed the servers' certificate,
/// `other-ca.pem` signed nothing.
fn tls_file(name: &str) -> PathBuf {
    let path = PathBuf::from(var("FAULT_TLS_DIR", "/var/tmp/saga-faults/tls")).join(name);
    assert!(
        path.exists(),
        "{} is missing: {RUN_FAULT_SERVICES}",
        path.display()
    );
    path
}

#[tokio::test]
async fn amqps_with_the_private_ca_publishes_and_gets_a_message() {
    let tls = Tls::from_ca_file(Some(&tls_file("ca.pem"))).unwrap();
    let conn = saga_amqp::connect_with_tls(&amqps_url(), "saga-amqp tls test", &tls)
        .await
        .unwrap_or_else(|e| panic!("{e:?}: {RUN_FAULT_SERVICES}"));
    let channel = conn.create_channel().await.unwrap();
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .basic_publish(
            "".into(),
            queue.name().clone(),
            BasicPublishOptions::default(),
            b"over TLS",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    // The publish is asynchronous on the broker side: poll until it is queued.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let message = loop {
        let got = channel
            .basic_get(queue.name().clone(), BasicGetOptions { no_ack: true })
            .await
            .unwrap();
        if let Some(message) = got {
            break message;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the message never arrived"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(message.delivery.data, b"over TLS");
    conn.close(200, "done".into()).await.unwrap();
}

/// Without the private CA (built-in roots only), or with another CA, the broker's certificate
/// is unknown: the connection is refused, and the error says why without the password.
#[tokio::test]
async fn amqps_without_the_private_ca_is_refused_as_an_unknown_certificate() {
    let other = Tls::from_ca_file(Some(&tls_file("other-ca.pem"))).unwrap();
    for (what, tls) in [("built-in roots", Tls::default()), ("another CA", other)] {
        let url = amqps_url();
        let err = saga_amqp::connect_with_tls(&url, "saga-amqp tls refused test", &tls)
            .await
            .err()
            .unwrap_or_else(|| panic!("{what}: connected to {url} without its CA"));
        assert!(
            matches!(err, AmqpError::UntrustedCertificate { .. }),
            "{what}: {err:?}"
        );
        let text = chain(&err);
        assert!(
            text.contains("UnknownIssuer") && text.contains("--amqp-ca-file"),
            "{what}: {text}"
        );
        assert!(!text.contains("guest:guest"), "{what}: {text}");
    }
}

fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        text = format!("{text}: {s}");
        source = s.source();
    }
    text
}
