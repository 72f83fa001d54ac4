//! The inspection commands of the Redis broker (counts, listings, requeue, purge), behind
//! `Broker::inspect` and used by the `machinery` command-line tool. None is on a worker's path, so they
//! may walk the keyspace (`SCAN`, which never blocks Redis for long).

use std::collections::BTreeSet;
use std::sync::LazyLock;
use std::time::Duration;

use async_trait::async_trait;
use chrono::DateTime;
use redis::AsyncCommands as _;

use super::broker::card::{self, CARD_PREFIX};
use super::broker::{dead_letter_key, op, Envelope, Inner, QueueKeys, RedisBroker, SCRIPTS};
use super::conn::Healing;
use super::lua::Lua;
use crate::broker::{BrokerError, DeadLetter, DelayedMessage, Inspect, QueueStats, WorkerInfo};
use crate::wire::signature::Signature;

/// The scripts only inspection runs, kept in `scripts/<name>.lua` where each file's header names its
/// KEYS and ARGV and what it does atomically.
struct Scripts {
    stats: Lua,
    purge: Lua,
}

static INSPECT_SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    stats: Lua::new(include_str!("scripts/stats.lua")),
    purge: Lua::new(include_str!("scripts/purge.lua")),
});

const CONSUMERS_PREFIX: &str = "machinery:consumers:";
const INFLIGHT_PREFIX: &str = "machinery:inflight:";
/// Keys asked for per `SCAN`/`ZSCAN`/`LRANGE` step.
const STEP: usize = 1000;

#[async_trait]
impl Inspect for RedisBroker {
    async fn queue_stats(&self, queue: &str) -> Result<QueueStats, BrokerError> {
        let keys = self.inner.keys(queue);
        let mut conn = self.inner.conn.clone();
        let (pending, delayed, in_flight, dead): (u64, u64, u64, u64) = INSPECT_SCRIPTS
            .stats
            .run(
                &mut conn,
                &[
                    queue.as_bytes(),
                    keys.delayed
                        .as_deref()
                        .unwrap_or(self.delayed_key())
                        .as_bytes(),
                    keys.consumers.as_bytes(),
                    keys.dead.as_bytes(),
                ],
                &[
                    queue.as_bytes(),
                    keys.inflight_prefix.as_bytes(),
                    self.inner.default_queue.as_bytes(),
                ],
            )
            .await
            .map_err(op("queue statistics"))?;
        Ok(QueueStats {
            queue: queue.to_owned(),
            pending,
            delayed: Some(delayed),
            in_flight: Some(in_flight),
            dead: Some(dead),
        })
    }

    /// `LLEN` of the queue and `ZCARD` of the delayed-task set, in one round trip. The set is shared by
    /// every queue (Go's layout), so `delayed` counts the delayed tasks of all of them; per queue it takes
    /// the full scan of [`Inspect::queue_stats`], which is for the CLI, not for a sampler.
    async fn queue_depth(&self, queue: &str) -> Result<QueueStats, BrokerError> {
        let mut conn = self.inner.conn.clone();
        let (pending, delayed): (u64, u64) = redis::pipe()
            .llen(queue)
            .zcard(self.delayed_key())
            .query_async(&mut conn)
            .await
            .map_err(op("queue depth"))?;
        Ok(QueueStats {
            queue: queue.to_owned(),
            pending,
            delayed: Some(delayed),
            in_flight: None,
            dead: None,
        })
    }

    async fn pending(&self, queue: &str, limit: usize) -> Result<Vec<Vec<u8>>, BrokerError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut conn = self.inner.conn.clone();
        conn.lrange(queue, 0, (limit - 1) as isize)
            .await
            .map_err(op("list pending messages"))
    }

    async fn dead_letters(
        &self,
        queue: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, BrokerError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut conn = self.inner.conn.clone();
        let raw: Vec<Vec<u8>> = conn
            .lrange(self.inner.keys(queue).dead, 0, (limit - 1) as isize)
            .await
            .map_err(op("list dead letters"))?;
        Ok(raw
            .iter()
            .map(|entry| Envelope::decode(queue, entry))
            .collect())
    }

    async fn purge(&self, queue: &str) -> Result<u64, BrokerError> {
        let mut conn = self.inner.conn.clone();
        INSPECT_SCRIPTS
            .purge
            .run(&mut conn, &[queue.as_bytes()], &[])
            .await
            .map_err(op("purge"))
    }

    /// Found by scanning the keyspace (`SCAN`, which walks every key in steps without blocking Redis): the
    /// default queue; queues with a consumer registry `machinery:consumers:<queue>`, an in-flight list or a
    /// dead-letter list `<queue>.dead`; every other list whose first message is a task signature (Go
    /// queues nobody of ours consumes); and the routing keys of the delayed tasks. An empty queue is only
    /// found while a consumer is registered on it (Redis deletes empty lists).
    async fn queues(&self) -> Result<Vec<String>, BrokerError> {
        find_queues(&self.inner).await
    }

    /// `ZRANGE <delayed key> 0 <limit - 1> WITHSCORES`: the earliest first, the ETA from the score.
    async fn delayed(&self, limit: usize) -> Result<Vec<DelayedMessage>, BrokerError> {
        list_delayed(&self.inner, limit).await
    }

    /// Each dead letter moves back with one script call (`LREM` from `<queue>.dead` and `RPUSH` onto the
    /// queue, only if it was still there), so a message is never lost or duplicated, even beside another
    /// requeue. `--all` takes the entries present when it starts, not those dead-lettered meanwhile.
    async fn requeue_dead(&self, queue: &str, task_uuid: Option<&str>) -> Result<u64, BrokerError> {
        requeue_dead_letters(&self.inner, queue, task_uuid).await
    }

    /// Every registered consumer of every queue, with its heartbeat's age (against the Redis server's
    /// clock) and its in-flight list's length. A consumer whose heartbeat expired is listed as dead until
    /// a live consumer of its queue recovers its messages.
    async fn workers(&self) -> Result<Vec<WorkerInfo>, BrokerError> {
        list_workers(&self.inner).await
    }

    /// `LREM <queue>.dead 1 <entry>` for each matching entry: one that another client moved first is
    /// simply not counted.
    async fn delete_dead(&self, queue: &str, task_uuid: &str) -> Result<u64, BrokerError> {
        let dead = dead_letter_key(queue);
        let mut conn = self.inner.conn.clone();
        let mut deleted = 0;
        for entry in dead_entries(&mut conn, queue, Some(task_uuid)).await? {
            let removed: u64 = conn
                .lrem(&dead, 1, entry)
                .await
                .map_err(op("delete dead letters"))?;
            deleted += removed;
        }
        Ok(deleted)
    }
}

/// Every key matching `pattern` (and of `kind`, if given), walked with `SCAN`.
async fn scan(
    conn: &mut Healing,
    pattern: &str,
    kind: Option<&str>,
) -> Result<Vec<String>, BrokerError> {
    let mut keys = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(STEP);
        if let Some(kind) = kind {
            cmd.arg("TYPE").arg(kind);
        }
        let (next, batch): (u64, Vec<String>) =
            cmd.query_async(conn).await.map_err(op("scan keys"))?;
        keys.extend(batch);
        if next == 0 {
            return Ok(keys);
        }
        cursor = next;
    }
}

/// The routing key of a message, or `default` when it has none or is not a signature.
fn routing_key(body: &[u8], default: &str) -> String {
    Signature::from_json(body)
        .ok()
        .map(|mut signature| std::mem::take(&mut signature.routing_key))
        .filter(|key| !key.is_empty())
        .unwrap_or_else(|| default.to_owned())
}

async fn find_queues(inner: &Inner) -> Result<Vec<String>, BrokerError> {
    let mut conn = inner.conn.clone();
    let mut queues = BTreeSet::from([inner.default_queue.clone()]);
    for key in scan(&mut conn, &format!("{CONSUMERS_PREFIX}*"), Some("set")).await? {
        if let Some(queue) = key.strip_prefix(CONSUMERS_PREFIX) {
            queues.insert(queue.to_owned());
        }
    }
    let mut candidates = Vec::new();
    for key in scan(&mut conn, "*", Some("list")).await? {
        if let Some(rest) = key.strip_prefix(INFLIGHT_PREFIX) {
            // machinery:inflight:<queue>:<consumer tag>; tags have no colon, queue names may.
            if let Some((queue, _tag)) = rest.rsplit_once(':') {
                queues.insert(queue.to_owned());
            }
        } else if key.starts_with("machinery:") {
            // Chord member lists and other keys of ours.
        } else if let Some(queue) = key.strip_suffix(".dead") {
            queues.insert(queue.to_owned());
        } else if !queues.contains(&key) {
            candidates.push(key);
        }
    }
    for chunk in candidates.chunks(STEP) {
        let mut pipe = redis::pipe();
        for key in chunk {
            pipe.cmd("LINDEX").arg(key).arg(0);
        }
        let heads: Vec<Option<Vec<u8>>> = pipe
            .query_async(&mut conn)
            .await
            .map_err(op("read the heads of lists"))?;
        for (key, head) in chunk.iter().zip(heads) {
            let is_task = head
                .and_then(|body| Signature::from_json(&body).ok())
                .is_some_and(|signature| !signature.name.is_empty());
            if is_task {
                queues.insert(key.clone());
            }
        }
    }
    let mut cursor: u64 = 0;
    loop {
        let (next, flat): (u64, Vec<Vec<u8>>) = redis::cmd("ZSCAN")
            .arg(&inner.config.delayed_tasks_key)
            .arg(cursor)
            .arg("COUNT")
            .arg(STEP)
            .query_async(&mut conn)
            .await
            .map_err(op("scan delayed tasks"))?;
        // ZSCAN answers member, score, member, score, ...
        for body in flat.iter().step_by(2) {
            queues.insert(routing_key(body, &inner.default_queue));
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
    Ok(queues.into_iter().collect())
}

async fn list_delayed(inner: &Inner, limit: usize) -> Result<Vec<DelayedMessage>, BrokerError> {
    if limit == 0 {
        return Ok(Vec::new());
    }
    let mut conn = inner.conn.clone();
    let entries: Vec<(Vec<u8>, f64)> = redis::cmd("ZRANGE")
        .arg(&inner.config.delayed_tasks_key)
        .arg(0)
        .arg(limit - 1)
        .arg("WITHSCORES")
        .query_async(&mut conn)
        .await
        .map_err(op("list delayed messages"))?;
    Ok(entries
        .into_iter()
        .map(|(body, score)| DelayedMessage {
            // The score is the ETA in Unix nanoseconds (a double: exact to well under a microsecond).
            eta: DateTime::from_timestamp_nanos(score as i64),
            body,
        })
        .collect())
}

async fn requeue_dead_letters(
    inner: &Inner,
    queue: &str,
    task_uuid: Option<&str>,
) -> Result<u64, BrokerError> {
    let dead = inner.keys(queue).dead;
    let mut conn = inner.conn.clone();
    // Entries are identified by their exact bytes; `settle` removes one and pushes its body onto the
    // queue in one step, and does nothing if another client removed it first.
    let chosen = dead_entries(&mut conn, queue, task_uuid).await?;
    let mut moved = 0;
    for entry in chosen {
        let body = Envelope::decode(queue, &entry).body;
        let keys = &[dead.as_bytes(), queue.as_bytes()];
        let args = &[entry.as_slice(), body.as_slice()];
        let done: u64 = SCRIPTS
            .settle
            .run(&mut conn, keys, args)
            .await
            .map_err(op("requeue dead letters"))?;
        moved += done;
    }
    Ok(moved)
}

/// The entries of `<queue>.dead` present now (read in steps), all or those of one task id.
async fn dead_entries(
    conn: &mut Healing,
    queue: &str,
    task_uuid: Option<&str>,
) -> Result<Vec<Vec<u8>>, BrokerError> {
    let dead = dead_letter_key(queue);
    let mut chosen: Vec<Vec<u8>> = Vec::new();
    let total: usize = redis::cmd("LLEN")
        .arg(&dead)
        .query_async(conn)
        .await
        .map_err(op("read dead letters"))?;
    let mut start = 0;
    while start < total {
        let end = (start + STEP).min(total) - 1;
        let page: Vec<Vec<u8>> = redis::cmd("LRANGE")
            .arg(&dead)
            .arg(start)
            .arg(end)
            .query_async(conn)
            .await
            .map_err(op("read dead letters"))?;
        if page.is_empty() {
            break;
        }
        start += page.len();
        chosen.extend(page.into_iter().filter(|entry| match task_uuid {
            None => true,
            Some(uuid) => crate::broker::has_task_uuid(&Envelope::decode(queue, entry).body, uuid),
        }));
    }
    Ok(chosen)
}

async fn list_workers(inner: &Inner) -> Result<Vec<WorkerInfo>, BrokerError> {
    let mut conn = inner.conn.clone();
    // Registered consumers, and those whose card outlives them (dead, and already recovered).
    let mut consumers: BTreeSet<(String, String)> = BTreeSet::new();
    for registry in scan(&mut conn, &format!("{CONSUMERS_PREFIX}*"), Some("set")).await? {
        let Some(queue) = registry.strip_prefix(CONSUMERS_PREFIX) else {
            continue;
        };
        let tags: Vec<String> = redis::cmd("SMEMBERS")
            .arg(&registry)
            .query_async(&mut conn)
            .await
            .map_err(op("list workers"))?;
        consumers.extend(tags.into_iter().map(|tag| (queue.to_owned(), tag)));
    }
    for key in scan(&mut conn, &format!("{CARD_PREFIX}*"), Some("string")).await? {
        // machinery:worker:<queue>:<consumer tag>; tags have no colon, queue names may.
        if let Some((queue, tag)) = key
            .strip_prefix(CARD_PREFIX)
            .and_then(|rest| rest.rsplit_once(':'))
        {
            consumers.insert((queue.to_owned(), tag.to_owned()));
        }
    }
    let consumers: Vec<(QueueKeys, String)> = consumers
        .into_iter()
        // The scan finds the one-server layout's registries (a cluster's are in each node's keyspace).
        .map(|(queue, tag)| (QueueKeys::new(&queue, false), tag))
        .collect();
    let (now_secs, now_micros): (i64, i64) = redis::cmd("TIME")
        .query_async(&mut conn)
        .await
        .map_err(op("list workers"))?;
    let now_ms = now_secs * 1000 + now_micros / 1000;
    let mut workers = Vec::with_capacity(consumers.len());
    for chunk in consumers.chunks(STEP / 4) {
        let mut pipe = redis::pipe();
        for (keys, tag) in chunk {
            pipe.cmd("GET").arg(keys.heartbeat(tag));
            pipe.cmd("PTTL").arg(keys.heartbeat(tag));
            pipe.cmd("LLEN").arg(keys.inflight(tag));
            pipe.cmd("GET").arg(keys.card(tag));
        }
        let replies: Vec<redis::Value> = pipe
            .query_async(&mut conn)
            .await
            .map_err(op("list workers"))?;
        for ((keys, tag), four) in chunk.iter().zip(replies.chunks(4)) {
            let field = |i: usize| four.get(i).cloned().unwrap_or(redis::Value::Nil);
            let beat: Option<String> = redis::from_redis_value(field(0)).ok().flatten();
            let ttl: i64 = redis::from_redis_value(field(1)).unwrap_or(-2);
            let in_flight: u64 = redis::from_redis_value(field(2)).unwrap_or(0);
            let card = redis::from_redis_value::<Option<Vec<u8>>>(field(3))
                .ok()
                .flatten()
                .and_then(|text| card::parse(&text));
            let alive = ttl > 0 || ttl == -1;
            // A dead consumer holding nothing, whose card expired (or that never wrote one), is dropped:
            // it was gone for longer than the card is kept. One still holding messages stays listed
            // until a live consumer of its queue returns them.
            if !alive && in_flight == 0 && card.is_none() {
                continue;
            }
            // Builds before the timestamped heartbeat wrote `1`: no age for those. A dead consumer's
            // age comes from its card's last beat.
            let heartbeat_age = beat
                .and_then(|text| text.parse::<i64>().ok())
                .filter(|&ms| ms > 1_000_000_000_000)
                .or_else(|| card.as_ref().filter(|_| !alive).map(|c| c.beat_ms))
                .map(|ms| Duration::from_millis(now_ms.saturating_sub(ms).max(0) as u64));
            workers.push(WorkerInfo {
                queue: keys.queue.clone(),
                consumer_tag: tag.clone(),
                in_flight,
                heartbeat_age,
                alive,
                card,
            });
        }
    }
    workers.sort_by(|a, b| (&a.queue, &a.consumer_tag).cmp(&(&b.queue, &b.consumer_tag)));
    Ok(workers)
}
