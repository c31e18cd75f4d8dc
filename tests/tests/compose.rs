//! The container set-up, checked without a Docker engine.
//!
//! - `docker-compose.yml` against the binaries it runs: each service built from the Dockerfile
//!   runs a real binary, with flags and environment variables that binary really takes (read
//!   from its own `--help`: clap's `[env: NAME=...]` annotations).
//! - The wiring: published port = `HTTP_ADDR` port, the mounted definitions = `SAGA_CONFIG`, URLs
//!   pointing at the compose services with the database's credentials, `service_healthy`
//!   dependencies on checked services, a schema of its own for each participant.
//! - The `observability` profile: Prometheus and Grafana only under it, their mounted files in
//!   the repository, scrape targets and datasources naming compose services on the right
//!   ports, RabbitMQ's exporter plugin enabled.
//! - The file as a real compose implementation reads it: `docker-compose config -q`, with and
//!   without the profile.
//! - The Dockerfile's runtime stage ships every binary the compose file runs, as a non-root
//!   user, with a health check.
//!
//! The binaries must be built (`cargo build --bins`; `cargo test --workspace` builds them).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use marked_yaml::Span;
use marked_yaml::types::{MarkedMappingNode, MarkedScalarNode, Node};
use saga_system::bins;

const COMPOSE_FILE: &str = "docker-compose.yml";
const DOCKERFILE: &str = "Dockerfile";
/// The profile of Prometheus and Grafana: `docker compose --profile observability up`.
const OBSERVABILITY: &str = "observability";

/// Environment variables a binary reads outside clap, so absent from its `--help`: the
/// orchestrator's log format (`telemetry.rs`), and every binary's log filter. Each is still
/// checked against the binary: its name must appear in the executable.
const READ_OUTSIDE_CLAP: &[(&str, &str)] = &[
    ("orchestrator", "LOG_FORMAT"),
    ("orchestrator", "RUST_LOG"),
    ("orders", "RUST_LOG"),
    ("inventory", "RUST_LOG"),
    ("payments", "RUST_LOG"),
    ("shipping", "RUST_LOG"),
];

// ---------------------------------------------------------------------------------------------
// The tests.

#[test]
fn compose_services_run_real_binaries_with_settings_they_accept() {
    let compose = Compose::load();
    let mut problems = Vec::new();
    let mut helps: BTreeMap<Vec<String>, Help> = BTreeMap::new();
    for service in compose.built() {
        let Some((binary, rest)) = service.command.split_first() else {
            problems.push(format!(
                "{}: service `{}` is built from the Dockerfile but sets no `command` (a list \
                 naming one of the binaries: {})",
                service.at,
                service.name,
                bins::BINARIES.join(", ")
            ));
            continue;
        };
        if !bins::BINARIES.contains(&binary.as_str()) {
            problems.push(format!(
                "{}: service `{}` runs `{binary}`, which is none of the binaries the workspace \
                 builds: {}",
                service.at,
                service.name,
                bins::BINARIES.join(", ")
            ));
            continue;
        }
        // The subcommand path (`orchestrator run`): the words before the first flag.
        let words: Vec<String> = rest
            .iter()
            .take_while(|word| !word.starts_with('-'))
            .cloned()
            .collect();
        let mut key = vec![binary.clone()];
        key.extend(words.iter().cloned());
        let help = helps.entry(key).or_insert_with(|| Help::of(binary, &words));

        for flag in rest.iter().filter(|word| word.starts_with("--")) {
            let name = flag.split('=').next().unwrap_or(flag);
            if !help.flags.contains(name) {
                problems.push(format!(
                    "{}: service `{}` passes `{name}`, which `{}` does not take; it takes: {}",
                    service.at,
                    service.name,
                    help.command,
                    join(&help.flags)
                ));
            }
        }
        for EnvVar { name, at, .. } in &service.environment {
            if help.env.contains(name) {
                continue;
            }
            let outside_clap = READ_OUTSIDE_CLAP
                .iter()
                .any(|(b, var)| b == binary && var == name);
            if outside_clap && executable_mentions(&help.path, name) {
                continue;
            }
            problems.push(format!(
                "{at}: service `{}` sets {name}, which `{}` does not read; it reads: {}",
                service.name,
                help.command,
                join(&help.env)
            ));
        }
    }
    if compose.built().next().is_none() {
        problems.push(format!(
            "{COMPOSE_FILE}: no service is built from the {DOCKERFILE}"
        ));
    }
    assert_no_problems(&problems);
}

#[test]
fn compose_wiring_is_consistent() {
    let compose = Compose::load();
    let mut problems = Vec::new();

    // The broker and the database, recognised by their images, with health checks.
    let rabbitmq = compose.by_image("rabbitmq");
    let postgres = compose.by_image("postgres");
    for (what, service, tool) in [
        ("RabbitMQ", rabbitmq, "rabbitmq-diagnostics"),
        ("PostgreSQL", postgres, "pg_isready"),
    ] {
        match service {
            None => problems.push(format!("{COMPOSE_FILE}: no {what} service")),
            Some(service) => match &service.healthcheck {
                Some(check) if !check.disabled && check.test.iter().any(|w| w.contains(tool)) => {}
                _ => problems.push(format!(
                    "{}: service `{}` ({what}) needs a health check with `{tool}`, so others \
                     can wait for it with `service_healthy`",
                    service.at, service.name
                )),
            },
        }
    }

    // Every `service_healthy` dependency has a health check to wait for.
    for service in &compose.services {
        for (dependency, condition) in &service.depends_on {
            let Some(target) = compose.service(dependency) else {
                problems.push(format!(
                    "{}: service `{}` depends on `{dependency}`, which is not a service",
                    service.at, service.name
                ));
                continue;
            };
            if condition.as_deref() == Some("service_healthy")
                && target.healthcheck.as_ref().is_none_or(|h| h.disabled)
            {
                problems.push(format!(
                    "{}: service `{}` waits for `{dependency}` to be healthy, but it has no \
                     health check",
                    service.at, service.name
                ));
            }
        }
    }

    let orchestrators: Vec<&Service> = compose
        .built()
        .filter(|s| s.binary() == Some("orchestrator"))
        .collect();
    if orchestrators.len() != 1 {
        problems.push(format!(
            "{COMPOSE_FILE}: expected one service running `orchestrator run`, found {}",
            orchestrators.len()
        ));
    }
    let mut schemas: BTreeMap<String, &str> = BTreeMap::new();
    let mut connection_names: BTreeMap<String, &str> = BTreeMap::new();

    for service in compose.built() {
        let at = &service.at;
        let name = &service.name;

        // The image this file checks is the one the service runs.
        if service.build_context.as_deref() != Some(".")
            || service.dockerfile.as_deref() != Some(DOCKERFILE)
        {
            problems.push(format!(
                "{at}: service `{name}` should be built from `{DOCKERFILE}` in `.`, found \
                 context {:?} and dockerfile {:?}",
                service.build_context, service.dockerfile
            ));
        }
        if service.restart.as_deref() != Some("unless-stopped") {
            problems.push(format!(
                "{at}: service `{name}` should have `restart: unless-stopped`"
            ));
        }

        // Start once the broker and the database answer, not merely once their containers run.
        for dependency in [rabbitmq, postgres].into_iter().flatten() {
            let found = match service.depends_on.get(&dependency.name) {
                Some(Some(condition)) if condition == "service_healthy" => continue,
                Some(Some(condition)) => format!("`condition: {condition}`"),
                Some(None) => "no condition (it would only wait for the container)".to_owned(),
                None => "no dependency".to_owned(),
            };
            problems.push(format!(
                "{at}: service `{name}` should depend on `{}` with `condition: \
                 service_healthy`, found {found}",
                dependency.name
            ));
        }

        // The URLs name the compose services, with the database's own credentials.
        match (service.env("AMQP_URL"), rabbitmq) {
            (None, _) => problems.push(format!("{at}: service `{name}` sets no AMQP_URL")),
            (Some(url), Some(rabbitmq)) => {
                let url = Url::parse(url);
                if !rabbitmq.answers_to(&url.host) || url.port.unwrap_or(5672) != 5672 {
                    problems.push(format!(
                        "{at}: service `{name}`: AMQP_URL should point at `{}:5672`, found \
                         `{}:{}`",
                        rabbitmq.name,
                        url.host,
                        url.port.unwrap_or(5672)
                    ));
                }
            }
            (Some(_), None) => {}
        }
        match (service.env("DATABASE_URL"), postgres) {
            (None, _) => problems.push(format!("{at}: service `{name}` sets no DATABASE_URL")),
            (Some(raw), Some(postgres)) => {
                let url = Url::parse(raw);
                let user = postgres.env("POSTGRES_USER").unwrap_or("postgres");
                let expected = Url {
                    scheme: "postgres".into(),
                    user: user.into(),
                    password: postgres.env("POSTGRES_PASSWORD").unwrap_or("").into(),
                    host: url.host.clone(),
                    port: Some(5432),
                    path: postgres.env("POSTGRES_DB").unwrap_or(user).into(),
                };
                let found = Url {
                    port: Some(url.port.unwrap_or(5432)),
                    scheme: url.scheme.replace("postgresql", "postgres"),
                    ..url.clone()
                };
                if found != expected || !postgres.answers_to(&url.host) {
                    problems.push(format!(
                        "{at}: service `{name}`: DATABASE_URL `{raw}` should be \
                         postgres://{user}:<POSTGRES_PASSWORD>@{}:5432/{}",
                        postgres.name, expected.path
                    ));
                }
            }
            (Some(_), None) => {}
        }
        if let Some(connection) = service.env("CONNECTION_NAME")
            && let Some(other) = connection_names.insert(connection.into(), name)
        {
            problems.push(format!(
                "{at}: services `{other}` and `{name}` share CONNECTION_NAME `{connection}`: \
                 the management UI could not tell them apart"
            ));
        }

        if service.binary() == Some("orchestrator") {
            check_orchestrator(service, &mut problems);
        } else {
            // A participant: tables in a schema of its own in the shared database.
            match service.env("DATABASE_SCHEMA") {
                None if service
                    .env("DATABASE_URL")
                    .is_some_and(|u| u.starts_with("postgres")) =>
                {
                    problems.push(format!(
                        "{at}: participant `{name}` shares the database without a \
                         DATABASE_SCHEMA of its own"
                    ))
                }
                None => {}
                Some(schema) => {
                    if let Some(other) = schemas.insert(schema.into(), name) {
                        problems.push(format!(
                            "{at}: participants `{other}` and `{name}` share DATABASE_SCHEMA \
                             `{schema}`: their tables would collide"
                        ));
                    }
                }
            }
            // The image's health check asks the orchestrator's HTTP port, which participants
            // do not have: inherited, it would mark them unhealthy forever.
            if !service.healthcheck.as_ref().is_some_and(|h| h.disabled) {
                problems.push(format!(
                    "{at}: participant `{name}` serves no HTTP: set `healthcheck: {{disable: \
                     true}}` instead of inheriting the image's /healthz check"
                ));
            }
        }
    }
    assert_no_problems(&problems);
}

#[test]
fn the_observability_profile_is_wired_to_files_and_services_that_exist() {
    let compose = Compose::load();
    let mut problems = Vec::new();

    // Whatever a service mounts from the repository is there.
    for service in &compose.services {
        for volume in &service.volumes {
            let source = volume.split(':').next().unwrap_or_default();
            if source.starts_with("./") && !root().join(source).exists() {
                problems.push(format!(
                    "{}: service `{}` mounts {source}, which is not in the repository",
                    service.at, service.name
                ));
            }
        }
    }

    let (Some(prometheus), Some(grafana)) = (
        compose.by_image("prom/prometheus"),
        compose.by_image("grafana/grafana"),
    ) else {
        problems.push(format!(
            "{COMPOSE_FILE}: the `{OBSERVABILITY}` profile needs a `prom/prometheus` and a \
             `grafana/grafana` service"
        ));
        assert_no_problems(&problems);
        return;
    };
    for service in [prometheus, grafana] {
        if service.profiles != [OBSERVABILITY] {
            problems.push(format!(
                "{}: service `{}` should be under `profiles: [{OBSERVABILITY}]` (found {:?}), \
                 so a plain `docker compose up` stays light",
                service.at, service.name, service.profiles
            ));
        }
    }
    // A plain `up` must not pull a profile's service in through a dependency.
    for service in compose.services.iter().filter(|s| s.profiles.is_empty()) {
        for dependency in service.depends_on.keys() {
            if compose
                .service(dependency)
                .is_some_and(|d| !d.profiles.is_empty())
            {
                problems.push(format!(
                    "{}: service `{}` starts by default but depends on `{dependency}`, which is \
                     in a profile",
                    service.at, service.name
                ));
            }
        }
    }

    check_prometheus(&compose, prometheus, &mut problems);
    check_grafana(prometheus, grafana, &mut problems);
    assert_no_problems(&problems);
}

/// Prometheus's configuration, as mounted: its rule files exist, and each scrape target is a
/// compose service on the port it serves metrics on, reachable the way it is configured.
fn check_prometheus(compose: &Compose, prometheus: &Service, problems: &mut Vec<String>) {
    let (at, name) = (&prometheus.at, &prometheus.name);
    let target = prometheus
        .command
        .iter()
        .find_map(|word| word.strip_prefix("--config.file="))
        .unwrap_or("/etc/prometheus/prometheus.yml");
    let Some(path) = prometheus.host_path(target).filter(|p| p.is_file()) else {
        problems.push(format!(
            "{at}: service `{name}` reads {target}, which no mount of a repository file provides"
        ));
        return;
    };
    let config = load_yaml(&path);
    let config = config.as_mapping().expect("checked by load_yaml");
    let config_dir = Path::new(target).parent().unwrap_or(Path::new("/"));
    for rule_file in config
        .get_sequence("rule_files")
        .map(strings_of)
        .unwrap_or_default()
    {
        if !prometheus
            .host_path(&config_dir.join(&rule_file).to_string_lossy())
            .is_some_and(|p| p.is_file())
        {
            problems.push(format!(
                "{}: rule file {rule_file} is not mounted into `{name}`",
                path.display()
            ));
        }
    }
    let Some(orchestrator) = compose.built().find(|s| s.binary() == Some("orchestrator")) else {
        problems.push(format!("{COMPOSE_FILE}: no orchestrator to scrape"));
        return;
    };
    let rabbitmq = compose.by_image("rabbitmq");
    let mut scraped = BTreeSet::new();
    for job in config
        .get_sequence("scrape_configs")
        .map(|s| s.iter().filter_map(Node::as_mapping).collect::<Vec<_>>())
        .unwrap_or_default()
    {
        let job_name = job.get_scalar("job_name").map_or("?", |s| s.as_str());
        let targets = job
            .get_sequence("static_configs")
            .into_iter()
            .flat_map(|s| s.iter())
            .filter_map(Node::as_mapping)
            .filter_map(|c| c.get_sequence("targets"))
            .flat_map(strings_of);
        for address in targets {
            let (host, port) = address.rsplit_once(':').unwrap_or((&address, ""));
            let port: Option<u16> = port.parse().ok();
            let Some(service) = compose.services.iter().find(|s| s.answers_to(host)) else {
                problems.push(format!(
                    "{}: job `{job_name}` scrapes {address}, but no compose service is `{host}`",
                    path.display()
                ));
                continue;
            };
            scraped.insert(service.name.clone());
            if service.name == orchestrator.name {
                let http_port = orchestrator
                    .env("HTTP_ADDR")
                    .and_then(|a| a.parse::<SocketAddr>().ok())
                    .map(|a| a.port());
                if port != http_port {
                    problems.push(format!(
                        "{}: job `{job_name}` scrapes {address}, but the orchestrator listens \
                         on port {http_port:?} (HTTP_ADDR)",
                        path.display()
                    ));
                }
                // /metrics needs a token with the read role (or operate, which includes it).
                let credentials = job
                    .get_mapping("authorization")
                    .and_then(|a| a.get_scalar("credentials"))
                    .map(|c| c.as_str().to_owned());
                let tokens = orchestrator.env("API_TOKENS").unwrap_or_default();
                let known = tokens.split([';', '\n']).any(|entry| {
                    let words: Vec<&str> = entry.split_whitespace().collect();
                    matches!(words.as_slice(), [_, "read" | "operate", token]
                        if Some(*token) == credentials.as_deref())
                });
                if !known {
                    problems.push(format!(
                        "{}: job `{job_name}` must send a token of the orchestrator's \
                         API_TOKENS with the `read` role (`authorization: credentials:`), \
                         found {credentials:?}",
                        path.display()
                    ));
                }
            } else if rabbitmq.is_some_and(|r| r.name == service.name) {
                if port != Some(15692) {
                    problems.push(format!(
                        "{}: job `{job_name}` scrapes {address}: RabbitMQ's exporter listens on \
                         15692",
                        path.display()
                    ));
                }
                let plugins = service
                    .host_path("/etc/rabbitmq/enabled_plugins")
                    .and_then(|p| std::fs::read_to_string(p).ok())
                    .unwrap_or_default();
                for plugin in ["rabbitmq_prometheus", "rabbitmq_management"] {
                    if !plugins.contains(plugin) {
                        problems.push(format!(
                            "{}: service `{}` should enable {plugin} in a mounted \
                             /etc/rabbitmq/enabled_plugins (found {plugins:?})",
                            service.at, service.name
                        ));
                    }
                }
            } else {
                problems.push(format!(
                    "{}: job `{job_name}` scrapes `{}`, which serves no metrics this set-up \
                     knows",
                    path.display(),
                    service.name
                ));
            }
        }
    }
    for expected in std::iter::once(orchestrator).chain(rabbitmq) {
        if !scraped.contains(&expected.name) {
            problems.push(format!(
                "{}: nothing scrapes `{}`",
                path.display(),
                expected.name
            ));
        }
    }
}

/// Grafana's provisioning, as mounted: a datasource on the Prometheus service, and a dashboard
/// provider whose directory holds the dashboards.
fn check_grafana(prometheus: &Service, grafana: &Service, problems: &mut Vec<String>) {
    let (at, name) = (&grafana.at, &grafana.name);
    let Some(provisioning) = grafana
        .host_path("/etc/grafana/provisioning")
        .filter(|p| p.is_dir())
    else {
        problems.push(format!(
            "{at}: service `{name}` mounts no repository directory at /etc/grafana/provisioning"
        ));
        return;
    };
    let prometheus_port = prometheus
        .command
        .iter()
        .find_map(|w| w.strip_prefix("--web.listen-address="))
        .and_then(|a| a.rsplit(':').next()?.parse().ok())
        .unwrap_or(9090u16);
    let mut datasources = 0;
    for file in yaml_files(&provisioning.join("datasources")) {
        let yaml = load_yaml(&file);
        for source in yaml
            .as_mapping()
            .and_then(|m| m.get_sequence("datasources"))
            .into_iter()
            .flat_map(|s| s.iter())
            .filter_map(Node::as_mapping)
        {
            datasources += 1;
            let url = Url::parse(source.get_scalar("url").map_or("", |u| u.as_str()));
            if source.get_scalar("type").map(|t| t.as_str()) != Some("prometheus")
                || !prometheus.answers_to(&url.host)
                || url.port != Some(prometheus_port)
            {
                problems.push(format!(
                    "{}: a datasource should be of type prometheus at http://{}:{prometheus_port}, \
                     found {url:?}",
                    file.display(),
                    prometheus.name
                ));
            }
        }
    }
    if datasources == 0 {
        problems.push(format!(
            "{}: no datasource is provisioned",
            provisioning.join("datasources").display()
        ));
    }
    let mut dashboards = 0;
    for file in yaml_files(&provisioning.join("dashboards")) {
        let yaml = load_yaml(&file);
        for provider in yaml
            .as_mapping()
            .and_then(|m| m.get_sequence("providers"))
            .into_iter()
            .flat_map(|s| s.iter())
            .filter_map(Node::as_mapping)
        {
            let path = provider
                .get_mapping("options")
                .and_then(|o| o.get_scalar("path"))
                .map_or("", |p| p.as_str());
            match grafana.host_path(path).filter(|p| p.is_dir()) {
                None => problems.push(format!(
                    "{}: provider path {path:?} is not a repository directory mounted into \
                     `{name}`",
                    file.display()
                )),
                Some(dir) => {
                    dashboards += std::fs::read_dir(&dir)
                        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                        .filter(|e| {
                            e.as_ref()
                                .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "json"))
                        })
                        .count()
                }
            }
        }
    }
    if dashboards == 0 {
        problems.push(format!(
            "{}: no provider loads a dashboard (.json)",
            provisioning.join("dashboards").display()
        ));
    }
    if let Some(home) = grafana.env("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
        && !grafana.host_path(home).is_some_and(|p| p.is_file())
    {
        problems.push(format!(
            "{at}: service `{name}`: GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH {home} is not a \
             mounted repository file"
        ));
    }
}

/// The `.yml` and `.yaml` files of `dir` (none if it does not exist).
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yml" || x == "yaml"))
        .collect();
    files.sort();
    files
}

/// A YAML file whose top level is a mapping.
fn load_yaml(path: &Path) -> Node {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let node = marked_yaml::parse_yaml(0, &text)
        .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()));
    assert!(
        node.as_mapping().is_some(),
        "{}: the top level is not a mapping",
        path.display()
    );
    node
}

/// The scalars of a sequence, as strings (other items skipped).
fn strings_of(sequence: &marked_yaml::types::MarkedSequenceNode) -> Vec<String> {
    sequence
        .iter()
        .filter_map(Node::as_scalar)
        .map(|s| s.as_str().to_owned())
        .collect()
}

/// The orchestrator's HTTP address, published port, health check and saga definitions.
fn check_orchestrator(service: &Service, problems: &mut Vec<String>) {
    let at = &service.at;
    let name = &service.name;
    match service.env("HTTP_ADDR").map(str::parse::<SocketAddr>) {
        None => problems.push(format!(
            "{at}: service `{name}` sets no HTTP_ADDR: the default, 127.0.0.1:8080, is \
             unreachable from outside the container"
        )),
        Some(Err(e)) => problems.push(format!("{at}: service `{name}`: HTTP_ADDR: {e}")),
        Some(Ok(addr)) => {
            if !addr.ip().is_unspecified() {
                problems.push(format!(
                    "{at}: service `{name}`: HTTP_ADDR {addr} is unreachable from outside the \
                     container: listen on 0.0.0.0:{}",
                    addr.port()
                ));
            }
            let port = addr.port();
            if !service
                .ports
                .iter()
                .any(|p| container_port(p) == Some(port))
            {
                problems.push(format!(
                    "{at}: service `{name}` listens on port {port} (HTTP_ADDR) but publishes \
                     {:?}",
                    service.ports
                ));
            }
            match &service.healthcheck {
                Some(check)
                    if !check.disabled
                        && check
                            .test
                            .iter()
                            .any(|w| w.contains(&format!(":{port}/healthz"))) => {}
                _ => problems.push(format!(
                    "{at}: service `{name}` needs a health check asking \
                     http://127.0.0.1:{port}/healthz"
                )),
            }
            let exposed = Dockerfile::load().runtime().expose();
            if !exposed.contains(&port) {
                problems.push(format!(
                    "{DOCKERFILE}: the runtime stage should `EXPOSE {port}`, the orchestrator's \
                     port; it exposes {exposed:?}"
                ));
            }
        }
    }

    // The definitions: SAGA_CONFIG is where a read-only bind mount of a real, valid file lands.
    let Some(config) = service.env("SAGA_CONFIG") else {
        problems.push(format!("{at}: service `{name}` sets no SAGA_CONFIG"));
        return;
    };
    let mount = service.volumes.iter().find_map(|volume| {
        let parts: Vec<&str> = volume.split(':').collect();
        (parts.len() >= 2 && parts[1] == config).then_some(parts)
    });
    let Some(mount) = mount else {
        problems.push(format!(
            "{at}: service `{name}`: SAGA_CONFIG is {config}, but no volume is mounted there \
             (volumes: {:?})",
            service.volumes
        ));
        return;
    };
    if mount
        .get(2)
        .is_none_or(|mode| !mode.split(',').any(|m| m == "ro"))
    {
        problems.push(format!(
            "{at}: service `{name}`: mount the saga definitions read-only (`{}:{}:ro`)",
            mount[0], mount[1]
        ));
    }
    let source = root().join(mount[0]);
    if !source.is_file() {
        problems.push(format!(
            "{at}: service `{name}` mounts {}, which is not a file",
            source.display()
        ));
        return;
    }
    let orchestrator = binary("orchestrator");
    let validate = Command::new(&orchestrator)
        .arg("validate")
        .arg(&source)
        .env_clear()
        .output()
        .expect("cannot run `orchestrator validate`");
    if !validate.status.success() {
        problems.push(format!(
            "{at}: service `{name}` mounts {}, which `orchestrator validate` rejects:\n{}{}",
            source.display(),
            String::from_utf8_lossy(&validate.stdout),
            String::from_utf8_lossy(&validate.stderr)
        ));
    }
}

#[test]
fn docker_compose_accepts_the_file() {
    // Compose v1 (`docker-compose`, Debian's package), or else the v2 plugin (`docker
    // compose`): either parses and validates the file without an engine.
    let (program, command) = match Command::new("docker-compose").arg("version").output() {
        Ok(_) => ("docker-compose", Command::new("docker-compose")),
        Err(_) if has_compose_plugin() => {
            let mut command = Command::new("docker");
            command.arg("compose");
            ("docker compose", command)
        }
        Err(e) => panic!(
            "`docker-compose` is not installed ({e}), and this test validates {COMPOSE_FILE} with \
             it (no Docker engine needed). Install it: `apt-get update && apt-get install -y \
             docker-compose` (scripts/test does), or the Docker Compose v2 plugin (`docker compose`)"
        ),
    };
    // As a plain `up` reads it, and with the dashboards' profile.
    for profile in [&[][..], &["--profile", OBSERVABILITY][..]] {
        let output = Command::new(command.get_program())
            .args(command.get_args())
            .args(profile)
            .args(["-f", COMPOSE_FILE, "config", "-q"])
            .current_dir(root())
            .output()
            .unwrap_or_else(|e| panic!("cannot run `{program}`: {e}"));
        assert!(
            output.status.success(),
            "`{program} {} -f {COMPOSE_FILE} config -q` rejects the file ({}):\n{}{}",
            profile.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

fn has_compose_plugin() -> bool {
    Command::new("docker")
        .args(["compose", "version"])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn dockerfile_runtime_stage_ships_what_compose_runs() {
    let compose = Compose::load();
    let dockerfile = Dockerfile::load();
    let mut problems = Vec::new();
    let used: BTreeSet<&str> = compose.built().filter_map(Service::binary).collect();

    if dockerfile
        .instructions
        .iter()
        .any(|i| i.keyword == "RUN" && i.args.contains("--mount="))
        && !dockerfile.syntax_directive
    {
        problems.push(format!(
            "{DOCKERFILE}: `RUN --mount` needs `# syntax=docker/dockerfile:1` on the first line"
        ));
    }

    let runtime = dockerfile.runtime();
    let copies: Vec<(&str, Vec<&str>)> = runtime
        .instructions
        .iter()
        .filter(|i| i.keyword == "COPY")
        .filter_map(|i| {
            let words: Vec<&str> = i.args.split_whitespace().collect();
            let from = words.iter().find_map(|w| w.strip_prefix("--from="))?;
            let paths: Vec<&str> = words
                .iter()
                .filter(|w| !w.starts_with("--"))
                .copied()
                .collect();
            let (_, sources) = paths.split_last()?;
            Some((from, sources.to_vec()))
        })
        .collect();
    for binary in &used {
        let copied_from = copies.iter().find(|(_, sources)| {
            sources
                .iter()
                .any(|s| Path::new(s).file_name().is_some_and(|f| f == *binary))
        });
        let Some((from, _)) = copied_from else {
            problems.push(format!(
                "{DOCKERFILE}: the runtime stage `{}` does not copy the `{binary}` binary that \
                 {COMPOSE_FILE} runs (`COPY --from=<builder> .../{binary} ...`)",
                runtime.name
            ));
            continue;
        };
        // ... and the stage it comes from builds it.
        let Some(builder) = dockerfile.stages.iter().find(|s| s.name == *from) else {
            problems.push(format!(
                "{DOCKERFILE}: `COPY --from={from}`: no stage is named `{from}`"
            ));
            continue;
        };
        let builds = builder.instructions.iter().any(|i| {
            let words: Vec<&str> = i.args.split_whitespace().collect();
            i.keyword == "RUN"
                && i.args.contains("cargo build")
                && (words.contains(&"--bins")
                    || words.windows(2).any(|w| w[0] == "--bin" && w[1] == *binary)
                    || words.contains(&format!("--bin={binary}").as_str()))
        });
        if !builds {
            problems.push(format!(
                "{DOCKERFILE}: stage `{from}` has no `cargo build` of `{binary}` (`--bins` or \
                 `--bin {binary}`)"
            ));
        }
    }

    match runtime.last("USER") {
        None => problems.push(format!(
            "{DOCKERFILE}: the runtime stage sets no USER: the binaries would run as root"
        )),
        Some(user) => {
            let user = user.split(':').next().unwrap_or_default();
            if user == "root" || user == "0" {
                problems.push(format!(
                    "{DOCKERFILE}: the runtime stage runs as `{user}`: use a non-root user"
                ));
            }
        }
    }
    match runtime.last("HEALTHCHECK") {
        None => problems.push(format!(
            "{DOCKERFILE}: the runtime stage has no HEALTHCHECK"
        )),
        Some(check) if !check.contains("/healthz") => problems.push(format!(
            "{DOCKERFILE}: the HEALTHCHECK should ask the orchestrator's /healthz: {check}"
        )),
        Some(_) => {}
    }
    assert_no_problems(&problems);
}

// ---------------------------------------------------------------------------------------------
// The binaries.

/// The path of a workspace binary, or a failure saying how to build it.
fn binary(name: &str) -> PathBuf {
    bins::find(name).unwrap_or_else(|e| panic!("{e:#}"))
}

/// What a (sub)command's `--help` says it takes.
struct Help {
    /// `orchestrator run`, for messages.
    command: String,
    path: PathBuf,
    /// `--long` flags.
    flags: BTreeSet<String>,
    /// Variables from clap's `[env: NAME=...]`.
    env: BTreeSet<String>,
}

impl Help {
    fn of(binary_name: &str, subcommands: &[String]) -> Help {
        let path = binary(binary_name);
        let command = std::iter::once(binary_name)
            .chain(subcommands.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join(" ");
        // Without the test's environment: clap prints set variables' values in the help.
        let output = Command::new(&path)
            .args(subcommands)
            .arg("--help")
            .env_clear()
            .output()
            .unwrap_or_else(|e| panic!("cannot run `{command} --help`: {e}"));
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "`{command} --help` failed ({}): is `{command}` a command?\n{text}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        let env: BTreeSet<String> = text
            .split("[env: ")
            .skip(1)
            .filter_map(|rest| rest.split(['=', ']']).next())
            .map(str::to_owned)
            .collect();
        let flags: BTreeSet<String> = text
            .split(|c: char| c.is_whitespace() || c == ',')
            .filter(|word| word.starts_with("--") && word.len() > 2)
            .map(|word| {
                word.trim_end_matches(|c: char| !(c.is_alphanumeric() || c == '-'))
                    .split(['=', '<', '['])
                    .next()
                    .unwrap_or(word)
                    .to_owned()
            })
            .collect();
        assert!(
            !env.is_empty(),
            "`{command} --help` names no environment variable (`[env: NAME=]`): has the help \
             format changed?\n{text}"
        );
        Help {
            command,
            path,
            flags,
            env,
        }
    }
}

/// Whether `name` appears in the executable: a variable read with `std::env::var("NAME")` is
/// there as a string.
fn executable_mentions(path: &Path, name: &str) -> bool {
    let bytes =
        std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let needle = name.as_bytes();
    let first = needle[0];
    let mut from = 0;
    while let Some(offset) = bytes[from..].iter().position(|&b| b == first) {
        let start = from + offset;
        if bytes[start..].starts_with(needle) {
            return true;
        }
        from = start + 1;
    }
    false
}

// ---------------------------------------------------------------------------------------------
// docker-compose.yml, as far as these tests read it.

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
        .to_path_buf()
}

struct Compose {
    services: Vec<Service>,
}

struct Service {
    name: String,
    /// `docker-compose.yml:LINE:COLUMN` of the service, for messages.
    at: String,
    image: Option<String>,
    hostname: Option<String>,
    built: bool,
    build_context: Option<String>,
    dockerfile: Option<String>,
    command: Vec<String>,
    environment: Vec<EnvVar>,
    ports: Vec<String>,
    volumes: Vec<String>,
    /// Dependency → its condition (`None`: the short list form).
    depends_on: BTreeMap<String, Option<String>>,
    healthcheck: Option<Healthcheck>,
    restart: Option<String>,
    /// `profiles`: empty for the services a plain `up` starts.
    profiles: Vec<String>,
}

struct EnvVar {
    name: String,
    value: String,
    /// Where it is set, for messages.
    at: String,
}

struct Healthcheck {
    test: Vec<String>,
    disabled: bool,
}

impl Compose {
    fn load() -> Compose {
        let path = root().join(COMPOSE_FILE);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let node = marked_yaml::parse_yaml(0, &text)
            .unwrap_or_else(|e| panic!("{COMPOSE_FILE} is not valid YAML: {e}"));
        let top = node
            .as_mapping()
            .unwrap_or_else(|| panic!("{COMPOSE_FILE}: the top level is not a mapping"));
        let services = top
            .get_mapping("services")
            .unwrap_or_else(|| panic!("{COMPOSE_FILE}: no `services` mapping"));
        Compose {
            services: services
                .iter()
                .map(|(name, node)| Service::parse(name, node))
                .collect(),
        }
    }

    /// The services built from the Dockerfile.
    fn built(&self) -> impl Iterator<Item = &Service> {
        self.services.iter().filter(|s| s.built)
    }

    fn service(&self, name: &str) -> Option<&Service> {
        self.services.iter().find(|s| s.name == name)
    }

    /// The service running an image of this repository (`rabbitmq:...`).
    fn by_image(&self, repository: &str) -> Option<&Service> {
        self.services.iter().find(|s| {
            s.image
                .as_deref()
                .is_some_and(|i| i.split(':').next() == Some(repository))
        })
    }
}

impl Service {
    fn parse(key: &MarkedScalarNode, node: &Node) -> Service {
        let name = key.as_str();
        let at = at(key.span());
        let map = node
            .as_mapping()
            .unwrap_or_else(|| panic!("{at}: service `{name}` is not a mapping"));
        let scalar = |key: &str| map.get_scalar(key).map(|s| s.as_str().to_owned());
        let (built, build_context, dockerfile) = match map.get_node("build") {
            None => (false, None, None),
            Some(Node::Scalar(context)) => (
                true,
                Some(context.as_str().to_owned()),
                Some(DOCKERFILE.to_owned()),
            ),
            Some(Node::Mapping(build)) => (
                true,
                build.get_scalar("context").map(|s| s.as_str().to_owned()),
                Some(
                    build
                        .get_scalar("dockerfile")
                        .map_or(DOCKERFILE, |s| s.as_str())
                        .to_owned(),
                ),
            ),
            Some(other) => panic!(
                "{}: `build` is neither a path nor a mapping",
                self::at(other.span())
            ),
        };
        let command = match map.get_node("command") {
            None => Vec::new(),
            Some(Node::Scalar(s)) => s.as_str().split_whitespace().map(str::to_owned).collect(),
            Some(other) => strings(other),
        };
        let environment = match map.get_node("environment") {
            None => Vec::new(),
            Some(Node::Mapping(env)) => env
                .iter()
                .map(|(k, v)| EnvVar {
                    name: k.as_str().to_owned(),
                    value: v.as_scalar().map_or("", |s| s.as_str()).to_owned(),
                    at: self::at(k.span()),
                })
                .collect(),
            Some(other) => scalars(other)
                .into_iter()
                .map(|entry| {
                    let (name, value) = entry.as_str().split_once('=').unwrap_or((entry, ""));
                    EnvVar {
                        name: name.to_owned(),
                        value: value.to_owned(),
                        at: self::at(entry.span()),
                    }
                })
                .collect(),
        };
        let depends_on = match map.get_node("depends_on") {
            None => BTreeMap::new(),
            Some(Node::Mapping(deps)) => deps
                .iter()
                .map(|(k, v)| {
                    let condition = v
                        .as_mapping()
                        .and_then(|m| m.get_scalar("condition"))
                        .map(|c| c.as_str().to_owned());
                    (k.as_str().to_owned(), condition)
                })
                .collect(),
            Some(other) => strings(other).into_iter().map(|d| (d, None)).collect(),
        };
        let healthcheck = map.get_mapping("healthcheck").map(healthcheck);
        Service {
            name: name.to_owned(),
            at,
            image: scalar("image"),
            hostname: scalar("hostname"),
            built,
            build_context,
            dockerfile,
            command,
            environment,
            ports: map.get_node("ports").map(strings).unwrap_or_default(),
            volumes: map.get_node("volumes").map(strings).unwrap_or_default(),
            depends_on,
            healthcheck,
            restart: scalar("restart"),
            profiles: map.get_node("profiles").map(strings).unwrap_or_default(),
        }
    }

    /// The binary the command runs.
    fn binary(&self) -> Option<&str> {
        self.command.first().map(String::as_str)
    }

    fn env(&self, name: &str) -> Option<&str> {
        self.environment
            .iter()
            .find(|var| var.name == name)
            .map(|var| var.value.as_str())
    }

    /// The repository path mounted (read-only or not) at `target` or at a directory above it:
    /// `./deploy/prometheus:/etc/prometheus` maps `/etc/prometheus/alerts.yml` to
    /// `deploy/prometheus/alerts.yml`.
    fn host_path(&self, target: &str) -> Option<PathBuf> {
        self.volumes.iter().find_map(|volume| {
            let mut parts = volume.split(':');
            let (source, mounted) = (parts.next()?, parts.next()?);
            if !source.starts_with("./") {
                return None;
            }
            let rest = Path::new(target).strip_prefix(mounted).ok()?;
            let source = root().join(source.trim_start_matches("./"));
            // Joining "" would add a trailing slash, which a file's path must not have.
            Some(if rest.as_os_str().is_empty() {
                source
            } else {
                source.join(rest)
            })
        })
    }

    /// Whether other containers reach this service under `host`.
    fn answers_to(&self, host: &str) -> bool {
        host == self.name || self.hostname.as_deref() == Some(host)
    }
}

fn healthcheck(map: &MarkedMappingNode) -> Healthcheck {
    let test = match map.get_node("test") {
        None => Vec::new(),
        Some(Node::Scalar(s)) => vec![s.as_str().to_owned()],
        Some(other) => strings(other),
    };
    let disabled = map
        .get_scalar("disable")
        .is_some_and(|d| d.as_bool() == Some(true))
        || test.first().is_some_and(|t| t == "NONE");
    Healthcheck { test, disabled }
}

/// A sequence of scalars (the short syntax of `ports`, `volumes`, `command`...).
fn strings(node: &Node) -> Vec<String> {
    scalars(node)
        .into_iter()
        .map(|s| s.as_str().to_owned())
        .collect()
}

fn scalars(node: &Node) -> Vec<&MarkedScalarNode> {
    let Some(sequence) = node.as_sequence() else {
        panic!("{}: expected a list", at(node.span()));
    };
    sequence
        .iter()
        .map(|item| match item {
            Node::Scalar(s) => s,
            other => panic!(
                "{}: expected a string (these tests read the short syntax only)",
                at(other.span())
            ),
        })
        .collect()
}

/// `docker-compose.yml:LINE:COLUMN`.
fn at(span: &Span) -> String {
    match span.start() {
        Some(mark) => format!("{COMPOSE_FILE}:{}:{}", mark.line(), mark.column()),
        None => COMPOSE_FILE.to_owned(),
    }
}

/// The container port of a short-syntax port mapping: `8080`, `8080:8080`,
/// `127.0.0.1:8080:8080/tcp`.
fn container_port(mapping: &str) -> Option<u16> {
    let mapping = mapping.split('/').next()?;
    mapping.rsplit(':').next()?.parse().ok()
}

/// `scheme://user:password@host:port/path`, enough for the URLs in the compose file.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Url {
    scheme: String,
    user: String,
    password: String,
    host: String,
    port: Option<u16>,
    path: String,
}

impl Url {
    fn parse(url: &str) -> Url {
        let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (credentials, host_port) = authority.rsplit_once('@').unwrap_or(("", authority));
        let (user, password) = credentials.split_once(':').unwrap_or((credentials, ""));
        let (host, port) = match host_port.rsplit_once(':') {
            Some((host, port)) => (host, port.parse().ok()),
            None => (host_port, None),
        };
        Url {
            scheme: scheme.to_owned(),
            user: user.to_owned(),
            password: password.to_owned(),
            host: host.to_owned(),
            port,
            path: path.split('?').next().unwrap_or_default().to_owned(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The Dockerfile, as far as these tests read it: instructions (continuation lines joined,
// comments dropped) grouped by stage.

struct Dockerfile {
    /// `# syntax=...` on the first line.
    syntax_directive: bool,
    instructions: Vec<Instruction>,
    stages: Vec<Stage>,
}

struct Stage {
    name: String,
    instructions: Vec<Instruction>,
}

#[derive(Clone)]
struct Instruction {
    keyword: String,
    args: String,
}

impl Dockerfile {
    fn load() -> Dockerfile {
        let path = root().join(DOCKERFILE);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let syntax_directive = text
            .lines()
            .next()
            .is_some_and(|l| l.trim_start_matches(['#', ' ']).starts_with("syntax="));
        let mut instructions = Vec::new();
        let mut current = String::new();
        for line in text.lines() {
            let trimmed = line.trim();
            if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
                continue;
            }
            match trimmed.strip_suffix('\\') {
                Some(part) => {
                    current.push_str(part);
                    current.push(' ');
                }
                None => {
                    current.push_str(trimmed);
                    let (keyword, args) = current
                        .split_once(char::is_whitespace)
                        .unwrap_or((&current, ""));
                    instructions.push(Instruction {
                        keyword: keyword.to_ascii_uppercase(),
                        args: args.trim().to_owned(),
                    });
                    current.clear();
                }
            }
        }
        let mut stages: Vec<Stage> = Vec::new();
        for instruction in &instructions {
            if instruction.keyword == "FROM" {
                let words: Vec<&str> = instruction.args.split_whitespace().collect();
                let name = match words.iter().position(|w| w.eq_ignore_ascii_case("as")) {
                    Some(i) => words.get(i + 1).copied().unwrap_or_default(),
                    None => words.last().copied().unwrap_or_default(),
                };
                stages.push(Stage {
                    name: name.to_owned(),
                    instructions: Vec::new(),
                });
            } else if let Some(stage) = stages.last_mut() {
                stage.instructions.push(instruction.clone());
            }
        }
        assert!(!stages.is_empty(), "{DOCKERFILE}: no FROM");
        Dockerfile {
            syntax_directive,
            instructions,
            stages,
        }
    }

    /// The final stage: the image that runs.
    fn runtime(&self) -> &Stage {
        self.stages.last().expect("at least one stage")
    }
}

impl Stage {
    /// The arguments of the stage's last `keyword` instruction (the one that counts).
    fn last(&self, keyword: &str) -> Option<&str> {
        self.instructions
            .iter()
            .rev()
            .find(|i| i.keyword == keyword)
            .map(|i| i.args.as_str())
    }

    /// The ports of its EXPOSE instructions.
    fn expose(&self) -> Vec<u16> {
        self.instructions
            .iter()
            .filter(|i| i.keyword == "EXPOSE")
            .flat_map(|i| i.args.split_whitespace())
            .filter_map(|p| p.split('/').next()?.parse().ok())
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------

fn join(names: &BTreeSet<String>) -> String {
    names.iter().cloned().collect::<Vec<_>>().join(", ")
}

fn assert_no_problems(problems: &[String]) {
    assert!(
        problems.is_empty(),
        "{} problem(s):\n- {}",
        problems.len(),
        problems.join("\n- ")
    );
}
