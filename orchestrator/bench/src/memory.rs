//! This process's resident set size, sampled from `/proc/self/status` (Linux only; elsewhere 0).

use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// What a sampler saw, in MiB.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rss {
    pub first_mib: f64,
    pub peak_mib: f64,
}

/// Samples the RSS every 100 ms until stopped.
pub struct RssSampler {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Rss>,
}

impl RssSampler {
    pub fn start() -> Self {
        let (stop, mut stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            let first_mib = rss_mib();
            let mut rss = Rss {
                first_mib,
                peak_mib: first_mib,
            };
            loop {
                tokio::select! {
                    _ = &mut stopped => return rss,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {
                        rss.peak_mib = rss.peak_mib.max(rss_mib());
                    }
                }
            }
        });
        RssSampler { stop, task }
    }

    pub async fn stop(self) -> Rss {
        let _ = self.stop.send(());
        self.task.await.unwrap_or(Rss {
            first_mib: 0.0,
            peak_mib: 0.0,
        })
    }
}

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .as_deref()
        .and_then(vm_rss_kib)
        .map_or(0.0, |kib| kib as f64 / 1024.0)
}

/// The `VmRSS:` line of a `/proc/<pid>/status` text, in KiB.
fn vm_rss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rss_line_is_read_in_kib() {
        let status = "Name:\tsaga-bench\nVmPeak:\t  900 kB\nVmRSS:\t   52340 kB\nThreads:\t4\n";
        assert_eq!(vm_rss_kib(status), Some(52_340));
        assert_eq!(vm_rss_kib("Name:\tx\n"), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_has_a_resident_set() {
        assert!(rss_mib() > 1.0);
    }
}
