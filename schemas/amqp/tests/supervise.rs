//! The supervisor rebuilds the session after failures and lost connections, and stops on
//! shutdown.

mod common;

use std::time::{Duration, Instant};

use common::TestVhost;
use saga_amqp::{AmqpError, Publisher, Tls};
use saga_schemas::amqp::REPLIES_QUEUE;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn supervise_restarts_the_session_until_shutdown() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("saga_amqp=info")
        .with_test_writer()
        .try_init();
    let vhost = TestVhost::new("supervise");
    let shutdown = CancellationToken::new();
    let (started_tx, mut started) = mpsc::unbounded_channel::<u32>();
    let mut runs = 0u32;
    let token = shutdown.clone();
    let supervisor = tokio::spawn({
        let url = vhost.url.clone();
        async move {
            saga_amqp::supervise(
                &url,
                Tls::default(),
                "saga-amqp supervise test",
                token.clone(),
                move |conn| {
                    runs += 1;
                    let run = runs;
                    let started_tx = started_tx.clone();
                    let token = token.clone();
                    async move {
                        // Every session does real work on its connection.
                        let ch = conn.create_channel().await?;
                        saga_amqp::declare_orchestrator_topology(
                            &ch,
                            &["payments"],
                            saga_amqp::QueueType::Quorum,
                        )
                        .await?;
                        let publisher = Publisher::open(&conn).await?;
                        started_tx.send(run).unwrap();
                        match run {
                            // The first session fails: it is started again.
                            1 => Err(AmqpError::Invalid("the first session fails".into())),
                            // The second one closes its own connection: noticed, started again.
                            2 => {
                                conn.close(200, "closed by the session".into()).await?;
                                std::future::pending().await
                            }
                            // The third one runs until the broker closes the connection.
                            3 => std::future::pending().await,
                            // The fourth one finishes cleanly on shutdown.
                            _ => {
                                token.cancelled().await;
                                assert!(publisher.is_open());
                                drop(ch);
                                let _ = REPLIES_QUEUE;
                                Ok(())
                            }
                        }
                    }
                },
            )
            .await
        }
    });

    let next = async |started: &mut mpsc::UnboundedReceiver<u32>| {
        tokio::time::timeout(Duration::from_secs(20), started.recv())
            .await
            .expect("the session was not started again within 20 s")
            .expect("the supervisor stopped")
    };
    assert_eq!(next(&mut started).await, 1);
    assert_eq!(next(&mut started).await, 2);
    assert_eq!(next(&mut started).await, 3);
    // Let the connection show up in rabbitmqctl, then close it from the broker's side.
    tokio::time::sleep(Duration::from_millis(500)).await;
    vhost.close_all_connections();
    assert_eq!(next(&mut started).await, 4);

    shutdown.cancel();
    let result = tokio::time::timeout(Duration::from_secs(10), supervisor)
        .await
        .expect("supervise did not return after shutdown")
        .unwrap();
    result.unwrap();
}

#[tokio::test]
async fn supervise_stops_on_shutdown_while_the_broker_is_unreachable() {
    // Port 1 refuses connections: supervise keeps retrying until it is told to stop.
    let shutdown = CancellationToken::new();
    let supervisor = tokio::spawn(saga_amqp::supervise(
        "amqp://guest:guest@127.0.0.1:1/%2f",
        Tls::default(),
        "saga-amqp unreachable test",
        shutdown.clone(),
        |_conn| async { panic!("there is no broker on port 1") },
    ));
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!supervisor.is_finished());
    let stopped = Instant::now();
    shutdown.cancel();
    let result = tokio::time::timeout(Duration::from_secs(5), supervisor)
        .await
        .unwrap()
        .unwrap();
    result.unwrap();
    assert!(stopped.elapsed() < Duration::from_secs(1));
}

#[tokio::test]
async fn supervise_refuses_a_url_it_cannot_parse() {
    let err = saga_amqp::supervise(
        "http://nope",
        Tls::default(),
        "x",
        CancellationToken::new(),
        |_conn| async { Ok(()) },
    )
    .await
    .unwrap_err();
    assert!(matches!(err, AmqpError::Invalid(_)), "{err}");
}

/// A broker node that accepts the TCP connection and never answers (one starting or stopping)
/// fails the connect after a bounded wait, so the supervisor tries again instead of hanging.
#[tokio::test]
async fn a_handshake_that_never_completes_times_out() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let (socket, _) = listener.accept().await.unwrap();
            held.push(socket);
        }
    });
    let started = Instant::now();
    let url = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
    let result = tokio::time::timeout(
        Duration::from_secs(60),
        saga_amqp::connect(&url, "silent broker test"),
    )
    .await
    .expect("connect returns on its own");
    assert!(
        matches!(result, Err(AmqpError::ConnectTimeout { .. })),
        "{:?}",
        result.map(|_| ())
    );
    assert!(
        started.elapsed() >= Duration::from_secs(10),
        "it waited for the handshake"
    );
    silent.abort();
}
