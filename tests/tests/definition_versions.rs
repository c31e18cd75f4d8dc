//! Definition versions: the file is edited while sagas start (a step added, one removed, a
//! participant renamed) and the orchestrator restarted; every saga runs exactly the steps of
//! the version it started on, the old version's participants included, and the old version can
//! be pruned only once no saga runs on it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use saga_participant::{CancellationToken, Participant, SdkConfig, success};
use saga_system::checkout::{events, status};
use saga_system::{Backend, Options, System, pretty};
use serde_json::{Value, json};

const SAGA: &str = "versioned";

/// Version 1: `first` at `one`, `second` at `two`, `third` at `three`.
const V1: &str = "sagas:
  - name: versioned
    steps:
      - { name: first, participant: one, action: do_first, compensation: undo_first, timeout: 5s }
      - { name: second, participant: two, action: do_second, compensation: undo_second, timeout: 5s }
      - { name: third, participant: three, action: do_third, kind: pivot, timeout: 5s }
";

/// Version 2: `second` removed, `third` moved to the participant renamed `tres`, `fourth`
/// added at `four`.
const V2: &str = "sagas:
  - name: versioned
    steps:
      - { name: first, participant: one, action: do_first, compensation: undo_first, timeout: 5s }
      - { name: third, participant: tres, action: do_third, kind: pivot, timeout: 5s }
      - { name: fourth, participant: four, action: do_fourth, kind: retriable, timeout: 5s }
";

/// Steps of each version as (step, participant), in order.
fn steps_of(version: u8) -> Vec<(&'static str, &'static str)> {
    match version {
        1 => vec![("first", "one"), ("second", "two"), ("third", "three")],
        _ => vec![("first", "one"), ("third", "tres"), ("fourth", "four")],
    }
}

/// What the participants handled: saga id → (participant, action), each once whatever the
/// redeliveries.
type Handled = Arc<Mutex<BTreeMap<String, BTreeSet<(String, String)>>>>;

/// A participant that records every action it runs and succeeds.
fn spawn_participant(
    system: &System,
    name: &'static str,
    actions: &[&'static str],
    handled: &Handled,
    shutdown: &CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let mut participant = Participant::new(name);
    for &action in actions {
        let handled = handled.clone();
        participant = participant.action(action, move |cmd, _tx| {
            let handled = handled.clone();
            Box::pin(async move {
                handled
                    .lock()
                    .unwrap()
                    .entry(cmd.saga_id.to_string())
                    .or_default()
                    .insert((name.to_owned(), action.to_owned()));
                Ok(success(json!({})))
            })
        });
        if let Some(undo) = action.strip_prefix("do_") {
            participant = participant.compensation(format!("undo_{undo}"), |_, _| {
                Box::pin(async { Ok(success(())) })
            });
        }
    }
    let mut config = SdkConfig::new(name);
    config.amqp_url = system.amqp_url().into();
    config.database_url = format!(
        "sqlite://{}?mode=rwc",
        system.dir().join(format!("{name}.db")).display()
    )
    .into();
    let shutdown = shutdown.clone();
    tokio::spawn(async move {
        participant
            .run(config, shutdown)
            .await
            .unwrap_or_else(|e| panic!("participant {name}: {e:#}"));
    })
}

/// Starts sagas one after another at `url` until `stop` is cancelled or the orchestrator stops
/// answering; returns the ids it was told.
fn start_sagas(url: String, stop: CancellationToken) -> tokio::task::JoinHandle<Vec<String>> {
    tokio::spawn(async move {
        let client = reqwest::Client::new();
        let mut ids = Vec::new();
        while !stop.is_cancelled() {
            let answer = client
                .post(format!("{url}/sagas/{SAGA}"))
                .json(&json!({ "n": ids.len() }))
                .send()
                .await;
            let Ok(answer) = answer else { break };
            let body: Value = answer.json().await.unwrap_or_default();
            match body["saga_id"].as_str() {
                Some(id) => ids.push(id.to_owned()),
                None => break,
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        ids
    })
}

async fn definitions(system: &System) -> Vec<Value> {
    let (code, body) = system.get("/definitions").await;
    assert_eq!(code, 200, "{body}");
    body["definitions"].as_array().cloned().unwrap_or_default()
}

/// The version (1 or 2) whose steps a `GET /definitions` entry lists.
fn version_number(entry: &Value) -> u8 {
    let steps: Vec<&str> = entry["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    match steps.as_slice() {
        ["first", "second", "third"] => 1,
        ["first", "third", "fourth"] => 2,
        other => panic!("a version with steps {other:?}"),
    }
}

async fn each_saga_follows_its_own_version(backend: Backend) {
    let mut system = System::start(
        Options::new(backend)
            .label("versions")
            .participants(&[])
            .config_yaml(V1),
    )
    .await;
    let handled: Handled = Arc::default();
    let shutdown = CancellationToken::new();
    let mut participants = vec![
        spawn_participant(&system, "one", &["do_first"], &handled, &shutdown),
        spawn_participant(&system, "three", &["do_third"], &handled, &shutdown),
    ];

    // Version 1 under load; `two` is down, so every saga of it waits at `second`.
    let stop = CancellationToken::new();
    let starter = start_sagas(system.http_url().to_owned(), stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    std::fs::write(system.config_path(), V2).expect("the definition file is writable");
    tokio::time::sleep(Duration::from_millis(300)).await;
    system.kill_orchestrator();
    let v1_ids = starter.await.expect("the starter");
    assert!(v1_ids.len() >= 3, "only {} sagas started", v1_ids.len());
    system.restart_orchestrator().await;

    participants.push(spawn_participant(
        &system,
        "tres",
        &["do_third"],
        &handled,
        &shutdown,
    ));
    participants.push(spawn_participant(
        &system,
        "four",
        &["do_fourth"],
        &handled,
        &shutdown,
    ));
    let stop = CancellationToken::new();
    let starter = start_sagas(system.http_url().to_owned(), stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Both versions listed; version 1 cannot be pruned while its sagas wait.
    let listed = definitions(&system).await;
    let v1 = listed
        .iter()
        .find(|d| version_number(d) == 1)
        .unwrap_or_else(|| panic!("version 1 is listed: {listed:?}"))
        .clone();
    let v1_version = v1["version"].as_str().unwrap().to_owned();
    assert_eq!(v1["current"], false, "{v1}");
    assert!(
        v1["in_flight"].as_u64().unwrap() >= v1_ids.len() as u64,
        "{v1}"
    );
    let refused = system.run_orchestrator_command(&["prune-definitions", &v1_version]);
    assert!(!refused.status.success(), "pruned with sagas in flight");
    assert!(
        String::from_utf8_lossy(&refused.stdout).contains("still run on it"),
        "{}",
        String::from_utf8_lossy(&refused.stdout)
    );

    participants.push(spawn_participant(
        &system,
        "two",
        &["do_second"],
        &handled,
        &shutdown,
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    let v2_ids = starter.await.expect("the starter");
    assert!(!v2_ids.is_empty(), "no saga started after the restart");

    // Every saga, including any whose start answer was lost in the kill, runs its own steps.
    let all: Vec<String> = system
        .list_all("")
        .await
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect();
    let sagas = system
        .wait_all_settled(&all, Duration::from_secs(120))
        .await;
    let versions: BTreeMap<String, u8> = definitions(&system)
        .await
        .iter()
        .map(|d| (d["version"].as_str().unwrap().to_owned(), version_number(d)))
        .collect();
    let handled = handled.lock().unwrap().clone();
    let mut per_version = BTreeMap::<u8, usize>::new();
    for saga in &sagas {
        let show = pretty(saga);
        assert_eq!(status(saga), "completed", "{show}");
        let version = versions[saga["definition_version"].as_str().unwrap()];
        *per_version.entry(version).or_default() += 1;
        let expected = steps_of(version);
        let sent: Vec<String> = events(saga, "command_sent")
            .iter()
            .map(|e| e["step"].as_str().unwrap().to_owned())
            .fold(Vec::new(), |mut steps, step| {
                if steps.last() != Some(&step) {
                    steps.push(step);
                }
                steps
            });
        let names: Vec<&str> = expected.iter().map(|(step, _)| *step).collect();
        assert_eq!(sent, names, "version {version}:\n{show}");
        let ran: BTreeSet<(String, String)> = expected
            .iter()
            .map(|(step, participant)| ((*participant).to_owned(), format!("do_{step}")))
            .collect();
        let id = saga["id"].as_str().unwrap();
        assert_eq!(handled.get(id), Some(&ran), "version {version}:\n{show}");
    }
    for id in &v1_ids {
        let saga = sagas.iter().find(|s| s["id"] == id.as_str()).unwrap();
        assert_eq!(
            saga["definition_version"], v1_version,
            "started before the edit"
        );
    }
    assert!(
        per_version.get(&2).copied().unwrap_or(0) >= v2_ids.len(),
        "{per_version:?}"
    );

    // Now nothing runs on version 1: it can go; the current version cannot.
    let pruned = system.run_orchestrator_command(&["prune-definitions", &v1_version]);
    let out = String::from_utf8_lossy(&pruned.stdout);
    assert!(pruned.status.success(), "{out}");
    assert!(out.contains("pruned"), "{out}");
    let listed = definitions(&system).await;
    let v1 = listed
        .iter()
        .find(|d| d["version"] == v1_version.as_str())
        .unwrap_or_else(|| panic!("its sagas still name version 1: {listed:?}"));
    assert_eq!(v1["stored"], false, "{v1}");
    let current = listed.iter().find(|d| d["current"] == true).unwrap();
    let kept = system
        .run_orchestrator_command(&["prune-definitions", current["version"].as_str().unwrap()]);
    assert!(!kept.status.success(), "the current version was pruned");
    let table = system.run_orchestrator_command(&["definitions"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("first → third → fourth") && table.contains("current"),
        "{table}"
    );

    shutdown.cancel();
    for participant in participants {
        participant.await.expect("a participant stops cleanly");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_saga_follows_its_own_version_sqlite() {
    each_saga_follows_its_own_version(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_saga_follows_its_own_version_postgres() {
    each_saga_follows_its_own_version(Backend::Postgres).await;
}
