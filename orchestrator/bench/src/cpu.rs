//! CPU time of processes, from `/proc/<pid>/stat` (Linux only; elsewhere every figure is n/a).
//! The broker and the PostgreSQL server are found by the local TCP port they listen on.

use std::time::Duration;

/// CPU time (user + system) of a process so far, `None` when it cannot be read.
pub fn process_time(pid: u32) -> Option<Duration> {
    imp::process_time(pid)
}

/// Where the PostgreSQL server's CPU time is read: the postmaster and its backends.
pub struct ServerTree {
    postmaster: u32,
}

impl ServerTree {
    /// The PostgreSQL server listening on `port` of this host, or why it cannot be measured.
    pub fn postgres(host: &str, port: u16) -> Result<Self, String> {
        let pid = listener(host, port, &["postgres", "postmaster"])?;
        Ok(ServerTree { postmaster: pid })
    }

    /// The postmaster's own and reaped children's time plus its live children's: a backend
    /// that exits between two readings moves from the second term to the first, so the
    /// difference of two readings counts it once.
    pub fn time(&self) -> Option<Duration> {
        imp::tree_time(self.postmaster)
    }
}

/// The broker (beam.smp) listening on `port` of this host, or why it cannot be measured.
pub fn broker(host: &str, port: u16) -> Result<u32, String> {
    listener(host, port, &["beam.smp"])
}

fn listener(host: &str, port: u16, names: &[&str]) -> Result<u32, String> {
    if !is_local(host) {
        return Err(format!(
            "{host} is not a loopback address: a remote process cannot be measured"
        ));
    }
    let pid = imp::listening_pid(port)?;
    let comm = imp::comm(pid).unwrap_or_default();
    if !names.contains(&comm.as_str()) {
        return Err(format!(
            "port {port} is held by {comm} (pid {pid}), not {}",
            names.join("/")
        ));
    }
    Ok(pid)
}

fn is_local(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(target_os = "linux")]
mod imp {
    use std::time::Duration;

    fn ticks_per_second() -> u64 {
        // SAFETY: sysconf only reads a system constant.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        if ticks > 0 { ticks as u64 } else { 100 }
    }

    fn ticks(ticks: u64) -> Duration {
        Duration::from_secs_f64(ticks as f64 / ticks_per_second() as f64)
    }

    /// The fields of `/proc/<pid>/stat` after the command name (which may hold spaces), so
    /// that field N of proc(5) is `fields[N - 3]`.
    fn stat_fields(pid: u32) -> Option<Vec<u64>> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let rest = &stat[stat.rfind(')')? + 2..];
        // The state (field 3) is a letter; keep the numeric fields' positions.
        Some(
            rest.split_whitespace()
                .map(|f| f.parse().unwrap_or(0))
                .collect(),
        )
    }

    /// The ids of the processes visible in `/proc`.
    fn pids() -> std::io::Result<impl Iterator<Item = u32>> {
        Ok(std::fs::read_dir("/proc")?.flatten().filter_map(|entry| {
            entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
        }))
    }

    pub fn process_time(pid: u32) -> Option<Duration> {
        let f = stat_fields(pid)?;
        // utime (14) + stime (15).
        Some(ticks(f.get(11)? + f.get(12)?))
    }

    pub fn tree_time(parent: u32) -> Option<Duration> {
        let f = stat_fields(parent)?;
        // utime, stime, cutime, cstime (14 to 17).
        let mut total = f.get(11)? + f.get(12)? + f.get(13)? + f.get(14)?;
        for pid in pids().ok()? {
            if let Some(f) = stat_fields(pid)
                // ppid (4).
                && f.get(1) == Some(&(parent as u64))
            {
                total += f.get(11).unwrap_or(&0) + f.get(12).unwrap_or(&0);
            }
        }
        Some(ticks(total))
    }

    pub fn comm(pid: u32) -> Option<String> {
        Some(
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .ok()?
                .trim()
                .to_owned(),
        )
    }

    /// The process that holds the listening TCP socket on `port`: the socket's inode from
    /// /proc/net/tcp{,6}, then the process with an fd linked to `socket:[inode]`.
    pub fn listening_pid(port: u16) -> Result<u32, String> {
        let mut inodes = Vec::new();
        for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
            let Ok(text) = std::fs::read_to_string(table) else {
                continue;
            };
            for line in text.lines().skip(1) {
                let f: Vec<&str> = line.split_whitespace().collect();
                // local_address (1) is ADDR:PORT in hex, st (3) 0A is LISTEN, inode is 9.
                let listening = f.get(3) == Some(&"0A");
                let on_port = f
                    .get(1)
                    .and_then(|a| a.rsplit_once(':'))
                    .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
                    == Some(port);
                if listening
                    && on_port
                    && let Some(inode) = f.get(9)
                {
                    inodes.push(format!("socket:[{inode}]"));
                }
            }
        }
        if inodes.is_empty() {
            return Err(format!(
                "no listening socket on port {port} in this network namespace"
            ));
        }
        for pid in pids().map_err(|e| format!("/proc: {e}"))? {
            let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
                continue;
            };
            for fd in fds.flatten() {
                if let Ok(link) = std::fs::read_link(fd.path())
                    && inodes.iter().any(|i| link.as_os_str() == i.as_str())
                {
                    return Ok(pid);
                }
            }
        }
        Err(format!(
            "no visible process holds the socket on port {port} (another user's or container's)"
        ))
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    use std::time::Duration;

    pub fn process_time(_: u32) -> Option<Duration> {
        None
    }

    pub fn tree_time(_: u32) -> Option<Duration> {
        None
    }

    pub fn comm(_: u32) -> Option<String> {
        None
    }

    pub fn listening_pid(_: u16) -> Result<u32, String> {
        Err("CPU times are read from /proc on Linux only".into())
    }
}

/// What the benchmark measures the CPU time of: its own process, the participant processes
/// (`--participants processes`), the broker, and the PostgreSQL server (when it is the backend).
pub struct Meters {
    /// The bench process with the participants in it (in-process mode), or without.
    own_label: &'static str,
    participants: Vec<(String, Option<u32>)>,
    broker: Result<u32, String>,
    postgres: Option<Result<ServerTree, String>>,
}

/// One reading of every meter.
pub struct Reading {
    own: Option<Duration>,
    participants: Vec<Option<Duration>>,
    broker: Option<Duration>,
    postgres: Option<Duration>,
}

impl Meters {
    /// `participants`: the participant processes, if any, by name and pid.
    pub fn find(
        amqp_url: &str,
        database_url: &str,
        participants: Vec<(String, Option<u32>)>,
    ) -> Self {
        let broker = if amqp_url.contains(',') {
            Err("a broker list: one node's time would not be the broker's".into())
        } else {
            let default = if amqp_url.starts_with("amqps:") {
                5671
            } else {
                5672
            };
            host_port(amqp_url, default)
                .ok_or_else(|| "cannot read the host of the AMQP URL".to_owned())
                .and_then(|(host, port)| broker(&host, port))
        };
        let postgres = database_url.starts_with("postgres").then(|| {
            host_port(database_url, 5432)
                .ok_or_else(|| "cannot read the host of the database URL".to_owned())
                .and_then(|(host, port)| ServerTree::postgres(&host, port))
        });
        Meters {
            own_label: if participants.is_empty() {
                "orchestrator+participants"
            } else {
                "orchestrator"
            },
            participants,
            broker,
            postgres,
        }
    }

    pub fn read(&self) -> Reading {
        Reading {
            own: process_time(std::process::id()),
            participants: self
                .participants
                .iter()
                .map(|(_, pid)| pid.and_then(process_time))
                .collect(),
            broker: self.broker.as_ref().ok().and_then(|pid| process_time(*pid)),
            postgres: self
                .postgres
                .as_ref()
                .and_then(|p| p.as_ref().ok())
                .and_then(ServerTree::time),
        }
    }

    /// `  cpu s/saga  ...`, and a line per participant process after it.
    pub fn print(&self, before: &Reading, after: &Reading, sagas: usize) {
        let per_saga = |b, a| per_unit(b, a, sagas, 4);
        let mut line = format!(
            "  cpu s/saga         {} {}",
            self.own_label,
            per_saga(before.own, after.own)
        );
        if !self.participants.is_empty() {
            let sum = |r: &Reading| r.participants.iter().copied().sum::<Option<Duration>>();
            line += &format!("  participants {}", per_saga(sum(before), sum(after)));
        }
        line += &match &self.broker {
            Ok(_) => format!("  broker {}", per_saga(before.broker, after.broker)),
            Err(why) => format!("  broker n/a ({why})"),
        };
        match &self.postgres {
            Some(Ok(_)) => {
                line += &format!("  postgres {}", per_saga(before.postgres, after.postgres))
            }
            Some(Err(why)) => line += &format!("  postgres n/a ({why})"),
            None => {}
        }
        println!("{line}");
        if !self.participants.is_empty() {
            let mut each = "  cpu s/saga each   ".to_owned();
            for (i, (name, _)) in self.participants.iter().enumerate() {
                each += &format!(
                    " {name} {} ",
                    per_saga(before.participants[i], after.participants[i])
                );
            }
            println!("{}", each.trim_end());
        }
    }
}

/// `  raw cpu s/trip  ...`: this process (both ends of the raw round trips) and the broker,
/// per round trip (per element when packed), from readings of `meters` around them.
pub fn print_raw(meters: &Meters, before: &Reading, after: &Reading, trips: usize) {
    let broker = match &meters.broker {
        Ok(_) => per_unit(before.broker, after.broker, trips, 5),
        Err(why) => format!("n/a ({why})"),
    };
    println!(
        "  raw cpu s/trip     both ends {}  broker {broker}",
        per_unit(before.own, after.own, trips, 5)
    );
}

/// The time between two readings divided by `units`, or n/a when either is missing.
fn per_unit(
    before: Option<Duration>,
    after: Option<Duration>,
    units: usize,
    decimals: usize,
) -> String {
    match (before, after) {
        (Some(b), Some(a)) => format!(
            "{:.decimals$}",
            a.saturating_sub(b).as_secs_f64() / units.max(1) as f64
        ),
        _ => "n/a".to_owned(),
    }
}

/// The host and port of `scheme://[user[:password]@]host[:port][/...]`.
fn host_port(url: &str, default_port: u16) -> Option<(String, u16)> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?']).next()?;
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (host, port) = match host_port.rsplit_once(':') {
        // Not the inside of an [IPv6] address.
        Some((host, port)) if !port.contains(']') => (host, port.parse().ok()?),
        _ => (host_port, default_port),
    };
    let host = if host.is_empty() { "localhost" } else { host };
    Some((host.to_owned(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_and_port_of_urls() {
        let hp = host_port;
        assert_eq!(
            hp("amqp://guest:guest@127.0.0.1:5672/bench2", 5672),
            Some(("127.0.0.1".into(), 5672))
        );
        assert_eq!(
            hp("amqps://u:p@broker.example/%2f", 5671),
            Some(("broker.example".into(), 5671))
        );
        assert_eq!(
            hp(
                "postgres://postgres@[::1]:5433/postgres?sslmode=disable",
                5432
            ),
            Some(("[::1]".into(), 5433))
        );
        assert_eq!(
            hp("postgres://[::1]/db", 5432),
            Some(("[::1]".into(), 5432))
        );
        assert_eq!(hp("not a url", 1), None);
    }

    #[test]
    fn only_loopback_hosts_are_measured() {
        assert!(is_local("localhost"));
        assert!(is_local("127.0.0.1"));
        assert!(is_local("[::1]"));
        assert!(!is_local("broker.example"));
        assert!(broker("broker.example", 5672).is_err());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_listening_socket_is_traced_to_its_process() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port");
        let port = listener.local_addr().expect("its address").port();
        assert_eq!(imp::listening_pid(port), Ok(std::process::id()));
        let why = broker("127.0.0.1", port).expect_err("this test is no broker");
        assert!(why.contains("not beam.smp"), "{why}");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_uses_cpu_time() {
        let before = process_time(std::process::id()).expect("own /proc/self/stat");
        // Spin until a clock tick is charged; generous, for a machine with both cores busy.
        let start = std::time::Instant::now();
        let mut after = before;
        while after == before && start.elapsed() < Duration::from_secs(20) {
            std::hint::black_box((0..100_000u64).sum::<u64>());
            after = process_time(std::process::id()).expect("own /proc/self/stat");
        }
        assert!(after > before, "no CPU time charged in 20 s of spinning");
    }
}
