//! The floor under a saga run one at a time: what its broker crossings and its commits cost
//! with nothing else on its path.
//!
//! One at a time, a saga waits, in order, for its start's commit, then per step run (action or
//! compensation) for the command's crossing, the participant's commit, the reply's crossing
//! and the orchestrator's commit, then for its terminal event. The raw round trip (measured in
//! the same run) is a step's two crossings with no database; a lone commit (measured here) is
//! one row inserted and fsynced, through the same driver and settings the services use. The
//! floor adds them up and leaves out the terminal event, so it is a bound no saga can beat on
//! this broker and disk, whatever the orchestrator and the participants do; the saga's p50
//! minus the floor is what they add.

use std::time::{Duration, Instant};

use saga_participant::sea_orm::ConnectionTrait;

/// The commits a saga waits for one at a time: its start's, then two per step run.
pub fn commits_per_saga(step_runs: usize) -> usize {
    2 * step_runs + 1
}

/// The floor from the p50s of a raw round trip and a lone commit.
pub fn floor(step_runs: usize, round_trip: Duration, commit: Duration) -> Duration {
    round_trip * step_runs as u32 + commit * commits_per_saga(step_runs) as u32
}

/// `n` lone commits one after another on the database at `url` (a fresh SQLite file, or a
/// PostgreSQL schema of its own); the latency of each.
pub async fn lone_commits(
    url: &str,
    schema: Option<&str>,
    n: usize,
) -> anyhow::Result<Vec<Duration>> {
    let db = saga_participant::connect_database(url, schema).await?;
    db.execute_unprepared(
        "CREATE TABLE IF NOT EXISTS saga_bench_commit (id BIGINT PRIMARY KEY, payload TEXT NOT NULL)",
    )
    .await?;
    let mut latencies = Vec::with_capacity(n);
    for i in 0..n {
        let started = Instant::now();
        db.execute_unprepared(&format!(
            "INSERT INTO saga_bench_commit (id, payload) VALUES ({i}, 'a step''s record')"
        ))
        .await?;
        latencies.push(started.elapsed());
        // Apart, as a saga's commits are: sqlx pings a connection it takes back to its pool,
        // and the next commit at once would wait for that.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    db.close().await.ok();
    Ok(latencies)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saga_of_three_steps_waits_for_three_round_trips_and_seven_commits() {
        let ms = Duration::from_millis;
        assert_eq!(commits_per_saga(3), 7);
        assert_eq!(floor(3, ms(2), ms(1)), ms(13));
    }

    #[test]
    fn compensations_are_step_runs_too() {
        // Three actions, the last failing, then two compensations.
        assert_eq!(commits_per_saga(5), 11);
        let floor = floor(5, Duration::from_micros(1500), Duration::from_micros(500));
        assert_eq!(floor, Duration::from_micros(13_000));
    }
}
