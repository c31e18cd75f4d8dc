//! The three-node RabbitMQ cluster of `scripts/rabbit-cluster` (`tests/tests/cluster.rs`): where
//! its nodes are, which node leads a queue, and killing a node (`kill -9`) and bringing it back.
//!
//! The scenario runs on the fault suite's machinery ([`Run::start_in`](crate::faults::Run)):
//! the same load, watchers and checks, on a [`FaultEnv`] whose AMQP URL lists the three nodes.
//!
//! ```text
//! let cluster = ClusterEnv::ready().await;
//! let vhost = cluster.fresh_vhost("cluster-kill").await?;
//! let mut run = Run::start_in(cluster.fault_env(&vhost), ...).await;
//! let leader = cluster.queue_leader(&vhost, "saga.replies").await?;
//! let killed = cluster.kill(leader)?;
//! ...
//! cluster.restart(leader, &vhost, "saga.replies").await?;
//! ```

use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

use crate::env::{Management, TestEnv, management_from_url, with_vhost};
use crate::faults::FaultEnv;
use crate::management::encode_segment;

/// What to do when the cluster does not answer.
pub const RUN_RABBIT_CLUSTER: &str = "run `scripts/rabbit-cluster` as root first: it starts \
     the three-node RabbitMQ cluster (saga-cluster{1,2,3}@localhost, AMQP 5681-5683, management \
     15681-15683, data under /var/tmp/saga-cluster) and prints the CLUSTER_* variables; or point \
     CLUSTER_AMQP_URL, CLUSTER_NODES, CLUSTER_MANAGEMENT_URLS and CLUSTER_BASE at a cluster of \
     your own whose nodes the test may kill";

/// Sagas of the scenario unless `CLUSTER_SAGAS` says otherwise.
pub const DEFAULT_SAGAS: usize = 300;

/// The vhosts the cluster test makes start with this; leftovers of a run cut short are deleted.
pub const VHOST_PREFIX: &str = "saga-cluster-test-";

/// One node of the cluster.
#[derive(Debug, Clone)]
pub struct Node {
    /// e.g. `saga-cluster1@localhost`.
    pub name: String,
    /// Its own AMQP URL (vhost `/`).
    pub amqp_url: String,
    /// Its management API.
    pub management: Management,
    /// Its data directory, which holds `node.pid`.
    pub dir: PathBuf,
}

/// The cluster, from `CLUSTER_*` variables.
#[derive(Debug, Clone)]
pub struct ClusterEnv {
    pub nodes: Vec<Node>,
    /// Every node's AMQP URL, comma-separated (what the services get, with the vhost replaced).
    pub amqp_url: String,
    /// `CLUSTER_DATABASE_URL`, else `DATABASE_URL`: a PostgreSQL server the test may create a
    /// database on (not part of the fault: it is never stopped).
    pub postgres_url: String,
    /// `CLUSTER_SAGAS`.
    pub sagas: usize,
    /// `scripts/rabbit-cluster`, which starts the nodes that are not running.
    pub script: PathBuf,
    /// The lock [`ready`](Self::ready) holds: one cluster test at a time on this machine, in
    /// any process (two killing nodes at once would take the majority down).
    lock: Option<Arc<std::fs::File>>,
}

fn var(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_owned())
}

fn list(value: &str) -> Vec<String> {
    value.split(',').map(|s| s.trim().to_owned()).collect()
}

impl ClusterEnv {
    /// Reads `CLUSTER_AMQP_URL`, `CLUSTER_NODES`, `CLUSTER_MANAGEMENT_URLS` (lists in node
    /// order), `CLUSTER_BASE` (node N's data in `<base>/nodeN`), `CLUSTER_DATABASE_URL` and
    /// `CLUSTER_SAGAS`, with the defaults of `scripts/rabbit-cluster`.
    pub fn from_env() -> anyhow::Result<ClusterEnv> {
        let amqp_url = var(
            "CLUSTER_AMQP_URL",
            "amqp://guest:guest@127.0.0.1:5681/%2f,amqp://guest:guest@127.0.0.1:5682/%2f,\
             amqp://guest:guest@127.0.0.1:5683/%2f",
        );
        let names = list(&var(
            "CLUSTER_NODES",
            "saga-cluster1@localhost,saga-cluster2@localhost,saga-cluster3@localhost",
        ));
        let managements = list(&var(
            "CLUSTER_MANAGEMENT_URLS",
            "http://127.0.0.1:15681,http://127.0.0.1:15682,http://127.0.0.1:15683",
        ));
        let base = PathBuf::from(var("CLUSTER_BASE", "/var/tmp/saga-cluster"));
        let urls = list(&amqp_url);
        if urls.len() != names.len() || urls.len() != managements.len() || urls.len() < 3 {
            bail!(
                "CLUSTER_AMQP_URL ({} entries), CLUSTER_NODES ({}) and CLUSTER_MANAGEMENT_URLS \
                 ({}) must list the same nodes, three or more, in the same order",
                urls.len(),
                names.len(),
                managements.len()
            );
        }
        let mut nodes = Vec::new();
        for (i, ((url, name), management)) in urls.iter().zip(&names).zip(&managements).enumerate()
        {
            nodes.push(Node {
                name: name.clone(),
                amqp_url: url.clone(),
                management: management_from_url(management, url)
                    .context("CLUSTER_MANAGEMENT_URLS")?,
                dir: base.join(format!("node{}", i + 1)),
            });
        }
        let postgres_url = var(
            "CLUSTER_DATABASE_URL",
            &var(
                "DATABASE_URL",
                "postgres://postgres@127.0.0.1:5432/postgres",
            ),
        );
        let sagas = var("CLUSTER_SAGAS", &DEFAULT_SAGAS.to_string());
        let sagas: usize =
            sagas.parse().ok().filter(|n| *n >= 10).with_context(|| {
                format!("CLUSTER_SAGAS={sagas:?}: expected a number, 10 or more")
            })?;
        Ok(ClusterEnv {
            nodes,
            amqp_url,
            postgres_url,
            sagas,
            script: Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/rabbit-cluster"),
            lock: None,
        })
    }

    /// The cluster, every node answering and seeing the others running; otherwise a failing
    /// test saying what to run. Never a silent skip. Waits for the cluster tests of other
    /// processes first, and keeps others waiting while the returned value (or a clone) lives.
    pub async fn ready() -> ClusterEnv {
        let mut cluster = ClusterEnv::from_env().unwrap_or_else(|e| panic!("{e:#}"));
        cluster.lock = Some(Arc::new(
            exclusive_lock().await.unwrap_or_else(|e| panic!("{e:#}")),
        ));
        let problems = cluster.probe().await;
        if !problems.is_empty() {
            panic!(
                "the RabbitMQ cluster does not answer:\n  {}\n{RUN_RABBIT_CLUSTER}",
                problems.join("\n  ")
            );
        }
        cluster
    }

    /// What does not answer, one line each.
    async fn probe(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for node in &self.nodes {
            let amqp = tokio::time::timeout(
                Duration::from_secs(10),
                saga_amqp::connect(&node.amqp_url, "cluster-test-probe"),
            )
            .await;
            match amqp {
                Ok(Ok(connection)) => {
                    let _ = connection.close(200, "probe".into()).await;
                }
                Ok(Err(e)) => problems.push(format!("{} at {}: {e}", node.name, node.amqp_url)),
                Err(_) => problems.push(format!(
                    "{} at {}: no answer within 10s",
                    node.name, node.amqp_url
                )),
            }
            match self.running_nodes(&node.management).await {
                Ok(running) => {
                    for other in &self.nodes {
                        if !running.contains(&other.name) {
                            problems.push(format!(
                                "{} does not see {} running in its cluster (it sees {running:?})",
                                node.name, other.name
                            ));
                        }
                    }
                }
                Err(e) => problems.push(format!(
                    "{}'s management API at {}: {e:#}",
                    node.name, node.management.url
                )),
            }
        }
        problems
    }

    /// The nodes `management` reports running (`GET /api/nodes`).
    async fn running_nodes(&self, management: &Management) -> anyhow::Result<Vec<String>> {
        let nodes = management.get_json("/api/nodes").await?;
        Ok(nodes
            .as_array()
            .into_iter()
            .flatten()
            .filter(|n| n["running"] == true)
            .filter_map(|n| n["name"].as_str().map(str::to_owned))
            .collect())
    }

    /// The management API of the first node that answers, other than `except`.
    pub async fn management(&self, except: Option<&str>) -> anyhow::Result<&Management> {
        for node in &self.nodes {
            if Some(node.name.as_str()) != except && node.management.available().await {
                return Ok(&node.management);
            }
        }
        bail!("no management API of the cluster answers")
    }

    /// The node named `name`.
    pub fn node(&self, name: &str) -> anyhow::Result<&Node> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .with_context(|| format!("{name} is not one of the cluster's nodes"))
    }

    /// A fresh vhost (cluster-wide) with every permission for the management user, after
    /// deleting those an earlier run cut short left behind (no other cluster test runs: see
    /// [`ready`](Self::ready)).
    pub async fn fresh_vhost(&self, label: &str) -> anyhow::Result<String> {
        let management = self.management(None).await?;
        let vhosts = management.get_json("/api/vhosts").await?;
        for name in vhosts
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v["name"].as_str())
            .filter(|name| name.starts_with(VHOST_PREFIX))
        {
            management.delete_vhost(name).await?;
        }
        let name = format!(
            "{VHOST_PREFIX}{label}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        management.create_vhost(&name).await?;
        Ok(name)
    }

    /// Deletes `vhost` (and its queues) through any node that answers.
    pub async fn delete_vhost(&self, vhost: &str) -> anyhow::Result<()> {
        self.management(None).await?.delete_vhost(vhost).await
    }

    /// The cluster as the fault suite's services: the AMQP URL lists every node with `vhost`
    /// (the system must use it as it is: [`VhostChoice::FromUrl`](crate::VhostChoice)), the
    /// management API of the first node, PostgreSQL at [`postgres_url`](Self::postgres_url).
    /// `node` and `pg_cluster` are unused: the cluster scenario restarts neither a node's
    /// application nor PostgreSQL.
    pub fn fault_env(&self, vhost: &str) -> FaultEnv {
        let amqp_url = list(&self.amqp_url)
            .iter()
            .map(|url| with_vhost(url, vhost))
            .collect::<Vec<_>>()
            .join(",");
        FaultEnv {
            env: TestEnv {
                amqp_url,
                management: Some(self.nodes[0].management.clone()),
                postgres_url: Some(self.postgres_url.clone()),
            },
            node: self.nodes[0].name.clone(),
            pg_cluster: (String::new(), String::new()),
            sagas: self.sagas,
        }
    }

    /// `GET /api/queues/{vhost}/{queue}` from a node other than `except`.
    async fn queue(&self, vhost: &str, queue: &str, except: Option<&str>) -> anyhow::Result<Value> {
        self.management(except)
            .await?
            .get_json(&format!(
                "/api/queues/{}/{}",
                encode_segment(vhost),
                encode_segment(queue)
            ))
            .await
    }

    /// The node that leads `queue`, which must be a quorum queue with a member on every node.
    pub async fn queue_leader(&self, vhost: &str, queue: &str) -> anyhow::Result<&Node> {
        let started = Instant::now();
        loop {
            let q = self.queue(vhost, queue, None).await?;
            if q["type"] != "quorum" {
                bail!(
                    "{queue} is a {} queue, not a quorum queue: a node's death would lose what \
                     it holds",
                    q["type"]
                );
            }
            let members = q["members"].as_array().map_or(0, Vec::len);
            if members != self.nodes.len() {
                bail!(
                    "{queue} has {members} members, not one on each of the {} nodes: {}",
                    self.nodes.len(),
                    q["members"]
                );
            }
            // The statistics may not name it yet, right after an election.
            if let Some(leader) = q["leader"].as_str() {
                return self.node(leader);
            }
            if started.elapsed() > Duration::from_secs(60) {
                bail!("{queue} has had no leader for 60 s: {q}");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// `kill -9` of `node`'s OS process (from its `node.pid`, checked to be that node's
    /// `beam.smp`, so nothing else on the machine is touched); returns the pid.
    pub fn kill(&self, node: &Node) -> anyhow::Result<u32> {
        let pid_file = node.dir.join("node.pid");
        let pid: u32 = std::fs::read_to_string(&pid_file)
            .with_context(|| format!("reading {}", pid_file.display()))?
            .trim()
            .parse()
            .with_context(|| format!("{} holds no pid", pid_file.display()))?;
        let environ = std::fs::read(format!("/proc/{pid}/environ"))
            .with_context(|| format!("{} is not running (pid {pid})", node.name))?;
        let expected = format!("RABBITMQ_NODENAME={}", node.name);
        if !environ.split(|b| *b == 0).any(|v| v == expected.as_bytes()) {
            bail!(
                "pid {pid} of {} is not {}'s Erlang VM: not killing it",
                pid_file.display(),
                node.name
            );
        }
        let pid_t = libc::pid_t::try_from(pid).context("a pid out of range")?;
        // SAFETY: kill(2) with a pid checked above.
        if unsafe { libc::kill(pid_t, libc::SIGKILL) } != 0 {
            bail!(
                "kill -9 {pid} ({}): {}",
                node.name,
                std::io::Error::last_os_error()
            );
        }
        Ok(pid)
    }

    /// Waits until a node other than `old` leads `queue`, as the survivors report it; returns
    /// it and how long that took from `since`.
    pub async fn wait_new_leader(
        &self,
        vhost: &str,
        queue: &str,
        old: &str,
        since: Instant,
    ) -> anyhow::Result<(String, Duration)> {
        loop {
            if let Ok(q) = self.queue(vhost, queue, Some(old)).await
                && let Some(leader) = q["leader"].as_str()
                && leader != old
            {
                return Ok((leader.to_owned(), since.elapsed()));
            }
            if since.elapsed() > Duration::from_secs(90) {
                bail!("{queue} has no leader other than the dead {old} after 90 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Starts `node` again with `scripts/rabbit-cluster` (which starts only the nodes that do not
    /// run) and waits until the others see it running and it is back among `queue`'s online
    /// members; returns how long that took.
    pub async fn restart(&self, node: &Node, vhost: &str, queue: &str) -> anyhow::Result<Duration> {
        let started = Instant::now();
        run_script(&self.script).await?;
        loop {
            let back = async {
                let running = self
                    .running_nodes(self.management(Some(&node.name)).await?)
                    .await?;
                let q = self.queue(vhost, queue, None).await?;
                let online = q["online"]
                    .as_array()
                    .is_some_and(|o| o.iter().any(|m| m == node.name.as_str()));
                anyhow::Ok(running.contains(&node.name) && online)
            }
            .await;
            if matches!(back, Ok(true)) {
                return Ok(started.elapsed());
            }
            if started.elapsed() > Duration::from_secs(180) {
                bail!(
                    "{} is not back in the cluster and among {queue}'s online members 180 s \
                     after its restart: {back:?}",
                    node.name
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// An exclusive `flock` on `saga-cluster-test.lock` in the temp directory, released when the
/// file closes.
async fn exclusive_lock() -> anyhow::Result<std::fs::File> {
    let path = std::env::temp_dir().join("saga-cluster-test.lock");
    tokio::task::spawn_blocking(move || {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: flock(2) on a descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            bail!(
                "flock {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
        Ok(file)
    })
    .await
    .context("the lock task")?
}

async fn run_script(script: &Path) -> anyhow::Result<()> {
    let output = tokio::time::timeout(
        Duration::from_secs(300),
        tokio::process::Command::new(script)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .with_context(|| format!("{}: no end within 300 s", script.display()))?
    .with_context(|| format!("cannot run {}", script.display()))?;
    if !output.status.success() {
        bail!(
            "{}: {}: {}{}",
            script.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// Starts the killed node again if dropped while armed: a scenario that fails with a node down
/// leaves the cluster whole for the next run.
pub struct RestartOnDrop {
    script: PathBuf,
    pub armed: bool,
}

impl RestartOnDrop {
    pub fn new(cluster: &ClusterEnv) -> Self {
        RestartOnDrop {
            script: cluster.script.clone(),
            armed: true,
        }
    }
}

impl Drop for RestartOnDrop {
    fn drop(&mut self) {
        if self.armed {
            let _ = std::process::Command::new(&self.script)
                .stdin(std::process::Stdio::null())
                .output();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_services_get_every_node_with_the_vhost() {
        let cluster = ClusterEnv {
            nodes: Vec::new(),
            amqp_url: "amqp://u:p@h:1/%2f,amqp://u:p@h:2/%2f,amqp://u:p@h:3/%2f".into(),
            postgres_url: "postgres://h/db".into(),
            sagas: 10,
            script: PathBuf::new(),
            lock: None,
        };
        let cluster = ClusterEnv {
            nodes: vec![Node {
                name: "n1@h".into(),
                amqp_url: "amqp://u:p@h:1/%2f".into(),
                management: management_from_url("http://h:11/", "amqp://u:p@h:1/%2f").unwrap(),
                dir: PathBuf::new(),
            }],
            ..cluster
        };
        let env = cluster.fault_env("v1");
        assert_eq!(
            env.env.amqp_url,
            "amqp://u:p@h:1/v1,amqp://u:p@h:2/v1,amqp://u:p@h:3/v1"
        );
        let management = env.env.management.unwrap();
        assert_eq!(
            (management.url.as_str(), management.user.as_str()),
            ("http://h:11", "u")
        );
    }
}
