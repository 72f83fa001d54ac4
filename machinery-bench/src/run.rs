//! One benchmark run: the phases in order, repeated, on a fresh queue that is deleted afterwards.

use std::time::{Duration, Instant};

use machinery::signature::new_task_uuid;
use machinery::Server;
use redis::aio::MultiplexedConnection;

use crate::ceiling;
use crate::child::{ChildWorker, WorkerSpec};
use crate::cli::{backend_label, is_redis, BrokerKind, Settings};
use crate::commands::{self, Delta, Monitor};
use crate::error::BenchError;
use crate::measure::{self, Drained};
use crate::proc_stats;
use crate::report;
use crate::rows::{
    CommandCount, CpuReading, DrainRow, Machine, Results, RoundTrip, SendRow, COUNTED_CONCURRENCY,
};
use crate::servers;

/// Concurrency of the worker that answers the round trips and whose idle RSS is read.
const ROUND_TRIP_CONCURRENCY: usize = 10;
/// Tasks of the untimed drain watched with MONITOR.
const MONITORED_TASKS: u64 = 2_000;
/// How long the worker process sits on an empty queue before its idle RSS is read.
const IDLE_WAIT: Duration = Duration::from_secs(1);
/// How long the server is watched for other clients' commands before a counted drain.
const BACKGROUND_WINDOW: Duration = Duration::from_millis(300);

/// The servers and connections of a run.
struct Env {
    settings: Settings,
    queue: String,
    raw_queue: String,
    /// Sends with the configured backend.
    configured: Server,
    /// Sends with the `null` backend (the same server when the configured backend is null).
    null: Server,
    /// The broker's Redis (Redis broker only): raw ceilings, command counts, clean-up.
    broker_redis: Option<(redis::Client, MultiplexedConnection)>,
    /// The backend's Redis (Redis backend only): deleting the run's task states.
    backend_redis: Option<MultiplexedConnection>,
    /// The broker's RabbitMQ (AMQP broker only): raw ceilings and clean-up.
    amqp: Option<lapin::Connection>,
    /// The local RabbitMQ server process (AMQP broker on this machine only), whose CPU a drain reads.
    amqp_pid: Option<u32>,
    ticks: f64,
}

impl Env {
    async fn open(settings: Settings) -> Result<Env, BenchError> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let queue = format!("bench-{}", &id[..12]);
        let raw_queue = format!("{queue}-raw");
        let config =
            |backend: &str| servers::config(&settings.broker, backend, &queue, settings.prefetch);
        let configured = Server::new(config(&settings.backend)).await?;
        let null = if settings.backend == "null" {
            configured.clone()
        } else {
            Server::new(config("null")).await?
        };
        let broker_redis = match settings.kind {
            BrokerKind::Redis => {
                let client = servers::redis_client(&settings.broker)?;
                let conn = servers::redis_connection(&client).await?;
                Some((client, conn))
            }
            BrokerKind::Amqp => None,
        };
        let backend_redis = if is_redis(&settings.backend) {
            let client = servers::redis_client(&settings.backend)?;
            Some(servers::redis_connection(&client).await?)
        } else {
            None
        };
        let amqp = match settings.kind {
            BrokerKind::Amqp => Some(servers::amqp_connect(&settings.broker).await?),
            BrokerKind::Redis => None,
        };
        let amqp_pid = match settings.kind {
            BrokerKind::Amqp => {
                servers::local_port(&settings.broker, 5672).and_then(proc_stats::listener_pid)
            }
            BrokerKind::Redis => None,
        };
        Ok(Env {
            settings,
            queue,
            raw_queue,
            configured,
            null,
            broker_redis,
            backend_redis,
            amqp,
            amqp_pid,
            ticks: proc_stats::clock_ticks(),
        })
    }

    /// The CPU seconds the servers (the Redis the work writes to: the broker's, else the backend's; the
    /// local RabbitMQ process) have used so far, and with `own` this process's (the senders'); what cannot
    /// be read is left out.
    async fn cpu_reading(&mut self, own: bool) -> Result<CpuReading, BenchError> {
        let conn = match &mut self.broker_redis {
            Some((_, conn)) => Some(conn),
            None => self.backend_redis.as_mut(),
        };
        let redis = match conn {
            Some(conn) => Some(commands::server_cpu_seconds(conn).await?),
            None => None,
        };
        let rabbitmq = self
            .amqp_pid
            .and_then(|pid| proc_stats::cpu_seconds(pid, self.ticks).ok());
        let own = own
            .then(|| proc_stats::cpu_seconds(std::process::id(), self.ticks).ok())
            .flatten();
        Ok(CpuReading {
            own,
            redis,
            rabbitmq,
        })
    }

    /// The backends measured: the configured one, then `null` unless that is the configured one.
    fn backends(&self) -> Vec<(&'static str, String)> {
        let mut list = vec![(
            backend_label(&self.settings.backend),
            self.settings.backend.clone(),
        )];
        if self.settings.backend != "null" {
            list.push(("null", "null".to_owned()));
        }
        list
    }

    /// A few sends through each server first, so that no measurement pays for connecting and declaring.
    async fn warm_up(&mut self) -> Result<(), BenchError> {
        let mut uuids = Vec::new();
        for server in [&self.configured, &self.null] {
            uuids.extend(measure::send_concurrent(server, 20, 2).await?.uuids);
        }
        self.reset(&uuids).await
    }

    /// Empties the queue and deletes the task states of `uuids`.
    async fn reset(&mut self, uuids: &[String]) -> Result<(), BenchError> {
        self.configured
            .broker()
            .inspect()
            .map_err(machinery::Error::from)?
            .purge(&self.queue)
            .await
            .map_err(machinery::Error::from)?;
        if let Some(conn) = &mut self.backend_redis {
            servers::forget_states(conn, uuids).await?;
        }
        Ok(())
    }

    /// Deletes everything the run created on the broker (best effort: failures are printed).
    async fn clean_up(&mut self) {
        let queues = [self.queue.clone(), self.raw_queue.clone()];
        if let Some((_, conn)) = &mut self.broker_redis {
            if let Err(e) = servers::delete_redis_queue(conn, &queues[0], &queues[1..]).await {
                eprintln!("machinery-bench: clean-up: {e}");
            }
        }
        if let Some(connection) = &self.amqp {
            let all = [
                queues[0].clone(),
                format!("{}.dead", queues[0]),
                queues[1].clone(),
            ];
            if let Err(e) = servers::delete_amqp_queues(connection, &all).await {
                eprintln!("machinery-bench: clean-up: {e}");
            }
            let _ = connection.close(200, "OK".into()).await;
        }
    }

    fn worker(&self, backend: &str, concurrency: usize, expect: u64) -> WorkerSpec {
        WorkerSpec {
            broker: self.settings.broker.clone(),
            backend: backend.to_owned(),
            queue: self.queue.clone(),
            concurrency,
            expect,
            prefetch: self.settings.prefetch,
            runtime: self.settings.worker_runtime,
        }
    }

    /// A message as machinery sends it, for the raw ceilings.
    fn payload(&self) -> Result<Vec<u8>, BenchError> {
        let mut signature = crate::noop::signature().erase();
        signature.uuid = new_task_uuid();
        signature.routing_key = self.queue.clone();
        signature.headers = Some(machinery::Headers::new());
        signature
            .to_json()
            .map_err(|e| BenchError::Failed(format!("encoding a sample message: {e}")))
    }
}

/// Runs the benchmark, prints the tables and appends them to the record.
pub(crate) async fn run(settings: Settings) -> Result<(), BenchError> {
    let started = Instant::now();
    let mut env = Env::open(settings.clone()).await?;
    eprintln!(
        "machinery-bench: queue {}, {} tasks per measurement, {} run(s) each",
        env.queue, settings.tasks, settings.repeat
    );
    let measured = measure_all(&mut env).await;
    let redis = match &mut env.broker_redis {
        Some((_, conn)) => Some(conn),
        None => env.backend_redis.as_mut(),
    };
    let machine = Machine::detect(&settings, redis).await;
    env.clean_up().await;
    let mut results = measured?;
    results.elapsed = started.elapsed();
    let text = report::render(&settings, &machine, &results);
    println!("{text}");
    if let Some(path) = &settings.record {
        report::append(path, &text)?;
        eprintln!("machinery-bench: appended to {}", path.display());
    }
    Ok(())
}

async fn measure_all(env: &mut Env) -> Result<Results, BenchError> {
    let settings = env.settings.clone();
    env.warm_up().await?;
    let payload = env.payload()?;
    let mut results = Results {
        payload_len: payload.len(),
        ..Results::default()
    };
    for run in 1..=settings.repeat {
        let tag = format!("run {run}/{}", settings.repeat);
        eprintln!("machinery-bench: {tag}: broker ceiling");
        ceilings(env, &payload, &mut results).await?;
        eprintln!("machinery-bench: {tag}: send rates");
        sends(env, &mut results).await?;
        for (label, backend) in env.backends() {
            for &concurrency in &settings.concurrency {
                eprintln!(
                    "machinery-bench: {tag}: drain, {label} backend, concurrency {concurrency}"
                );
                drain_once(env, label, &backend, concurrency, &mut results).await?;
            }
        }
    }
    eprintln!("machinery-bench: round trips and idle worker RSS");
    round_trips(env, &mut results).await?;
    if env.broker_redis.is_some() {
        eprintln!("machinery-bench: counting the worker's Redis commands with MONITOR");
        monitored_drain(env, &mut results).await?;
    }
    Ok(results)
}

async fn ceilings(env: &mut Env, payload: &[u8], results: &mut Results) -> Result<(), BenchError> {
    let settings = &env.settings;
    let rates = if let Some((client, _)) = &env.broker_redis {
        ceiling::redis(
            client,
            &env.raw_queue,
            settings.tasks,
            settings.senders,
            payload,
        )
        .await?
    } else if let Some(connection) = &env.amqp {
        ceiling::amqp(connection, &env.raw_queue, settings.tasks, payload).await?
    } else {
        Vec::new()
    };
    for (ceiling, rate) in rates {
        results.ceilings.entry(ceiling).or_default().push(rate);
    }
    Ok(())
}

async fn sends(env: &mut Env, results: &mut Results) -> Result<(), BenchError> {
    let (tasks, senders) = (env.settings.tasks, env.settings.senders);
    let configured = backend_label(&env.settings.backend);
    let one_by_one = env.settings.tasks_at(1);
    let before = env.cpu_reading(true).await?;
    let sent = measure::send_sequential(&env.configured, one_by_one).await?;
    let cpu = (before, env.cpu_reading(true).await?);
    env.reset(&sent.uuids).await?;
    let row = (1, configured);
    SendRow::add(&mut results.sends, row, one_by_one, sent.rate, cpu);
    let before = env.cpu_reading(true).await?;
    let sent = measure::send_concurrent(&env.configured, tasks, senders).await?;
    let cpu = (before, env.cpu_reading(true).await?);
    env.reset(&sent.uuids).await?;
    SendRow::add(
        &mut results.sends,
        (senders, configured),
        tasks,
        sent.rate,
        cpu,
    );
    if env.settings.backend != "null" {
        let before = env.cpu_reading(true).await?;
        let sent = measure::send_concurrent(&env.null, tasks, senders).await?;
        let cpu = (before, env.cpu_reading(true).await?);
        env.reset(&[]).await?;
        SendRow::add(&mut results.sends, (senders, "null"), tasks, sent.rate, cpu);
    }
    Ok(())
}

/// Fills the queue with `tasks` tasks (with this backend's PENDING states) and checks it holds them.
async fn fill(env: &mut Env, backend: &str, tasks: u64) -> Result<Vec<String>, BenchError> {
    env.reset(&[]).await?;
    let server = if backend == "null" {
        &env.null
    } else {
        &env.configured
    };
    let sent = measure::send_concurrent(server, tasks, env.settings.senders).await?;
    let stats = server
        .broker()
        .inspect()
        .map_err(machinery::Error::from)?
        .queue_stats(&env.queue)
        .await
        .map_err(machinery::Error::from)?;
    if stats.pending != tasks {
        return Err(BenchError::Failed(format!(
            "queue {} holds {} tasks after sending {tasks}",
            env.queue, stats.pending
        )));
    }
    Ok(sent.uuids)
}

async fn drain_once(
    env: &mut Env,
    label: &'static str,
    backend: &str,
    concurrency: usize,
    results: &mut Results,
) -> Result<(), BenchError> {
    let tasks = env.settings.tasks_at(concurrency);
    let uuids = fill(env, backend, tasks).await?;
    let counted = concurrency == COUNTED_CONCURRENCY && backend == env.settings.backend;
    let background = match (&mut env.broker_redis, counted) {
        (Some((_, conn)), true) => Some(background_rate(conn).await?),
        _ => None,
    };
    let spec = env.worker(backend, concurrency, tasks);
    let mut before = env.cpu_reading(false).await?;
    let stats = env.broker_redis.as_mut().map(|(_, conn)| conn);
    let drained: Drained = measure::drain(&spec, env.ticks, stats).await?;
    let mut after = env.cpu_reading(false).await?;
    // The worker process's own CPU, as it reported it from `ready` to its last task.
    (before.own, after.own) = (Some(0.0), Some(drained.finished.cpu_seconds));
    env.reset(&uuids).await?;
    let row = DrainRow::find(&mut results.drains, label, concurrency, tasks);
    row.rates.push(drained.rate);
    row.cpu.push(tasks, before, after);
    row.rss_end.push(drained.finished.rss as f64);
    row.failures += drained.finished.failures;
    if let Some(delta) = &drained.commands {
        row.commands_per_task
            .push(delta.total() as f64 / tasks as f64);
    }
    if counted {
        if let Some(delta) = drained.commands {
            let count = results.commands.get_or_insert_with(CommandCount::default);
            count.tasks = tasks;
            count.runs.push(delta);
            count.background_per_second =
                count.background_per_second.max(background.unwrap_or(0.0));
        }
    }
    Ok(())
}

/// Commands per second other clients run on the broker's Redis, seen over a short window.
async fn background_rate(conn: &mut MultiplexedConnection) -> Result<f64, BenchError> {
    let before = commands::snapshot(conn).await?;
    let started = Instant::now();
    tokio::time::sleep(BACKGROUND_WINDOW).await;
    let after = commands::snapshot(conn).await?;
    Ok(Delta::between(&before, &after).total() as f64 / started.elapsed().as_secs_f64())
}

async fn round_trips(env: &mut Env, results: &mut Results) -> Result<(), BenchError> {
    env.reset(&[]).await?;
    let backend = env.settings.backend.clone();
    let spec = env.worker(&backend, ROUND_TRIP_CONCURRENCY, 0);
    let child = ChildWorker::spawn(&spec, env.ticks).await?;
    tokio::time::sleep(IDLE_WAIT).await;
    results.idle_rss = Some(child.rss()?);
    if backend == "null" {
        results.round_trip_skipped =
            Some("the null backend stores no results, so `get` cannot wait for one".into());
    } else if env.settings.round_trips == 0 {
        results.round_trip_skipped = Some("--round-trips 0".into());
    } else {
        let count = env.settings.round_trips;
        let (mut times, uuids) = measure::round_trips(&env.configured, count).await?;
        times.sort();
        results.round_trip = Some(RoundTrip {
            count,
            p50: measure::quantile(&times, 0.50),
            p99: measure::quantile(&times, 0.99),
            max: times.last().copied().unwrap_or_default(),
        });
        env.reset(&uuids).await?;
    }
    child.stop().await
}

/// A drain of a few tasks watched with `MONITOR`, untimed: the worker's own commands, top-level and
/// inside scripts.
async fn monitored_drain(env: &mut Env, results: &mut Results) -> Result<(), BenchError> {
    let tasks = MONITORED_TASKS.min(env.settings.tasks);
    let backend = env.settings.backend.clone();
    let uuids = fill(env, &backend, tasks).await?;
    let Some((client, _)) = &env.broker_redis else {
        return Ok(());
    };
    // Dropped on an error below, it stops reading and closes its connection.
    let monitor = Monitor::start(client).await?;
    let spec = env.worker(&backend, COUNTED_CONCURRENCY, tasks);
    let mut child = ChildWorker::spawn(&spec, env.ticks).await?;
    let finished = child.wait_done(measure::phase_timeout(tasks)).await;
    let ports = proc_stats::tcp_local_ports(child.pid());
    let tally = monitor.finish(&ports).await;
    child.stop().await?;
    finished?;
    let tally = tally?;
    env.reset(&uuids).await?;
    if ports.is_empty() || tally.top_level_total() == 0 {
        results.notes.push(
            "MONITOR saw no command from the worker process's TCP connections (a unix socket?); \
             the top-level/script split is left out."
                .into(),
        );
        return Ok(());
    }
    let count = results.commands.get_or_insert_with(CommandCount::default);
    count.monitored_tasks = tasks;
    count.tally = Some(tally);
    Ok(())
}
