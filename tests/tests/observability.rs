//! The dashboards and alerts in `deploy/`, each checked with its own tool:
//!
//! - the alerting rules and the compose set-up's Prometheus configuration with `promtool check`,
//!   and the rules' unit tests (`alerts.test.yml`: each alert fires on a synthetic series and
//!   stays silent on a healthy one) with `promtool test rules`;
//! - the Grafana dashboard's structure, as Grafana loads it against the provisioned datasource
//!   (Grafana itself is not packaged for Debian);
//! - every panel query of the dashboard, and the alert rules, evaluated by a real Prometheus
//!   server scraping a real orchestrator (and RabbitMQ's exporter) while sagas complete and
//!   are compensated: each query must parse and return data.
//!
//! `promtool` and `prometheus` come from Debian's `prometheus` package and RabbitMQ's exporter
//! from its `rabbitmq_prometheus` plugin; `scripts/test` installs and enables both. Without
//! them these tests fail saying what to install: none skips.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use marked_yaml::types::{MarkedMappingNode, Node};
use saga_system::checkout::*;
use saga_system::system::{free_port, tail};
use saga_system::{Backend, Options, System, TestEnv, pretty};
use serde_json::Value;

const RULES: &str = "deploy/prometheus/alerts.yml";
const RULE_TESTS: &str = "deploy/prometheus/alerts.test.yml";
const PROMETHEUS_CONFIG: &str = "deploy/prometheus/prometheus.yml";
const DASHBOARDS: &str = "deploy/grafana/dashboards";
const DATASOURCES: &str = "deploy/grafana/provisioning/datasources/prometheus.yml";

/// What Grafana puts in place of its global variables when it sends a query. The test
/// Prometheus scrapes every second; a minute's window still holds the run's last samples
/// while the queries are polled (up to 30 s), so a rate is a number, not NaN.
const GRAFANA_GLOBALS: &[(&str, &str)] = &[
    ("$__rate_interval", "1m"),
    ("$__interval", "5s"),
    ("$__range", "5m"),
];

// ---------------------------------------------------------------------------------------------
// The tests.

#[test]
fn promtool_accepts_the_rules_and_the_compose_configuration() {
    for (what, file) in [("rules", RULES), ("config", PROMETHEUS_CONFIG)] {
        let output = run(Command::new(tool("promtool"))
            .args(["check", what])
            .arg(root().join(file)));
        assert!(
            output.status.success(),
            "`promtool check {what} {file}` fails:\n{}",
            text(&output)
        );
    }
}

#[test]
fn every_alert_fires_in_its_unit_tests_and_stays_silent_when_healthy() {
    let dir = root().join(RULE_TESTS);
    let output = run(Command::new(tool("promtool"))
        .args(["test", "rules"])
        .arg(dir.file_name().expect("a file"))
        .current_dir(dir.parent().expect("a directory")));
    assert!(
        output.status.success(),
        "`promtool test rules {RULE_TESTS}` fails:\n{}",
        text(&output)
    );

    // promtool passes a file that tests nothing: check each alert has both kinds of case.
    let alerts = alert_names();
    let tests = load_yaml(&root().join(RULE_TESTS));
    let (mut fires, mut silent) = (BTreeSet::new(), BTreeSet::new());
    for case in sequence(&tests, "tests")
        .iter()
        .flat_map(|test| sequence(test, "alert_rule_test"))
    {
        let name = case
            .get_scalar("alertname")
            .map_or("", |s| s.as_str())
            .to_owned();
        let expected = case.get_sequence("exp_alerts").map_or(0, |s| s.len());
        if expected > 0 {
            fires.insert(name);
        } else {
            silent.insert(name);
        }
    }
    for alert in &alerts {
        assert!(
            fires.contains(alert) && silent.contains(alert),
            "{RULE_TESTS} should test that {alert} fires (exp_alerts with an alert) and that it \
             stays silent (exp_alerts: []); firing cases for {fires:?}, silent ones for {silent:?}"
        );
    }
}

#[test]
fn the_dashboards_are_what_grafana_loads_against_the_provisioned_datasource() {
    let uids = datasource_uids();
    let dashboards = dashboards();
    assert!(!dashboards.is_empty(), "no dashboard in {DASHBOARDS}");
    let mut problems = Vec::new();
    for (path, dashboard) in &dashboards {
        let file = path.display();
        for key in ["uid", "title"] {
            if dashboard[key].as_str().is_none_or(str::is_empty) {
                problems.push(format!("{file}: no `{key}`"));
            }
        }
        // 36 is the first schema whose datasources are `{type, uid}` objects, as here.
        if dashboard["schemaVersion"].as_u64().is_none_or(|v| v < 36) {
            problems.push(format!(
                "{file}: `schemaVersion` {} should be 36 or later",
                dashboard["schemaVersion"]
            ));
        }
        let mut ids = BTreeSet::new();
        let panels = panels(dashboard);
        if panels.is_empty() {
            problems.push(format!("{file}: no panels"));
        }
        for panel in panels {
            let title = panel["title"].as_str().unwrap_or("?");
            match panel["id"].as_u64() {
                None => problems.push(format!("{file}: panel {title:?} has no numeric `id`")),
                Some(id) if !ids.insert(id) => {
                    problems.push(format!("{file}: panel id {id} is used twice ({title:?})"))
                }
                Some(_) => {}
            }
            let grid = &panel["gridPos"];
            let fits = ["x", "y", "w", "h"].iter().all(|k| grid[k].is_u64())
                && grid["x"].as_u64().unwrap_or(0) + grid["w"].as_u64().unwrap_or(0) <= 24;
            if !fits {
                problems.push(format!(
                    "{file}: panel {title:?}: `gridPos` {grid} should place it within 24 columns"
                ));
            }
            if panel["type"] == "row" {
                continue;
            }
            let at = format!("{file}: panel {title:?}");
            problems.extend(check_datasource(&uids, &panel["datasource"], &at));
            let targets = panel["targets"].as_array().cloned().unwrap_or_default();
            if targets.is_empty() {
                problems.push(format!("{file}: panel {title:?} has no query"));
            }
            let mut ref_ids = BTreeSet::new();
            for target in &targets {
                let ref_id = target["refId"].as_str().unwrap_or_default();
                if ref_id.is_empty() || !ref_ids.insert(ref_id) {
                    problems.push(format!(
                        "{file}: panel {title:?}: each query needs a `refId` of its own, found \
                         {ref_id:?}"
                    ));
                }
                if target["expr"].as_str().is_none_or(|e| e.trim().is_empty()) {
                    problems.push(format!("{file}: panel {title:?} {ref_id}: no `expr`"));
                }
                if !target["datasource"].is_null() {
                    let at = format!("{file}: panel {title:?} {ref_id}");
                    problems.extend(check_datasource(&uids, &target["datasource"], &at));
                }
            }
        }
        for variable in variables(dashboard) {
            let name = variable["name"].as_str().unwrap_or("?");
            if variable["type"] == "query" {
                let at = format!("{file}: variable {name}");
                problems.extend(check_datasource(&uids, &variable["datasource"], &at));
                if label_values(variable).is_none() {
                    problems.push(format!(
                        "{file}: variable {name}: expected a `label_values(metric, label)` query"
                    ));
                }
            }
        }
        // Every query's variables are the dashboard's own or Grafana's globals.
        for query in queries_of(dashboard) {
            if let Err(unknown) = substitute(dashboard, &query.expr) {
                problems.push(format!(
                    "{file}: panel {:?} {}: unknown variable in `{}`: {unknown}",
                    query.panel, query.ref_id, query.expr
                ));
            }
        }
    }
    assert_no_problems(&problems);
}

/// A real Prometheus scrapes a real orchestrator and RabbitMQ's exporter while sagas complete
/// and are compensated, in two waves (a counter's first sample is never a rate: the second
/// wave moves series that already exist). Then every panel query of every dashboard must parse
/// and return a number, each variable's label values must be there, and every alert rule must
/// evaluate without error on the real series.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_returns_data_from_a_real_prometheus() {
    let prometheus_binary = tool("prometheus");
    let exporter = rabbitmq_exporter().await;
    let system = System::start(Options::new(Backend::Sqlite).label("dashboards").env(
        "payments",
        "PAYMENT_LIMIT",
        10_000,
    ))
    .await;
    let server = Prometheus::start(&prometheus_binary, &system, &exporter);
    server.wait_until_scraped("orchestrator").await;
    server.wait_until_scraped("rabbitmq").await;

    for wave in 0..2 {
        let mut ids = Vec::new();
        for (customer, amount) in [("ada", 1_000), ("bob", 50_000), ("cy", 2_000)] {
            let input = order(
                &format!("{customer}-{wave}"),
                amount,
                &[(&unique_sku("mug"), 1)],
            );
            ids.push(system.start_checkout(&input).await);
        }
        let sagas = system.wait_all_settled(&ids, Duration::from_secs(60)).await;
        let statuses: Vec<&str> = sagas.iter().map(status).collect();
        assert_eq!(
            statuses,
            ["completed", "compensated", "completed"],
            "{}",
            sagas.iter().map(pretty).collect::<Vec<_>>().join("\n")
        );
        // Long enough for a few scrapes between the waves.
        tokio::time::sleep(Duration::from_secs(3)).await;
    }

    let mut queries = Vec::new();
    for (path, dashboard) in dashboards() {
        for query in queries_of(&dashboard) {
            let promql = substitute(&dashboard, &query.expr)
                .unwrap_or_else(|unknown| panic!("{}: unknown variable {unknown}", path.display()));
            queries.push((query, promql));
        }
        for variable in variables(&dashboard) {
            if let Some((metric, label)) = label_values(variable) {
                let values = server.label_values(&label, &metric).await;
                assert!(
                    values.iter().any(|v| v == saga_system::CHECKOUT),
                    "{}: variable {}: label_values({metric}, {label}) = {values:?}, without {}",
                    path.display(),
                    variable["name"],
                    saga_system::CHECKOUT
                );
            }
        }
    }
    assert!(!queries.is_empty(), "no panel queries in {DASHBOARDS}");

    // Rates need two samples in their window after the second wave: poll briefly.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut missing = Vec::new();
    loop {
        missing.clear();
        for (query, promql) in &queries {
            // A query Prometheus rejects fails at once: it never gets better.
            let result = server
                .query(promql)
                .await
                .unwrap_or_else(|error| panic!("{query}: Prometheus rejects `{promql}`: {error}"));
            let numbers = result
                .iter()
                .filter_map(|series| series["value"][1].as_str())
                .filter_map(|v| v.parse::<f64>().ok())
                .filter(|v| v.is_finite())
                .count();
            if numbers == 0 {
                missing.push(format!("{query}: `{promql}` returned {result:?}"));
            }
        }
        if missing.is_empty() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(
        missing.is_empty(),
        "{} of {} panel queries returned no number after the run:\n- {}\n\nPrometheus's \
         log:\n{}",
        missing.len(),
        queries.len(),
        missing.join("\n- "),
        server.log_tail()
    );

    // The alert rules ran on the real series, each without error.
    let alerts = alert_names();
    let evaluated = server.rule_health(&alerts).await;
    assert_eq!(
        evaluated.keys().cloned().collect::<BTreeSet<_>>(),
        alerts,
        "every alert of {RULES} is loaded: {evaluated:?}"
    );
    for (alert, (health, error)) in &evaluated {
        assert_eq!(health, "ok", "{alert} fails on the real series: {error}");
    }
}

// ---------------------------------------------------------------------------------------------
// A Prometheus server of the test's own.

struct Prometheus {
    child: Child,
    url: String,
    log: PathBuf,
    client: reqwest::Client,
}

impl Prometheus {
    /// Scraping the system's orchestrator and the exporter's per-queue metrics of the system's
    /// vhost every second, with the alert rules of `deploy/`.
    fn start(binary: &Path, system: &System, exporter: &str) -> Prometheus {
        let dir = system.dir().join("prometheus");
        std::fs::create_dir_all(&dir).expect("a directory for Prometheus");
        let orchestrator = system
            .http_url()
            .trim_start_matches("http://")
            .trim_end_matches('/');
        let exporter = exporter.trim_start_matches("http://");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules:?}\n\
             scrape_configs:\n\
             \x20 - job_name: orchestrator\n\
             \x20   static_configs:\n      - targets: [{orchestrator:?}]\n\
             \x20 - job_name: rabbitmq\n\
             \x20   metrics_path: /metrics/detailed\n\
             \x20   params:\n      family: [queue_coarse_metrics]\n      vhost: [{vhost:?}]\n\
             \x20   static_configs:\n      - targets: [{exporter:?}]\n",
            rules = root().join(RULES).display().to_string(),
            vhost = system.vhost(),
        );
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, &config).expect("the Prometheus configuration");
        let port = free_port().expect("a free port");
        let log = dir.join("prometheus.log");
        let log_file = std::fs::File::create(&log).expect("Prometheus's log");
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", binary.display()));
        Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
            log,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("an HTTP client"),
        }
    }

    /// Waits until the job's target has been scraped successfully (`up == 1`).
    async fn wait_until_scraped(&self, job: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let query = format!("up{{job=\"{job}\"}} == 1");
        while Instant::now() < deadline {
            if self.query(&query).await.is_ok_and(|r| !r.is_empty()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let targets = self.get("/api/v1/targets", &[]).await;
        panic!(
            "Prometheus did not scrape `{job}` within a minute; its targets: {}\nits log:\n{}",
            targets.map_or_else(|e| e, |t| pretty(&t)),
            self.log_tail()
        );
    }

    /// An instant query's result vector, or Prometheus's error.
    async fn query(&self, promql: &str) -> Result<Vec<Value>, String> {
        let body = self.get("/api/v1/query", &[("query", promql)]).await?;
        if body["data"]["resultType"] != "vector" && body["data"]["resultType"] != "scalar" {
            return Err(format!("unexpected answer: {body}"));
        }
        Ok(match &body["data"]["result"] {
            Value::Array(series) => series.clone(),
            // A scalar: `[time, "value"]`, as a vector's one sample.
            scalar => vec![serde_json::json!({ "value": scalar })],
        })
    }

    async fn label_values(&self, label: &str, metric: &str) -> Vec<String> {
        let path = format!("/api/v1/label/{label}/values");
        let body = self
            .get(&path, &[("match[]", metric)])
            .await
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        serde_json::from_value(body["data"].clone()).unwrap_or_default()
    }

    /// `alert → (health, last error)` once every alert of `alerts` has been evaluated.
    async fn rule_health(&self, alerts: &BTreeSet<String>) -> BTreeMap<String, (String, String)> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let body = self
                .get("/api/v1/rules", &[("type", "alert")])
                .await
                .unwrap_or_else(|e| panic!("/api/v1/rules: {e}"));
            let rules: Vec<&Value> = body["data"]["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|g| g["rules"].as_array().into_iter().flatten())
                .collect();
            let health: BTreeMap<String, (String, String)> = rules
                .iter()
                .map(|r| {
                    let field = |k: &str| r[k].as_str().unwrap_or_default().to_owned();
                    (field("name"), (field("health"), field("lastError")))
                })
                .collect();
            let evaluated = alerts
                .iter()
                .all(|a| health.get(a).is_some_and(|(h, _)| h != "unknown"));
            if evaluated || Instant::now() > deadline {
                return health;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn get(&self, path: &str, query: &[(&str, &str)]) -> Result<Value, String> {
        let url = reqwest::Url::parse_with_params(&format!("{}{path}", self.url), query)
            .map_err(|e| format!("{path}: {e}"))?;
        let response = self
            .client
            .get(url.clone())
            .send()
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        let status = response.status();
        let body: Value = response
            .json()
            .await
            .map_err(|e| format!("GET {url}: {status}, not JSON: {e}"))?;
        if body["status"] != "success" {
            return Err(format!(
                "{status}: {} {}",
                body["errorType"].as_str().unwrap_or_default(),
                body["error"].as_str().unwrap_or_default()
            ));
        }
        Ok(body)
    }

    fn log_tail(&self) -> String {
        tail(&self.log, 30)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// RabbitMQ's exporter (the `rabbitmq_prometheus` plugin): `RABBITMQ_PROMETHEUS_URL`, else
/// port 15692 of the broker the tests use. Panics, saying how to enable it, if it does not
/// answer.
async fn rabbitmq_exporter() -> String {
    let url = std::env::var("RABBITMQ_PROMETHEUS_URL").unwrap_or_else(|_| {
        let parts = saga_system::env::amqp_parts(&TestEnv::get().amqp_url)
            .unwrap_or_else(|e| panic!("{e:#}"));
        format!("http://{}:15692", parts.host)
    });
    let answer = reqwest::Client::new()
        .get(format!("{url}/metrics"))
        .timeout(Duration::from_secs(10))
        .send()
        .await;
    match answer {
        Ok(response) if response.status().is_success() => url,
        other => panic!(
            "RabbitMQ's Prometheus exporter does not answer at {url}/metrics ({:?}): the \
             dashboard's dead-letter panel reads it. Enable it with `rabbitmq-plugins enable \
             rabbitmq_prometheus` (scripts/test does), or set RABBITMQ_PROMETHEUS_URL",
            other.map(|r| r.status())
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// The dashboards, as Grafana reads them.

/// One panel query.
struct Query {
    panel: String,
    ref_id: String,
    expr: String,
}

impl std::fmt::Display for Query {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "panel {:?} query {}", self.panel, self.ref_id)
    }
}

fn dashboards() -> Vec<(PathBuf, Value)> {
    let dir = root().join(DASHBOARDS);
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
            let value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
            (path, value)
        })
        .collect()
}

/// Every panel, those inside collapsed rows included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut panels = Vec::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        panels.push(panel);
        panels.extend(panel["panels"].as_array().into_iter().flatten());
    }
    panels
}

fn queries_of(dashboard: &Value) -> Vec<Query> {
    panels(dashboard)
        .into_iter()
        .flat_map(|panel| {
            let title = panel["title"].as_str().unwrap_or("?").to_owned();
            panel["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .map(move |target| Query {
                    panel: title.clone(),
                    ref_id: target["refId"].as_str().unwrap_or("?").to_owned(),
                    expr: target["expr"].as_str().unwrap_or_default().to_owned(),
                })
        })
        .collect()
}

fn variables(dashboard: &Value) -> Vec<&Value> {
    dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .collect()
}

/// `(metric, label)` of a `label_values(metric, label)` variable.
fn label_values(variable: &Value) -> Option<(String, String)> {
    let query = variable["query"]["query"]
        .as_str()
        .or(variable["query"].as_str())?;
    let inner = query
        .trim()
        .strip_prefix("label_values(")?
        .strip_suffix(')')?;
    let (metric, label) = inner.split_once(',')?;
    Some((metric.trim().to_owned(), label.trim().to_owned()))
}

/// `expr` as Grafana sends it with every variable at "All": the dashboard's variables by their
/// `allValue`, Grafana's globals by [`GRAFANA_GLOBALS`]. `Err` names a variable left over.
fn substitute(dashboard: &Value, expr: &str) -> Result<String, String> {
    let mut out = expr.to_owned();
    for (name, value) in GRAFANA_GLOBALS {
        out = out.replace(name, value);
    }
    for variable in variables(dashboard) {
        let name = variable["name"].as_str().unwrap_or_default();
        let all = variable["allValue"].as_str().unwrap_or(".*");
        out = out
            .replace(&format!("${{{name}}}"), all)
            .replace(&format!("${name}"), all);
    }
    match out.find('$') {
        Some(at) => Err(out[at..]
            .chars()
            .take_while(|c| !c.is_whitespace() && !matches!(c, ']' | ')' | '"' | ','))
            .collect()),
        None => Ok(out),
    }
}

/// Problems with a `{type, uid}` datasource reference.
fn check_datasource(uids: &BTreeSet<String>, datasource: &Value, at: &str) -> Option<String> {
    let uid = datasource["uid"].as_str().unwrap_or_default();
    (datasource["type"] != "prometheus" || !uids.contains(uid)).then(|| {
        format!(
            "{at}: datasource {datasource} should be {{\"type\": \"prometheus\", \"uid\": one \
             of {uids:?}}} (provisioned in {DATASOURCES})"
        )
    })
}

/// The uids of the provisioned Prometheus datasources.
fn datasource_uids() -> BTreeSet<String> {
    let yaml = load_yaml(&root().join(DATASOURCES));
    let uids: BTreeSet<String> = sequence(&yaml, "datasources")
        .iter()
        .filter(|d| {
            d.get_scalar("type")
                .is_some_and(|t| t.as_str() == "prometheus")
        })
        .filter_map(|d| d.get_scalar("uid").map(|u| u.as_str().to_owned()))
        .collect();
    assert!(
        !uids.is_empty(),
        "{DATASOURCES}: no Prometheus datasource with a `uid`"
    );
    uids
}

// ---------------------------------------------------------------------------------------------
// Helpers.

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
        .to_path_buf()
}

/// A Prometheus tool on the PATH, or a failure saying how to install it.
fn tool(name: &str) -> PathBuf {
    saga_system::bins::on_path(name).unwrap_or_else(|| {
        panic!(
            "`{name}` is not installed, and these tests validate deploy/ with it. Install \
                 Debian's Prometheus package: `apt-get update && apt-get install -y \
                 --no-install-recommends prometheus` (scripts/test does); it provides \
                 `promtool` and `prometheus`"
        )
    })
}

fn run(command: &mut Command) -> Output {
    command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"))
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The alert names of the rules file.
fn alert_names() -> BTreeSet<String> {
    let rules = load_yaml(&root().join(RULES));
    let names: BTreeSet<String> = sequence(&rules, "groups")
        .iter()
        .flat_map(|group| sequence(group, "rules"))
        .filter_map(|rule| rule.get_scalar("alert").map(|a| a.as_str().to_owned()))
        .collect();
    assert!(!names.is_empty(), "{RULES}: no alerts");
    names
}

/// A YAML file whose top level is a mapping.
fn load_yaml(path: &Path) -> MarkedMappingNode {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    match marked_yaml::parse_yaml(0, &text) {
        Ok(Node::Mapping(map)) => map,
        Ok(_) => panic!("{}: the top level is not a mapping", path.display()),
        Err(e) => panic!("{} is not valid YAML: {e}", path.display()),
    }
}

/// The mappings of the sequence under `key` (none if absent).
fn sequence<'a>(map: &'a MarkedMappingNode, key: &str) -> Vec<&'a MarkedMappingNode> {
    map.get_sequence(key)
        .map(|s| s.iter().filter_map(Node::as_mapping).collect())
        .unwrap_or_default()
}

fn assert_no_problems(problems: &[String]) {
    assert!(
        problems.is_empty(),
        "{} problem(s):\n- {}",
        problems.len(),
        problems.join("\n- ")
    );
}
