//! `machinery-bench cluster`: the drain rate of Redis on one node against a Redis Cluster, with one queue
//! and with several (each queue's keys share its slot, so several queues spread over the masters).
//!
//! The queues are named so that the `i`th lands in the `i`th master's slot range. For each target and
//! queue count: the queues are filled with no-op tasks (null result backend), then
//! one in-process worker per queue drains them, and the rate is all tasks over the time from the workers'
//! start to the last task run; beside it, the CPU time this process and the Redis servers (every node of
//! the cluster, from `INFO server`'s `process_id` and /proc) spent per 10 000 tasks, which tells where the
//! time went. Printed as a markdown table (stdout), for `docs/benchmarks.md`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use machinery::broker::Outgoing;
use machinery::signature::new_task_uuid;
use machinery::{Config, Server, Worker};

use crate::cli::ClusterArgs;
use crate::error::BenchError;
use crate::proc_stats;

/// Runs of the no-op task of this benchmark, counted.
static RAN: AtomicU64 = AtomicU64::new(0);

#[machinery::task]
async fn cluster_noop() -> Result<(), machinery::TaskError> {
    RAN.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// Messages published per round trip while filling.
const FILL_BATCH: usize = 500;

fn failed(what: &str) -> impl FnOnce(machinery::Error) -> BenchError + '_ {
    move |e| BenchError::Failed(format!("{what}: {e}"))
}

/// Fills `queue` with `tasks` no-op tasks.
async fn fill(server: &Server, queue: &str, tasks: u64) -> Result<(), BenchError> {
    let mut left = tasks;
    while left > 0 {
        let n = left.min(FILL_BATCH as u64);
        let signatures: Vec<_> = (0..n)
            .map(|_| {
                let mut signature = cluster_noop::signature().erase();
                signature.uuid = new_task_uuid();
                signature.routing_key = queue.to_owned();
                signature
            })
            .collect();
        let batch = signatures
            .iter()
            .map(|signature| {
                let body = signature
                    .to_json()
                    .map_err(|e| BenchError::Failed(format!("encoding a message: {e}")))?;
                Ok(Outgoing {
                    uuid: &signature.uuid,
                    name: &signature.name,
                    routing_key: queue,
                    body,
                    eta: None,
                    priority: 0,
                    headers: machinery::Headers::new(),
                })
            })
            .collect::<Result<Vec<_>, BenchError>>()?;
        server
            .broker()
            .publish_many(batch)
            .await
            .map_err(|e| failed("filling")(e.into()))?;
        left -= n;
    }
    Ok(())
}

/// Slots per master in the cluster `redis-cli --cluster create` makes with three masters (0-5460,
/// 5461-10922, 10923-16383; a failover changes which node serves a range, not the ranges).
const SLOTS_PER_MASTER: u16 = 5461;

/// `count` fresh queue names, the `i`th in the `i`th master's slot range (asked of the cluster with
/// `CLUSTER KEYSLOT`), so that three queues are served by three masters.
async fn queue_names(seeds: &str, count: usize) -> Result<Vec<String>, BenchError> {
    let what = || format!("asking the cluster {seeds} for key slots");
    let nodes: Vec<String> = seeds
        .trim_start_matches("redis://")
        .split(',')
        .map(|addr| format!("redis://{addr}"))
        .collect();
    let client = redis::cluster::ClusterClient::new(nodes)
        .map_err(|e| BenchError::Failed(format!("{}: {e}", what())))?;
    let mut conn = client
        .get_async_connection()
        .await
        .map_err(|e| BenchError::Failed(format!("{}: {e}", what())))?;
    let run = uuid::Uuid::new_v4().simple().to_string();
    let mut names = Vec::new();
    for i in 0..count {
        for n in 0.. {
            let name = format!("bench-{}-{i}-{n}", &run[..8]);
            let slot: u16 = redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(&name)
                .query_async(&mut conn)
                .await
                .map_err(|e| BenchError::Failed(format!("{}: {e}", what())))?;
            if usize::from(slot / SLOTS_PER_MASTER) == i % 3 {
                names.push(name);
                break;
            }
        }
    }
    Ok(names)
}

/// The pids of the Redis servers behind `url` (`INFO server`'s `process_id`): the one node, or every
/// node of the cluster (replicas included: they replay every write).
async fn server_pids(url: &str, cluster: bool) -> Result<Vec<u32>, BenchError> {
    let failed =
        |e: redis::RedisError| BenchError::Failed(format!("asking {url} for its pids: {e}"));
    let first = url.split(',').next().unwrap_or(url);
    let client = crate::servers::redis_client(first)?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(failed)?;
    let addrs: Vec<String> = if cluster {
        let nodes: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async(&mut conn)
            .await
            .map_err(failed)?;
        nodes
            .lines()
            .filter_map(|line| line.split_whitespace().nth(1))
            .filter_map(|addr| addr.split('@').next())
            .map(|addr| format!("redis://{addr}"))
            .collect()
    } else {
        vec![first.to_owned()]
    };
    let mut pids = Vec::new();
    for addr in addrs {
        let mut conn = crate::servers::redis_client(&addr)?
            .get_multiplexed_async_connection()
            .await
            .map_err(failed)?;
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut conn)
            .await
            .map_err(failed)?;
        if let Some(pid) = info
            .lines()
            .find_map(|line| line.strip_prefix("process_id:"))
            .and_then(|pid| pid.trim().parse().ok())
        {
            pids.push(pid);
        }
    }
    Ok(pids)
}

/// CPU seconds used so far by this process and by `servers`.
fn cpu(servers: &[u32], ticks: f64) -> Result<(f64, f64), BenchError> {
    let client = proc_stats::cpu_seconds(std::process::id(), ticks)?;
    let mut server = 0.0;
    for &pid in servers {
        server += proc_stats::cpu_seconds(pid, ticks)?;
    }
    Ok((client, server))
}

/// One row: tasks per second, and CPU seconds of the client and of the servers per 10 000 tasks.
#[derive(Debug, Clone, Copy)]
struct Drained {
    rate: f64,
    client_cpu: f64,
    server_cpu: f64,
}

/// Drains `tasks` per queue from `queues` fresh queues on `url`.
async fn drain(
    url: &str,
    cluster: bool,
    queues: usize,
    args: &ClusterArgs,
) -> Result<Drained, BenchError> {
    let ticks = proc_stats::clock_ticks();
    let pids = server_pids(url, cluster).await?;
    let mut servers = Vec::new();
    for queue in queue_names(&args.cluster, queues).await? {
        let mut config = Config::new(url, "null").with_default_queue(&queue);
        config.redis.cluster_enabled = cluster;
        let server = Server::new(config).await.map_err(failed("connecting"))?;
        fill(&server, &queue, args.tasks).await?;
        servers.push(server);
    }
    let total = args.tasks * queues as u64;
    RAN.store(0, Ordering::SeqCst);
    let (client_before, server_before) = cpu(&pids, ticks)?;
    let started = Instant::now();
    let mut running = Vec::new();
    for server in &servers {
        running.push(
            Worker::new(server)
                .register(cluster_noop::task())
                .concurrency(args.concurrency)
                .start()
                .await?,
        );
    }
    while RAN.load(Ordering::SeqCst) < total {
        if started.elapsed() > Duration::from_secs(600) {
            return Err(BenchError::Failed(format!(
                "{} of {total} tasks ran in 10 minutes",
                RAN.load(Ordering::SeqCst)
            )));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let took = started.elapsed();
    let (client_after, server_after) = cpu(&pids, ticks)?;
    for worker in running {
        worker.shutdown(Duration::from_secs(10)).await?;
    }
    let per_10k = 10_000.0 / total as f64;
    Ok(Drained {
        rate: total as f64 / took.as_secs_f64(),
        client_cpu: (client_after - client_before) * per_10k,
        server_cpu: (server_after - server_before) * per_10k,
    })
}

/// Runs the comparison and prints the table.
pub(crate) async fn run(args: ClusterArgs) -> Result<(), BenchError> {
    let mut rows = Vec::new();
    for queues in [1usize, 3] {
        for (label, url, cluster) in [
            ("one node", args.single.as_str(), false),
            ("cluster, 3 masters", args.cluster.as_str(), true),
        ] {
            let mut runs = Vec::new();
            for _ in 0..args.repeat.max(1) {
                eprintln!("machinery-bench cluster: {label}, {queues} queue(s)");
                runs.push(drain(url, cluster, queues, &args).await?);
            }
            runs.sort_by(|a, b| a.rate.total_cmp(&b.rate));
            rows.push((label, queues, runs[runs.len() / 2]));
        }
    }
    println!(
        "| target | queues | workers (concurrency {}) | tasks | drain rate (tasks/s, median of {}) | client CPU s / 10k tasks | Redis CPU s / 10k tasks (all nodes) |",
        args.concurrency, args.repeat
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (label, queues, run) in rows {
        println!(
            "| {label} | {queues} | {queues} | {} | {:.0} | {:.2} | {:.2} |",
            args.tasks * queues as u64,
            run.rate,
            run.client_cpu,
            run.server_cpu,
        );
    }
    Ok(())
}
