//! The fault suite mixed with SIGKILL (issue 13): two worker processes (`tests/src/bin/test_worker.rs`)
//! whose links to the broker go through `machinery_tests::fault_proxy`, while a sender on a direct
//! connection keeps sending single tasks, chains of three and chords of five. Rounds of faults follow each
//! other: the workers' open links freeze (half-open), one worker is killed with SIGKILL and replaced, the
//! links are reset, another is killed, every link stalls, a third is killed. Then the faults heal and
//!
//! - every task sent reaches SUCCESS;
//! - through the execution ledger the workers keep (each run of `add`/`sum` appends its task id and the
//!   worker's pid to a Redis list, on a connection outside the proxy), every chord callback ran exactly
//!   once, and a task that ran more than once had a run in a worker that was then killed: a duplicate is
//!   only ever the re-run of a message whose worker died before acknowledging it;
//! - nothing is left in the queue or dead-lettered.
//!
//! On Redis the workers' result backend goes through the proxy too; on RabbitMQ it is the direct Redis.

mod redis_common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use machinery::{task, Chain, Chord, Config, Group, Server, TaskError};
use machinery_tests::amqp::{self, Cleanup};
use machinery_tests::fault_proxy::FaultProxy;
use machinery_tests::unfinished;
use machinery_tests::{require, unique, Service};
use redis_common::{raw, Names};

// The test process only sends: these give typed signatures for the tasks the worker processes run under
// the same names.
#[task(name = "add")]
async fn mixed_add(a: i64, b: i64) -> Result<i64, TaskError> {
    Ok(a + b)
}

#[task(name = "sum")]
async fn mixed_sum(xs: Vec<i64>) -> Result<i64, TaskError> {
    Ok(xs.iter().sum())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Redis,
    RabbitMq,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Round {
    /// Every open link of the workers goes silent for ever (new ones work).
    Freeze,
    /// Every open link is reset.
    Reset,
    /// No byte moves on any link for [`STALL`], then everything flows again.
    Stall,
    /// One worker process is killed with SIGKILL and a new one started.
    Kill,
}

const ROUNDS: [Round; 6] = [
    Round::Freeze,
    Round::Kill,
    Round::Reset,
    Round::Kill,
    Round::Stall,
    Round::Kill,
];
const EVERY: Duration = Duration::from_secs(4);
const STALL: Duration = Duration::from_secs(3);
/// How long every result may take after the last round: a frozen RabbitMQ link is noticed through
/// missed heartbeats (about 20 s); a killed Redis consumer's messages are recovered after its heartbeat
/// lapses (3 s here).
const ALL_DONE_WITHIN: Duration = Duration::from_secs(60);
const CONCURRENCY: usize = 4;

/// What the load sent: every id that must reach SUCCESS, and the chord callbacks among them.
#[derive(Debug, Default)]
struct Sent {
    ids: Vec<String>,
    callbacks: Vec<String>,
    singles: usize,
    chains: usize,
    chords: usize,
}

/// A single task every tick, a chain of 3 every 5th, a chord of 5 every 10th, until `stop`.
async fn load(sender: Server, sent: Arc<Mutex<Sent>>, stop: Arc<AtomicBool>) {
    for tick in 0..1000i64 {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let single = mixed_add::send(&sender, tick, 1).await.unwrap();
        let mut ids = vec![single.uuid().to_owned()];
        let mut callback = None;
        if tick % 5 == 0 {
            let chain = Chain::new(mixed_add::signature(tick, 1))
                .then(mixed_add::partial(1))
                .then(mixed_add::partial(1));
            let result = sender.send_chain(chain).await.unwrap();
            ids.extend(result.steps().iter().map(|s| s.uuid().to_owned()));
        }
        if tick % 10 == 0 {
            let group = Group::new((0..5).map(|k| mixed_add::signature(tick, k)));
            let result = sender
                .send_chord(Chord::new(group, mixed_sum::partial()))
                .await
                .unwrap();
            ids.extend(result.group().members().iter().map(|m| m.uuid().to_owned()));
            ids.push(result.callback().uuid().to_owned());
            callback = Some(result.callback().uuid().to_owned());
        }
        {
            let mut sent = sent.lock().unwrap();
            sent.ids.extend(ids);
            sent.singles += 1;
            sent.chains += usize::from(tick % 5 == 0);
            sent.chords += usize::from(callback.is_some());
            sent.callbacks.extend(callback);
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

/// The worker processes: how to start one, the ones running, and the pids killed.
struct Fleet {
    env: Vec<(String, String)>,
    running: Vec<tokio::process::Child>,
    killed: HashSet<u32>,
}

impl Fleet {
    fn spawn(&self) -> tokio::process::Child {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_test_worker"))
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("WORKER_CONCURRENCY", CONCURRENCY.to_string())
            .env("RESULTS_EXPIRE_IN", "300")
            .env("RUST_LOG", "error")
            .kill_on_drop(true)
            .spawn()
            .expect("start the test worker")
    }

    /// SIGKILLs the oldest worker and starts a new one in its place.
    async fn kill_one(&mut self) {
        let mut victim = self.running.remove(0);
        let pid = victim.id().expect("the worker is running");
        victim.kill().await.expect("SIGKILL a worker");
        self.killed.insert(pid);
        let fresh = self.spawn();
        self.running.push(fresh);
    }

    /// Stops every worker with SIGTERM and waits for it to exit.
    async fn stop(mut self) {
        for child in &mut self.running {
            if let Some(pid) = child.id() {
                let status = std::process::Command::new("kill")
                    .arg("-TERM")
                    .arg(pid.to_string())
                    .status()
                    .expect("run kill");
                assert!(status.success(), "kill -TERM {pid}");
            }
            let exit = tokio::time::timeout(Duration::from_secs(20), child.wait())
                .await
                .expect("a worker stops within 20 s of SIGTERM")
                .expect("wait for a worker");
            assert!(exit.success(), "a worker exits cleanly: {exit:?}");
        }
    }
}

/// The ledger: each task id with the pids of the workers that ran it, in order.
async fn ledger(key: &str) -> HashMap<String, Vec<u32>> {
    let mut conn = raw().await;
    let entries: Vec<String> = redis::cmd("LRANGE")
        .arg(key)
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .expect("read the ledger");
    let mut runs: HashMap<String, Vec<u32>> = HashMap::new();
    for entry in entries {
        let (uuid, pid) = entry.split_once(' ').expect("ledger entry: uuid pid");
        runs.entry(uuid.to_owned())
            .or_default()
            .push(pid.parse().expect("ledger pid"));
    }
    let _: () = redis::cmd("DEL")
        .arg(key)
        .query_async(&mut conn)
        .await
        .expect("delete the ledger");
    runs
}

async fn mixed(transport: Transport, test: &str) {
    if !require(Service::Redis, test)
        || (transport == Transport::RabbitMq && !require(Service::RabbitMq, test))
    {
        return;
    }
    let ledger_key = unique("mixed_ledger");
    let (sender_config, upstream, mut env, names, cleanup) = match transport {
        Transport::Redis => {
            let names = Names::new("mixed_redis");
            let env = vec![
                ("REDIS_DELAYED_TASKS_KEY".to_owned(), names.delayed.clone()),
                ("REDIS_HEARTBEAT_TIMEOUT".to_owned(), "3000".to_owned()),
            ];
            (
                names.config(),
                Service::Redis.addr(),
                env,
                Some(names),
                None,
            )
        }
        Transport::RabbitMq => {
            let mut config: Config = amqp::config("mixed_amqp");
            config.result_backend = Service::Redis.url();
            let env = vec![
                ("AMQP_EXCHANGE".to_owned(), config.amqp.exchange.clone()),
                (
                    "AMQP_BINDING_KEY".to_owned(),
                    config.amqp.binding_key.clone(),
                ),
                ("RESULT_BACKEND".to_owned(), Service::Redis.url()),
            ];
            let cleanup = Cleanup::for_config(&config);
            (config, Service::RabbitMq.addr(), env, None, Some(cleanup))
        }
    };
    let proxy = FaultProxy::start(upstream).await;
    match transport {
        Transport::Redis => {
            env.push(("BROKER".to_owned(), proxy.redis_url()));
            env.push(("RESULT_BACKEND".to_owned(), proxy.redis_url()));
        }
        Transport::RabbitMq => env.push((
            "BROKER".to_owned(),
            format!("amqp://guest:guest@{}/", proxy.addr()),
        )),
    }
    env.push((
        "DEFAULT_QUEUE".to_owned(),
        sender_config.default_queue.clone(),
    ));
    env.push(("LEDGER_KEY".to_owned(), ledger_key.clone()));
    env.push(("LEDGER_URL".to_owned(), Service::Redis.url()));
    let mut fleet = Fleet {
        env,
        running: Vec::new(),
        killed: HashSet::new(),
    };
    fleet.running = vec![fleet.spawn(), fleet.spawn()];
    let sender = Server::new(sender_config).await.unwrap();
    let first = mixed_add::send(&sender, 1, 1).await.unwrap();
    assert_eq!(
        first.get(Duration::from_secs(30)).await.unwrap(),
        2,
        "the workers serve before any fault"
    );

    let sent = Arc::new(Mutex::new(Sent::default()));
    sent.lock().unwrap().ids.push(first.uuid().to_owned());
    let stop = Arc::new(AtomicBool::new(false));
    let loading = tokio::spawn(load(sender.clone(), sent.clone(), stop.clone()));
    let mut links_hit = Vec::new();
    for round in ROUNDS {
        let started = Instant::now();
        match round {
            Round::Freeze => links_hit.push(proxy.freeze_open()),
            Round::Reset => links_hit.push(proxy.reset_all()),
            Round::Stall => {
                proxy.stall();
                links_hit.push(proxy.open_connections());
                tokio::time::sleep(STALL).await;
                proxy.heal();
            }
            Round::Kill => fleet.kill_one().await,
        }
        tokio::time::sleep(EVERY.saturating_sub(started.elapsed())).await;
    }
    stop.store(true, Ordering::SeqCst);
    loading.await.unwrap();
    proxy.heal();

    let sent = std::mem::take(&mut *sent.lock().unwrap());
    let healed = Instant::now();
    let mut left = unfinished(&sender, &sent.ids).await;
    while !left.is_empty() && healed.elapsed() < ALL_DONE_WITHIN {
        tokio::time::sleep(Duration::from_millis(250)).await;
        left = unfinished(&sender, &left).await;
    }
    let all_done_after = healed.elapsed();
    let killed = fleet.killed.clone();
    fleet.stop().await;
    let runs = ledger(&ledger_key).await;

    let duplicates: Vec<(&String, &Vec<u32>)> = runs.iter().filter(|(_, p)| p.len() > 1).collect();
    let unexplained: Vec<_> = duplicates
        .iter()
        .filter(|(_, pids)| !pids.iter().any(|pid| killed.contains(pid)))
        .collect();
    let runs_by_killed = runs
        .values()
        .flatten()
        .filter(|pid| killed.contains(pid))
        .count();
    let callback_runs: Vec<usize> = sent
        .callbacks
        .iter()
        .map(|id| runs.get(id).map_or(0, Vec::len))
        .collect();
    eprintln!(
        "{transport:?}, rounds {ROUNDS:?}: sent {} tasks ({} single, {} chains of 3, {} chords of 5); \
         {} SUCCESS {all_done_after:?} after the heal; {} ran more than once ({} unexplained by a \
         SIGKILL); {runs_by_killed} runs were made by the {} workers later killed; chord callbacks run \
         {callback_runs:?}; links hit per network fault {links_hit:?}",
        sent.ids.len(),
        sent.singles,
        sent.chains,
        sent.chords,
        sent.ids.len() - left.len(),
        duplicates.len(),
        unexplained.len(),
        killed.len(),
    );
    assert!(sent.singles >= 20 && sent.chains >= 4 && sent.chords >= 2);
    assert!(
        links_hit.iter().all(|&n| n >= 2),
        "each network fault hit the workers' links: {links_hit:?}"
    );
    assert!(
        left.is_empty(),
        "{transport:?}: {} of {} tasks never reached SUCCESS, e.g. {:?}",
        left.len(),
        sent.ids.len(),
        &left[..left.len().min(5)]
    );
    assert!(
        sent.ids.iter().all(|id| runs.contains_key(id)),
        "a task reached SUCCESS without a run in the ledger"
    );
    assert!(
        callback_runs.iter().all(|&n| n == 1),
        "{transport:?}: every chord callback runs exactly once: {callback_runs:?}"
    );
    assert!(
        unexplained.is_empty(),
        "{transport:?}: tasks ran more than once with no SIGKILL to explain it: {unexplained:?} (killed: {killed:?})"
    );

    let stats = sender
        .broker()
        .inspect()
        .unwrap()
        .queue_stats(&sender.config().default_queue)
        .await
        .unwrap();
    assert_eq!(stats.pending, 0, "nothing left in the queue: {stats:?}");
    assert!(
        matches!(stats.dead, None | Some(0)),
        "nothing dead-lettered: {stats:?}"
    );
    if let Some(names) = names {
        names.cleanup().await;
    }
    drop(cleanup);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_workers_under_link_faults_and_sigkill_lose_nothing_and_run_callbacks_once() {
    mixed(
        Transport::Redis,
        "redis_workers_under_link_faults_and_sigkill_lose_nothing_and_run_callbacks_once",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_workers_under_link_faults_and_sigkill_lose_nothing_and_run_callbacks_once() {
    mixed(
        Transport::RabbitMq,
        "rabbitmq_workers_under_link_faults_and_sigkill_lose_nothing_and_run_callbacks_once",
    )
    .await;
}
