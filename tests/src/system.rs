//! A whole system as processes: the orchestrator and the example participants, each with a log
//! file, on a RabbitMQ vhost and databases of the system's own.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use saga_examples::books::{self, Books, Service};
use serde_json::Value;
use uuid::Uuid;

use crate::amqp::Amqp;
use crate::bins;
use crate::env::{TestEnv, with_database, with_vhost};

/// The orchestrator's service name (its log file, its entry in [`Options::env`]).
pub const ORCHESTRATOR: &str = "orchestrator";
/// The example participants, in the order of the `order-checkout` steps.
pub const PARTICIPANTS: [&str; 4] = ["orders", "inventory", "payments", "shipping"];
/// The saga every example participant takes part in.
pub const CHECKOUT: &str = "order-checkout";

/// How long a start waits for `/readyz`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a participant may take to start consuming.
const PARTICIPANT_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stopping process may take after SIGTERM before it gets SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Lines of each log printed when a test fails.
const LOG_TAIL_LINES: usize = 40;

/// Variables the services read, removed from the inherited environment so that nothing from
/// the test's own environment leaks into a service.
const SERVICE_VARS: [&str; 21] = [
    "AMQP_URL",
    "AMQP_CA_FILE",
    "DATABASE_URL",
    "DATABASE_SCHEMA",
    "HTTP_ADDR",
    "CONNECTION_NAME",
    "PREFETCH",
    "SAGA_CONFIG",
    "INITIAL_STOCK",
    "PAYMENT_LIMIT",
    "SHIPPING_FAILURE_RATE",
    "SHIPPING_MAX_FAILURES",
    "LOG_FORMAT",
    "RUST_LOG",
    "API_TOKENS",
    "TOKENS_FILE",
    "METRICS_OPEN",
    "INSECURE_NO_AUTH",
    "MANAGEMENT_URL",
    "HTTP_PROXY",
    "http_proxy",
];

/// Where the orchestrator and the participants keep their state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// One SQLite file per service in the system's directory.
    Sqlite,
    /// One PostgreSQL database per system: the orchestrator in `public`, each participant in a
    /// schema named after it.
    Postgres,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

/// Which vhost the system uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VhostChoice {
    /// A fresh vhost, deleted when the system is dropped (needs the management API).
    Own,
    /// This vhost, deleted and created afresh at start (needs the management API).
    Named(String),
    /// The vhost of the environment's AMQP URL, shared and left as it is.
    FromUrl,
}

/// The saga definition file the orchestrator runs.
#[derive(Debug, Clone)]
pub enum Config {
    /// `orchestrator/sagas.yaml` of this repository.
    Default,
    /// This YAML text, written to `sagas.yaml` in the system's directory.
    Yaml(String),
    /// This file.
    File(PathBuf),
}

/// How to start a [`System`].
#[derive(Debug, Clone)]
pub struct Options {
    pub backend: Backend,
    /// The participants started with the system (the others can be started later with
    /// [`System::start_participant`]).
    pub participants: Vec<String>,
    /// Extra environment per service (`orchestrator` or a participant name).
    pub env: BTreeMap<String, BTreeMap<String, String>>,
    pub config: Config,
    pub vhost: VhostChoice,
    /// A short label for names (vhost, database, directory), e.g. the test's name.
    pub label: String,
    /// Keep the directory (logs, SQLite files) and the vhost after the system stops.
    pub keep: bool,
    /// The directory for logs and SQLite files; a fresh one in the temp directory when `None`.
    pub dir: Option<PathBuf>,
    /// The bearer token the system's own API calls send (see [`Options::api_token`]).
    pub api_token: Option<String>,
}

impl Options {
    /// Every participant, the default definition file, a vhost and databases of its own.
    pub fn new(backend: Backend) -> Self {
        Options {
            backend,
            participants: PARTICIPANTS.iter().map(|p| (*p).to_owned()).collect(),
            env: BTreeMap::new(),
            config: Config::Default,
            vhost: VhostChoice::Own,
            label: "system".into(),
            keep: false,
            dir: None,
            api_token: None,
        }
    }

    /// Does not start `participant` with the system.
    pub fn without(mut self, participant: &str) -> Self {
        self.participants.retain(|p| p != participant);
        self
    }

    /// Starts exactly these participants with the system.
    pub fn participants(mut self, participants: &[&str]) -> Self {
        self.participants = participants.iter().map(|p| (*p).to_owned()).collect();
        self
    }

    /// Sets `key=value` in the environment of `service`.
    pub fn env(mut self, service: &str, key: &str, value: impl ToString) -> Self {
        self.env
            .entry(service.to_owned())
            .or_default()
            .insert(key.to_owned(), value.to_string());
        self
    }

    /// Runs the orchestrator with this definition file text instead of `orchestrator/sagas.yaml`.
    pub fn config_yaml(mut self, yaml: impl Into<String>) -> Self {
        self.config = Config::Yaml(yaml.into());
        self
    }

    /// Runs the orchestrator with one `operate` token named `name`, which the system's own API
    /// calls ([`System::get`], [`System::post_raw`] and those built on them) send.
    pub fn api_token(self, name: &str, token: &str) -> Self {
        let mut opts = self.env(
            ORCHESTRATOR,
            "API_TOKENS",
            format!("{name} operate {token}"),
        );
        opts.api_token = Some(token.to_owned());
        opts
    }

    pub fn label(mut self, label: &str) -> Self {
        self.label = label.to_owned();
        self
    }
}

/// The repository's `orchestrator/sagas.yaml`.
pub fn default_config_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../orchestrator/sagas.yaml")
}

#[derive(Debug)]
enum Db {
    Sqlite,
    Postgres {
        admin_url: String,
        name: String,
        url: String,
    },
}

/// One service's process and its log.
struct Proc {
    child: Child,
    /// Where its log started for this run of the process.
    log_offset: u64,
}

/// A running system: the orchestrator and participants as child processes. Dropping it stops
/// them (SIGTERM, then SIGKILL) and removes the vhost, the database and the directory; when the
/// thread is panicking it first prints the tail of every log and keeps the directory (as it
/// does whenever `SAGA_SYSTEM_KEEP` is set).
pub struct System {
    env: TestEnv,
    opts: Options,
    id: String,
    dir: PathBuf,
    /// The vhost to delete on drop, if this system created it.
    own_vhost: Option<String>,
    vhost: String,
    amqp_url: String,
    db: Db,
    config: PathBuf,
    procs: BTreeMap<String, Proc>,
    http: String,
    client: reqwest::Client,
    stopped: bool,
}

impl System {
    /// Starts a system in the test environment ([`TestEnv::get`]); panics (with the logs) when
    /// it does not come up.
    pub async fn start(opts: Options) -> System {
        match System::launch(TestEnv::get(), opts).await {
            Ok(system) => system,
            Err(error) => panic!("the system did not start: {error:#}"),
        }
    }

    /// Starts a system in `env`: vhost, databases, the orchestrator (waiting for `/readyz`) and
    /// the participants (waiting until they consume).
    pub async fn launch(env: &TestEnv, opts: Options) -> anyhow::Result<System> {
        bins::check_all()?;
        let id = format!(
            "{}-{}",
            sanitize(&opts.label),
            &Uuid::new_v4().simple().to_string()[..12]
        );
        let dir = match &opts.dir {
            Some(dir) => dir.clone(),
            None => std::env::temp_dir().join(format!("saga-system-{id}")),
        };
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let dir = dir.canonicalize().unwrap_or(dir);
        let config = match &opts.config {
            Config::Default => default_config_path(),
            Config::File(path) => path.clone(),
            Config::Yaml(text) => {
                let path = dir.join("sagas.yaml");
                std::fs::write(&path, text)?;
                path
            }
        };
        let mut system = System {
            env: env.clone(),
            id: id.clone(),
            dir,
            own_vhost: None,
            vhost: String::new(),
            amqp_url: env.amqp_url.clone(),
            db: Db::Sqlite,
            config,
            procs: BTreeMap::new(),
            http: String::new(),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .context("an HTTP client")?,
            stopped: false,
            opts,
        };
        // From here on, dropping `system` cleans up whatever was made.
        system.make_vhost().await?;
        if system.opts.backend == Backend::Postgres {
            system.make_database().await?;
        }
        system.spawn_orchestrator()?;
        let participants = system.opts.participants.clone();
        for participant in &participants {
            system.spawn(participant)?;
        }
        system.wait_orchestrator_ready_or_respawn().await?;
        for participant in &participants {
            system.wait_participant_ready(participant).await?;
        }
        Ok(system)
    }

    async fn make_vhost(&mut self) -> anyhow::Result<()> {
        match self.opts.vhost.clone() {
            VhostChoice::FromUrl => {
                self.vhost = self.amqp_url.rsplit('/').next().unwrap_or("%2f").to_owned();
            }
            VhostChoice::Own => {
                let name = format!("saga-system-{}", self.id);
                self.env.management()?.create_vhost(&name).await?;
                self.own_vhost = Some(name.clone());
                self.amqp_url = with_vhost(&self.env.amqp_url, &name);
                self.vhost = name;
            }
            VhostChoice::Named(name) => {
                let management = self.env.management()?;
                management.delete_vhost(&name).await?;
                management.create_vhost(&name).await?;
                if !self.opts.keep {
                    self.own_vhost = Some(name.clone());
                }
                self.amqp_url = with_vhost(&self.env.amqp_url, &name);
                self.vhost = name;
            }
        }
        Ok(())
    }

    async fn make_database(&mut self) -> anyhow::Result<()> {
        let admin_url = self.env.postgres_url()?.to_owned();
        let name = format!("saga_{}", self.id.replace('-', "_"));
        let admin = saga_participant::connect_database(&admin_url, None)
            .await
            .with_context(|| format!("cannot connect to PostgreSQL at {admin_url}"))?;
        use saga_participant::sea_orm::ConnectionTrait;
        admin
            .execute_unprepared(&format!("CREATE DATABASE \"{name}\""))
            .await
            .with_context(|| format!("cannot create database {name}"))?;
        admin.close().await.ok();
        let url = with_database(&admin_url, &name);
        self.db = Db::Postgres {
            admin_url,
            name,
            url,
        };
        Ok(())
    }

    // --- where things are --------------------------------------------------------------------

    /// The backend of the databases.
    pub fn backend(&self) -> Backend {
        self.opts.backend
    }

    /// The system's directory: logs, SQLite files, definition file.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The AMQP URL of the system's vhost.
    pub fn amqp_url(&self) -> &str {
        &self.amqp_url
    }

    /// The system's vhost.
    pub fn vhost(&self) -> &str {
        &self.vhost
    }

    /// The orchestrator's HTTP API, e.g. `http://127.0.0.1:40123`.
    pub fn http_url(&self) -> &str {
        &self.http
    }

    /// The definition file the orchestrator runs.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// The `DATABASE_URL` of `service`.
    pub fn database_url(&self, service: &str) -> String {
        match &self.db {
            Db::Sqlite => format!("sqlite://{}/{service}.db?mode=rwc", self.dir.display()),
            Db::Postgres { url, .. } => url.clone(),
        }
    }

    /// The `DATABASE_SCHEMA` of `service` (participants on PostgreSQL only).
    pub fn database_schema(&self, service: &str) -> Option<String> {
        match (&self.db, service) {
            (Db::Postgres { .. }, s) if s != ORCHESTRATOR => Some(s.to_owned()),
            _ => None,
        }
    }

    /// The AMQP connection name `service` runs with (its `CONNECTION_NAME`, shown in the
    /// management UI): `<service>@<system id>`, unless [`Options::env`] sets another.
    pub fn connection_name(&self, service: &str) -> String {
        self.opts
            .env
            .get(service)
            .and_then(|env| env.get("CONNECTION_NAME"))
            .cloned()
            .unwrap_or_else(|| format!("{service}@{}", self.id))
    }

    /// The log file of `service`.
    pub fn log_path(&self, service: &str) -> PathBuf {
        self.dir.join(format!("{service}.log"))
    }

    /// Whether `service` runs (was started and has not exited).
    pub fn is_running(&mut self, service: &str) -> bool {
        match self.procs.get_mut(service) {
            Some(proc) => matches!(proc.child.try_wait(), Ok(None)),
            None => false,
        }
    }

    // --- processes ---------------------------------------------------------------------------

    fn command(&self, service: &str) -> anyhow::Result<Command> {
        let binary = if service == ORCHESTRATOR {
            ORCHESTRATOR
        } else {
            service
        };
        let mut command = Command::new(bins::find(binary)?);
        command.current_dir(&self.dir).stdin(Stdio::null());
        for var in SERVICE_VARS {
            command.env_remove(var);
        }
        command
            .env("AMQP_URL", &self.amqp_url)
            .env("DATABASE_URL", self.database_url(service))
            .env("CONNECTION_NAME", self.connection_name(service))
            .env(
                "RUST_LOG",
                "info,sqlx=warn,sea_orm=warn,lapin=warn,amq_protocol=warn",
            )
            // Plain text in the log files.
            .env("NO_COLOR", "1");
        if let Some(schema) = self.database_schema(service) {
            command.env("DATABASE_SCHEMA", schema);
        }
        if let Some(extra) = self.opts.env.get(service) {
            command.envs(extra);
        }
        Ok(command)
    }

    fn spawn_with(&mut self, service: &str, mut command: Command) -> anyhow::Result<()> {
        if self.is_running(service) {
            bail!("{service} is already running");
        }
        let path = self.log_path(service);
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        let log_offset = log.seek(SeekFrom::End(0))?;
        writeln!(
            log,
            "===== {service} starting ({:?}) =====",
            command.get_args().collect::<Vec<_>>()
        )?;
        command.stdout(log.try_clone()?).stderr(log);
        // SAFETY: prctl is async-signal-safe; the closure touches nothing else. The child dies
        // with the thread that started it, so a test process killed by hand leaves no orphans.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {service}"))?;
        self.procs
            .insert(service.to_owned(), Proc { child, log_offset });
        Ok(())
    }

    fn spawn(&mut self, service: &str) -> anyhow::Result<()> {
        if service == ORCHESTRATOR {
            return self.spawn_orchestrator();
        }
        let command = self.command(service)?;
        self.spawn_with(service, command)
    }

    fn spawn_orchestrator(&mut self) -> anyhow::Result<()> {
        let port = free_port()?;
        self.http = format!("http://127.0.0.1:{port}");
        let mut command = self.command(ORCHESTRATOR)?;
        command
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .env("HTTP_ADDR", format!("127.0.0.1:{port}"));
        self.spawn_with(ORCHESTRATOR, command)
    }

    /// Starts a second orchestrator process on the same database and vhost (as `name`, with a
    /// connection name of its own) and returns its HTTP URL once it is ready.
    pub async fn start_another_orchestrator(&mut self, name: &str) -> String {
        let result = async {
            let port = free_port()?;
            let mut command = self.command(ORCHESTRATOR)?;
            command
                .arg("run")
                .arg("--config")
                .arg(&self.config)
                .env("HTTP_ADDR", format!("127.0.0.1:{port}"))
                .env("CONNECTION_NAME", format!("{name}@{}", self.id));
            self.spawn_with(name, command)?;
            let url = format!("http://127.0.0.1:{port}");
            let started = Instant::now();
            loop {
                self.check_alive(name)?;
                let ready = self.client.get(format!("{url}/readyz")).send().await;
                if ready.is_ok_and(|r| r.status().is_success()) {
                    return anyhow::Ok(url);
                }
                if started.elapsed() > READY_TIMEOUT {
                    bail!("{name} was not ready within {READY_TIMEOUT:?}");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        .await;
        result.unwrap_or_else(|e| panic!("starting {name}: {e:#}"))
    }

    /// Fails with the log when `service` has exited.
    fn check_alive(&mut self, service: &str) -> anyhow::Result<()> {
        let Some(proc) = self.procs.get_mut(service) else {
            bail!("{service} was never started");
        };
        if let Some(status) = proc.child.try_wait()? {
            bail!(
                "{service} exited ({status}) ; its log:\n{}",
                tail(&self.log_path(service), LOG_TAIL_LINES)
            );
        }
        Ok(())
    }

    /// Waits for `/readyz`; when the orchestrator exited because another process took its
    /// port in the meantime, starts it again on another port (twice at most).
    async fn wait_orchestrator_ready_or_respawn(&mut self) -> anyhow::Result<()> {
        for _ in 0..2 {
            match self.wait_orchestrator_ready().await {
                Err(error) if format!("{error:#}").contains("cannot listen on") => {
                    self.procs.remove(ORCHESTRATOR);
                    self.spawn_orchestrator()?;
                }
                other => return other,
            }
        }
        self.wait_orchestrator_ready().await
    }

    async fn wait_orchestrator_ready(&mut self) -> anyhow::Result<()> {
        let started = Instant::now();
        let url = format!("{}/readyz", self.http);
        loop {
            self.check_alive(ORCHESTRATOR)?;
            if let Ok(response) = self
                .client
                .get(&url)
                .timeout(Duration::from_secs(2))
                .send()
                .await
                && response.status().is_success()
            {
                return Ok(());
            }
            if started.elapsed() > READY_TIMEOUT {
                bail!(
                    "the orchestrator was not ready ({url}) within {READY_TIMEOUT:?}; its log:\n{}",
                    tail(&self.log_path(ORCHESTRATOR), LOG_TAIL_LINES)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the participant logs that it consumes its queue.
    async fn wait_participant_ready(&mut self, participant: &str) -> anyhow::Result<()> {
        let started = Instant::now();
        let offset = self.procs.get(participant).map_or(0, |p| p.log_offset);
        loop {
            self.check_alive(participant)?;
            if read_from(&self.log_path(participant), offset).contains("consuming commands") {
                return Ok(());
            }
            if started.elapsed() > PARTICIPANT_READY_TIMEOUT {
                bail!(
                    "{participant} did not start consuming within {PARTICIPANT_READY_TIMEOUT:?}; its log:\n{}",
                    tail(&self.log_path(participant), LOG_TAIL_LINES)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts `participant` (one not started with the system, or stopped) and waits until it
    /// consumes.
    pub async fn start_participant(&mut self, participant: &str) {
        let result = async {
            self.spawn(participant)?;
            self.wait_participant_ready(participant).await
        }
        .await;
        if let Err(error) = result {
            panic!("cannot start {participant}: {error:#}");
        }
    }

    /// The process id of `service`, while it runs.
    pub fn pid(&mut self, service: &str) -> Option<u32> {
        if !self.is_running(service) {
            return None;
        }
        self.procs.get(service).map(|proc| proc.child.id())
    }

    /// Sends `signal` (e.g. `libc::SIGSTOP`, `libc::SIGCONT`) to `service`; panics when it does
    /// not run.
    pub fn signal(&mut self, service: &str, signal: libc::c_int) {
        let pid = self
            .pid(service)
            .unwrap_or_else(|| panic!("{service} does not run: cannot send it signal {signal}"));
        let pid = libc::pid_t::try_from(pid).expect("a pid fits pid_t");
        // SAFETY: kill(2) on the pid of a child this process has not reaped yet.
        let sent = unsafe { libc::kill(pid, signal) };
        assert_eq!(sent, 0, "kill({pid}, {signal}) for {service} failed");
        append_log(
            &self.log_path(service),
            &format!("===== {service} sent signal {signal} ====="),
        );
    }

    /// Kills the orchestrator with SIGKILL, mid-whatever it was doing.
    pub fn kill_orchestrator(&mut self) {
        self.kill(ORCHESTRATOR);
    }

    /// Kills `service` with SIGKILL.
    pub fn kill(&mut self, service: &str) {
        if let Some(mut proc) = self.procs.remove(service) {
            let _ = proc.child.kill();
            let _ = proc.child.wait();
            append_log(
                &self.log_path(service),
                &format!("===== {service} killed (SIGKILL) ====="),
            );
        }
    }

    /// Stops `service` with SIGTERM (SIGKILL after 10 s) and returns how it exited.
    pub async fn stop(&mut self, service: &str) -> Option<std::process::ExitStatus> {
        let mut proc = self.procs.remove(service)?;
        terminate(&proc.child);
        let started = Instant::now();
        let status = loop {
            if let Ok(Some(status)) = proc.child.try_wait() {
                break Some(status);
            }
            if started.elapsed() > STOP_GRACE {
                let _ = proc.child.kill();
                break proc.child.wait().ok();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        append_log(
            &self.log_path(service),
            &format!("===== {service} stopped: {status:?} ====="),
        );
        status
    }

    /// Starts the orchestrator again (after [`kill_orchestrator`](Self::kill_orchestrator) or
    /// [`stop`](Self::stop)) on a fresh port, and waits for `/readyz`.
    pub async fn restart_orchestrator(&mut self) {
        if self.is_running(ORCHESTRATOR) {
            self.stop(ORCHESTRATOR).await;
        }
        let result = async {
            self.spawn_orchestrator()?;
            self.wait_orchestrator_ready_or_respawn().await
        }
        .await;
        if let Err(error) = result {
            panic!("the orchestrator did not restart: {error:#}");
        }
    }

    /// Runs `orchestrator <args>` to completion against the system's database (e.g.
    /// `["rebuild"]`), its output appended to the orchestrator's log.
    pub fn run_orchestrator_command(&self, args: &[&str]) -> Output {
        let mut command = self.command(ORCHESTRATOR).expect("the orchestrator binary");
        command.args(args);
        let output = command.output().expect("the orchestrator command runs");
        append_log(
            &self.log_path(ORCHESTRATOR),
            &format!(
                "===== orchestrator {args:?}: {} =====\n{}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
        );
        output
    }

    /// The last lines of every log, for failure messages.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        let mut services: Vec<String> = vec![ORCHESTRATOR.to_owned()];
        services.extend(PARTICIPANTS.map(str::to_owned));
        // Processes started under other names (a second orchestrator) have logs too.
        let mut others: Vec<String> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name().to_string_lossy().into_owned();
                name.strip_suffix(".log").map(str::to_owned)
            })
            .filter(|name| !services.contains(name))
            .collect();
        others.sort();
        services.extend(others);
        for service in &services {
            let path = self.log_path(service);
            if path.exists() {
                out.push_str(&format!(
                    "----- {} (last {lines} lines) -----\n",
                    path.display()
                ));
                out.push_str(&tail(&path, lines));
                out.push('\n');
            }
        }
        out
    }

    // --- HTTP --------------------------------------------------------------------------------

    async fn send(&self, request: reqwest::RequestBuilder, what: &str) -> (u16, Value) {
        let request = match &self.opts.api_token {
            Some(token) => request.bearer_auth(token),
            None => request,
        };
        let response = match request.send().await {
            Ok(response) => response,
            // The logs are printed when the system is dropped.
            Err(error) => panic!("{what}: {error}"),
        };
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, body)
    }

    /// `GET <path>` on the orchestrator's API: status and body (JSON, or the text as a string).
    pub async fn get(&self, path: &str) -> (u16, Value) {
        let url = format!("{}{path}", self.http);
        self.send(self.client.get(&url), &format!("GET {url}"))
            .await
    }

    /// `POST <path>` with a raw body.
    pub async fn post_raw(
        &self,
        path: &str,
        body: impl Into<Vec<u8>>,
        headers: &[(&str, &str)],
    ) -> (u16, Value) {
        let url = format!("{}{path}", self.http);
        let mut request = self
            .client
            .post(&url)
            .header("content-type", "application/json")
            .body(body.into());
        for (key, value) in headers {
            request = request.header(*key, *value);
        }
        self.send(request, &format!("POST {url}")).await
    }

    /// `POST /sagas/<name>` with a JSON body and an optional `Idempotency-Key`.
    pub async fn start_named(
        &self,
        name: &str,
        input: &Value,
        idempotency_key: Option<&str>,
    ) -> (u16, Value) {
        let headers: Vec<(&str, &str)> = idempotency_key
            .map(|k| ("idempotency-key", k))
            .into_iter()
            .collect();
        self.post_raw(&format!("/sagas/{name}"), input.to_string(), &headers)
            .await
    }

    /// Starts an `order-checkout` saga: the status code and the answer
    /// (`{saga_id, created, status_url}` on 202).
    pub async fn start_saga(&self, input: &Value, idempotency_key: Option<&str>) -> (u16, Value) {
        self.start_named(CHECKOUT, input, idempotency_key).await
    }

    /// Starts an `order-checkout` saga and returns its id; panics unless the answer is 202.
    pub async fn start_checkout(&self, input: &Value) -> String {
        let (status, body) = self.start_saga(input, None).await;
        assert_eq!(status, 202, "starting a saga with {input}: {body}");
        body["saga_id"]
            .as_str()
            .unwrap_or_else(|| panic!("no saga_id in {body}"))
            .to_owned()
    }

    /// `GET /sagas/<id>`; panics unless 200.
    pub async fn saga(&self, id: &str) -> Value {
        let (status, body) = self.get(&format!("/sagas/{id}")).await;
        assert_eq!(status, 200, "GET /sagas/{id}: {body}");
        body
    }

    /// Polls `GET /sagas/<id>` until `ready(saga)`; panics after `timeout` with the saga and the
    /// logs.
    pub async fn wait_until(
        &self,
        id: &str,
        timeout: Duration,
        what: &str,
        ready: impl Fn(&Value) -> bool,
    ) -> Value {
        let started = Instant::now();
        loop {
            let (status, saga) = self.get(&format!("/sagas/{id}")).await;
            if status == 200 && ready(&saga) {
                return saga;
            }
            if started.elapsed() > timeout {
                panic!(
                    "saga {id} did not {what} within {timeout:?}; it is now:\n{}",
                    pretty(&saga)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the saga is completed, compensated or compensation_failed.
    pub async fn wait_settled(&self, id: &str, timeout: Duration) -> Value {
        self.wait_until(id, timeout, "settle", is_settled).await
    }

    /// Every saga of the list endpoint (all pages), as summaries.
    pub async fn list_all(&self, query: &str) -> Vec<Value> {
        let mut sagas = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut path = format!(
                "/sagas?limit=500{}{query}",
                if query.is_empty() { "" } else { "&" }
            );
            if let Some(cursor) = &cursor {
                path.push_str(&format!("&cursor={cursor}"));
            }
            let (status, body) = self.get(&path).await;
            assert_eq!(status, 200, "GET {path}: {body}");
            sagas.extend(body["sagas"].as_array().cloned().unwrap_or_default());
            match body["next_cursor"].as_str() {
                Some(next) => cursor = Some(next.to_owned()),
                None => return sagas,
            }
        }
    }

    /// Waits until every saga of `ids` is settled (polling the list endpoint), then returns
    /// their full views, in the order of `ids`.
    pub async fn wait_all_settled(&self, ids: &[String], timeout: Duration) -> Vec<Value> {
        let started = Instant::now();
        loop {
            let summaries = self.list_all("").await;
            let settled: std::collections::HashSet<&str> = summaries
                .iter()
                .filter(|s| is_settled(s))
                .filter_map(|s| s["id"].as_str())
                .collect();
            let pending: Vec<&String> = ids
                .iter()
                .filter(|id| !settled.contains(id.as_str()))
                .collect();
            if pending.is_empty() {
                break;
            }
            if started.elapsed() > timeout {
                let first = self.saga(pending[0]).await;
                panic!(
                    "{} of {} sagas did not settle within {timeout:?}; the first of them:\n{}",
                    pending.len(),
                    ids.len(),
                    pretty(&first)
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let mut sagas = Vec::with_capacity(ids.len());
        for id in ids {
            sagas.push(self.saga(id).await);
        }
        sagas
    }

    // --- books and broker --------------------------------------------------------------------

    /// The books of every participant, read from their databases.
    pub async fn books(&self) -> Books {
        let mut all = Books::default();
        for service in Service::ALL {
            let url = self.database_url(service.name());
            let schema = self.database_schema(service.name());
            let db = saga_participant::connect_database(&url, schema.as_deref())
                .await
                .unwrap_or_else(|e| panic!("cannot open the database of {}: {e}", service.name()));
            let books = books::read(service, &db)
                .await
                .unwrap_or_else(|e| panic!("cannot read the books of {}: {e}", service.name()));
            db.close().await.ok();
            all = all.merge(books);
        }
        all
    }

    /// Runs SQL statements on the orchestrator's database (e.g. to damage the read model
    /// before a rebuild); returns the rows affected by each.
    pub async fn orchestrator_sql(&self, statements: &[&str]) -> Vec<u64> {
        use saga_participant::sea_orm::ConnectionTrait;
        let url = self.database_url(ORCHESTRATOR);
        let db = saga_participant::connect_database(&url, None)
            .await
            .unwrap_or_else(|e| panic!("cannot open the orchestrator's database {url}: {e}"));
        let mut affected = Vec::new();
        for sql in statements {
            let result = db
                .execute_unprepared(sql)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
            affected.push(result.rows_affected());
        }
        db.close().await.ok();
        affected
    }

    /// A connection to the system's vhost, with a publisher and a channel for `basic_get`.
    pub async fn amqp(&self) -> Amqp {
        Amqp::connect(&self.amqp_url, &format!("test@{}", self.id))
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {}: {e:#}", self.amqp_url))
    }

    // --- stopping ----------------------------------------------------------------------------

    /// Stops every process (SIGTERM, then SIGKILL), returning each one's exit status.
    pub async fn stop_all(&mut self) -> BTreeMap<String, Option<std::process::ExitStatus>> {
        let services: Vec<String> = self.procs.keys().cloned().collect();
        for service in &services {
            if let Some(proc) = self.procs.get(service) {
                terminate(&proc.child);
            }
        }
        let mut statuses = BTreeMap::new();
        for service in services {
            statuses.insert(service.clone(), self.stop(&service).await);
        }
        statuses
    }

    fn stop_all_blocking(&mut self) {
        for proc in self.procs.values() {
            terminate(&proc.child);
        }
        let started = Instant::now();
        for (_, mut proc) in std::mem::take(&mut self.procs) {
            loop {
                if let Ok(Some(_)) = proc.child.try_wait() {
                    break;
                }
                if started.elapsed() > STOP_GRACE {
                    let _ = proc.child.kill();
                    let _ = proc.child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl Drop for System {
    fn drop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        let panicking = std::thread::panicking();
        self.stop_all_blocking();
        if panicking {
            eprintln!(
                "\n===== system {} ({}) failed; logs in {} =====\n{}",
                self.id,
                self.opts.backend.name(),
                self.dir.display(),
                self.log_tails(LOG_TAIL_LINES)
            );
        }
        let management = self.env.management.clone();
        let vhost = self.own_vhost.take();
        let database = match &self.db {
            Db::Postgres {
                admin_url, name, ..
            } => Some((admin_url.clone(), name.clone())),
            Db::Sqlite => None,
        };
        // Drop may run inside a runtime: do the async clean-up on a thread with its own.
        let cleanup = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async move {
                if let (Some(vhost), Some(management)) = (vhost, management)
                    && let Err(error) = management.delete_vhost(&vhost).await
                {
                    eprintln!("warning: cannot delete vhost {vhost}: {error:#}");
                }
                if let Some((admin_url, name)) = database
                    && let Err(error) = drop_database(&admin_url, &name).await
                {
                    eprintln!("warning: cannot drop database {name}: {error:#}");
                }
            });
        });
        let _ = cleanup.join();
        let keep = self.opts.keep || panicking || std::env::var_os("SAGA_SYSTEM_KEEP").is_some();
        if keep {
            if !self.opts.keep {
                eprintln!("system {}: logs kept in {}", self.id, self.dir.display());
            }
        } else if self.opts.dir.is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

async fn drop_database(admin_url: &str, name: &str) -> anyhow::Result<()> {
    use saga_participant::sea_orm::{ConnectionTrait, DbBackend, Statement};
    let admin = saga_participant::connect_database(admin_url, None).await?;
    admin
        .execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            [name.into()],
        ))
        .await?;
    admin
        .execute_unprepared(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .await?;
    admin.close().await.ok();
    Ok(())
}

/// Sends SIGTERM.
fn terminate(child: &Child) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill(2) on the pid of a child this process has not reaped yet.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
}

/// A TCP port that was free a moment ago (the orchestrator cannot listen on port 0), never the
/// same one twice in this process, so that two systems never poll each other's orchestrator.
pub fn free_port() -> anyhow::Result<u16> {
    static HANDED_OUT: std::sync::Mutex<BTreeSet<u16>> = std::sync::Mutex::new(BTreeSet::new());
    for _ in 0..100 {
        let listener =
            std::net::TcpListener::bind("127.0.0.1:0").context("cannot find a free port")?;
        let port = listener.local_addr()?.port();
        if HANDED_OUT
            .lock()
            .map_err(|_| anyhow::anyhow!("port lock poisoned"))?
            .insert(port)
        {
            return Ok(port);
        }
    }
    bail!("no fresh free port found")
}

fn sanitize(label: &str) -> String {
    let cleaned: String = label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(24)
        .collect();
    if cleaned.is_empty() {
        "system".into()
    } else {
        cleaned
    }
}

fn read_from(path: &Path, offset: u64) -> String {
    let mut text = String::new();
    if let Ok(mut file) = File::open(path)
        && file.seek(SeekFrom::Start(offset)).is_ok()
    {
        let mut bytes = Vec::new();
        let _ = file.read_to_end(&mut bytes);
        text = String::from_utf8_lossy(&bytes).into_owned();
    }
    text
}

/// The last `lines` lines of a file.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = read_from(path, 0);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn append_log(path: &Path, line: &str) {
    if let Ok(mut file) = OpenOptions::new().create(true).append(true).open(path) {
        let _ = writeln!(file, "{line}");
    }
}

/// Pretty JSON, for failure messages.
pub fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
}

/// Whether a saga (view or summary) is completed, compensated, or waits for an operator
/// (compensation_failed, completion_failed).
pub fn is_settled(saga: &Value) -> bool {
    matches!(
        saga["status"].as_str(),
        Some("completed" | "compensated" | "compensation_failed" | "completion_failed")
    )
}
