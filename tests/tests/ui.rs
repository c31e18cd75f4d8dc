//! The web view (`/ui`) in a real browser: Debian's chromium, headless, driven through
//! chromedriver (fantoccini). The system runs as processes with an `operate` token; sagas
//! complete, are compensated, and stop in `completion_failed`; one waits on a stopped
//! participant. A person logs in, reads the list and a saga's timeline, marks the stopped
//! saga's step completed by hand, and aborts the waiting saga with its button.
//!
//! Screenshots of the list, a saga's page and the page after the abort are written to
//! `<target>/tmp/ui-screenshots/` (the path is printed); `docs/ui-saga.png` in the README is a
//! copy of the saga page's.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use saga_system::checkout::{order, unique_sku};
use saga_system::system::{default_config_path, free_port};
use saga_system::{Backend, Options, System};
use serde_json::{Value, json};

const TOKEN: &str = "ui-browser-test-operator-token-0123456789";
/// How long anything the browser waits for may take, with both cores loaded.
const PATIENCE: Duration = Duration::from_secs(90);

/// The example definitions plus a saga that stops for an operator: its payment is past the
/// point of no return (a retriable step), so a declined charge is `completion_failed`.
fn definitions() -> String {
    let examples = std::fs::read_to_string(default_config_path()).expect("orchestrator/sagas.yaml");
    format!(
        "{examples}
  - name: charge-after-order
    steps:
      - name: create-order
        participant: orders
        action: create_order
        compensation: cancel_order
        timeout: 10s
      - name: charge-late
        participant: payments
        action: charge
        kind: retriable
        timeout: 10s
"
    )
}

/// The chromedriver process; killed when dropped.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `name` on the PATH, or a failure that says how to install it: a browser test that skips is
/// a test that lies.
fn required(name: &str) -> PathBuf {
    saga_system::bins::on_path(name).unwrap_or_else(|| {
        panic!(
            "the web view's browser test needs `{name}`, from Debian's chromium and \
                 chromium-driver packages: apt-get install -y chromium chromium-driver \
                 (scripts/test installs them when missing)"
        )
    })
}

async fn start_driver() -> Driver {
    let chromedriver = required("chromedriver");
    let port = free_port().expect("a free port");
    let child = Command::new(chromedriver)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromedriver");
    let driver = Driver {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < PATIENCE,
            "chromedriver did not listen on {port} within {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    driver
}

async fn browser(driver: &Driver) -> Client {
    let chromium = required("chromium");
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": chromium,
            // Root in CI: no sandbox. A tall window, so the screenshots show whole pages.
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1400,1900"],
        }),
    );
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    let started = Instant::now();
    loop {
        match ClientBuilder::new(connector.clone())
            .capabilities(capabilities.clone())
            .connect(&driver.url)
            .await
        {
            Ok(client) => return client,
            Err(error) if started.elapsed() > PATIENCE => {
                panic!("chromium did not start through chromedriver: {error}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// The text of the first element `css` matches, once there is one.
async fn text(client: &Client, css: &str) -> String {
    let started = Instant::now();
    loop {
        if let Ok(element) = client.find(Locator::Css(css)).await
            && let Ok(text) = element.text().await
        {
            return text;
        }
        if started.elapsed() > PATIENCE {
            let url = client.current_url().await.map(|u| u.to_string());
            let page = client.source().await.unwrap_or_default();
            panic!("no `{css}` on {url:?} within {PATIENCE:?}; the page:\n{page}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Reloads the page until the text of `css` satisfies `ready`; returns it.
async fn wait_for_text(
    client: &Client,
    css: &str,
    what: &str,
    ready: impl Fn(&str) -> bool,
) -> String {
    let started = Instant::now();
    loop {
        let shown = text(client, css).await;
        if ready(&shown) {
            return shown;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "{what}: `{css}` still shows {shown:?} after {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        client.refresh().await.expect("reload");
    }
}

/// Accepts the confirmation an action asks for.
async fn confirm(client: &Client) {
    let started = Instant::now();
    while client.accept_alert().await.is_err() {
        assert!(started.elapsed() < PATIENCE, "no confirmation was asked");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn screenshot(client: &Client, dir: &Path, name: &str) {
    let png = client.screenshot().await.expect("a screenshot");
    let path = dir.join(name);
    std::fs::write(&path, png).expect("write the screenshot");
    eprintln!("screenshot: {}", path.display());
}

async fn settled(system: &System, id: &str, status: &str) {
    let saga = system.wait_settled(id, PATIENCE).await;
    assert_eq!(saga["status"], status, "{saga}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_reads_sagas_and_aborts_one_in_the_browser() {
    // Fail at once, before the system starts, when the browser is missing.
    required("chromium");
    let driver = start_driver().await;
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ui-screenshots");
    std::fs::create_dir_all(&dir).expect("the screenshots' directory");

    let mut system = System::start(
        Options::new(Backend::Sqlite)
            .label("ui")
            .config_yaml(definitions())
            .api_token("ops", TOKEN),
    )
    .await;
    let sku = unique_sku("UI");
    let completed = system
        .start_checkout(&order("ada", 4_999, &[(&sku, 2)]))
        .await;
    // Above the payment limit: declined, so compensated.
    let compensated = system
        .start_checkout(&order("bob", 250_000, &[(&sku, 1)]))
        .await;
    let (status, body) = system
        .start_named(
            "charge-after-order",
            &order("cyd", 250_000, &[(&sku, 1)]),
            None,
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let operator = body["saga_id"].as_str().unwrap().to_owned();
    settled(&system, &completed, "completed").await;
    settled(&system, &compensated, "compensated").await;
    settled(&system, &operator, "completion_failed").await;
    // A saga waiting on a participant that is down, before its point of no return.
    system.stop("inventory").await;
    let waiting = system
        .start_checkout(&order("dee", 3_000, &[(&sku, 1)]))
        .await;
    system
        .wait_until(
            &waiting,
            PATIENCE,
            "wait on reserve-stock",
            |saga: &Value| saga["waiting_on"]["step"] == "reserve-stock",
        )
        .await;

    let client = browser(&driver).await;
    let base = system.http_url().to_owned();

    // Without a session the view asks for a token, then comes back to the list.
    client.goto(&format!("{base}/ui")).await.expect("open /ui");
    let token = client
        .wait()
        .at_most(PATIENCE)
        .for_element(Locator::Css("#token"))
        .await
        .expect("the login form");
    assert_eq!(client.current_url().await.unwrap().path(), "/ui/login");
    token.send_keys(TOKEN).await.expect("type the token");
    client
        .find(Locator::Css("form[action='/ui/login'] button"))
        .await
        .expect("the login button")
        .click()
        .await
        .expect("log in");

    // The list: every saga, the counts per status.
    let table = text(&client, "#sagas").await;
    for id in [&completed, &compensated, &operator, &waiting] {
        assert!(table.contains(id.as_str()), "{id} not listed: {table}");
    }
    assert!(text(&client, ".who").await.contains("signed in as ops"));
    for (status, count) in [
        ("completed", "1"),
        ("compensated", "1"),
        ("completion_failed", "1"),
        ("running", "1"),
    ] {
        let shown = text(
            &client,
            &format!("nav.counts a[data-status='{status}'] strong"),
        )
        .await;
        assert_eq!(shown, count, "the count of {status}");
    }
    screenshot(&client, &dir, "ui-list.png").await;
    // The status filter.
    client
        .goto(&format!("{base}/ui?status=completion_failed"))
        .await
        .unwrap();
    let filtered = text(&client, "#sagas").await;
    assert!(
        filtered.contains(&operator) && !filtered.contains(&completed),
        "{filtered}"
    );

    // A compensated saga: its timeline, in order, and its graph drawn by Mermaid.
    client
        .goto(&format!("{base}/ui/sagas/{compensated}"))
        .await
        .unwrap();
    assert_eq!(text(&client, "#status").await, "compensated");
    let timeline = text(&client, "#timeline").await;
    let order_of = |event: &str| {
        timeline
            .find(event)
            .unwrap_or_else(|| panic!("no {event} in the timeline: {timeline}"))
    };
    assert!(order_of("saga_started") < order_of("step_failed"));
    assert!(order_of("step_failed") < order_of("compensation_started"));
    assert!(order_of("compensation_started") < order_of("saga_compensated"));
    assert!(
        timeline.contains("declined") || timeline.contains("limit"),
        "{timeline}"
    );
    client
        .wait()
        .at_most(PATIENCE)
        .for_element(Locator::Css(".graph svg"))
        .await
        .expect("the graph drawn");
    let steps = text(&client, "#steps").await;
    assert!(steps.contains("charge-payment"), "{steps}");
    screenshot(&client, &dir, "ui-saga.png").await;

    // The saga waiting for an operator offers what an operator can do.
    client
        .goto(&format!("{base}/ui/sagas/{operator}"))
        .await
        .unwrap();
    assert_eq!(text(&client, "#status").await, "completion_failed");
    assert_eq!(text(&client, "#current-step").await, "charge-late");
    client
        .find(Locator::Css("button[data-action='retry-step']"))
        .await
        .expect("a retry-step button");
    // The operator charged by hand: mark the step completed, with what it returned.
    client
        .find(Locator::Css("#mark-output"))
        .await
        .expect("the output field")
        .send_keys(r#"{"payment_id": "by-hand-1"}"#)
        .await
        .expect("type the output");
    client
        .find(Locator::Css("button[data-action='mark-completed']"))
        .await
        .expect("a mark-completed button")
        .click()
        .await
        .expect("click mark-completed");
    confirm(&client).await;
    assert_eq!(text(&client, "#flash").await, "mark-completed: done.");
    wait_for_text(&client, "#status", "the saga marked completed", |s| {
        s == "completed"
    })
    .await;
    assert!(text(&client, "#data").await.contains("by-hand-1"));
    assert!(text(&client, "#timeline").await.contains("manual=true"));

    // The waiting saga: links to its participants' queues, and the abort button.
    client
        .goto(&format!("{base}/ui/sagas/{waiting}"))
        .await
        .unwrap();
    assert_eq!(text(&client, "#status").await, "running");
    let link = client
        .find(Locator::Css("a.queue[href*='saga.commands.inventory']"))
        .await
        .expect("a link to inventory's queue")
        .attr("href")
        .await
        .unwrap()
        .unwrap_or_default();
    let vhost: String = system
        .vhost()
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect();
    assert_eq!(
        link,
        format!("http://localhost:15672/#/queues/{vhost}/saga.commands.inventory")
    );
    client
        .find(Locator::Css("button[data-action='abort']"))
        .await
        .expect("the abort button")
        .click()
        .await
        .expect("click abort");
    confirm(&client).await;
    assert_eq!(text(&client, "#flash").await, "abort: done.");
    let timeline = text(&client, "#timeline").await;
    assert!(timeline.contains("abort_requested"), "{timeline}");
    assert!(timeline.contains("by=ops"), "{timeline}");
    // Compensation waits for inventory (its reservation may have run): start it again.
    system.start_participant("inventory").await;
    wait_for_text(&client, "#status", "the aborted saga compensated", |s| {
        s == "compensated"
    })
    .await;
    screenshot(&client, &dir, "ui-after-abort.png").await;
    let saga = system.saga(&waiting).await;
    assert_eq!(saga["status"], "compensated", "{saga}");

    client.close().await.expect("close the browser");
    eprintln!("the web view's screenshots are in {}", dir.display());
}
