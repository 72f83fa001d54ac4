//! The broker's own ceiling: what Redis or RabbitMQ does on this machine, in the same run, with the
//! client crate machinery uses (`redis`, `lapin`) and messages of the size machinery sends, without
//! machinery in between. Every machinery rate is shown as a fraction of one of these.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::BasicProperties;
use redis::aio::MultiplexedConnection;
use tokio::task::JoinSet;

use crate::error::BenchError;
use crate::servers;

/// Messages per pipeline of the pipelined Redis ceilings.
pub(crate) const REDIS_PIPELINE: usize = 100;
/// Publishes whose confirms are awaited together in the windowed AMQP ceiling.
pub(crate) const AMQP_WINDOW: usize = 500;
/// `basic.qos` of the AMQP consume ceiling.
pub(crate) const AMQP_PREFETCH: u16 = 100;
/// How long one ceiling measurement may take.
const PHASE_TIMEOUT: Duration = Duration::from_secs(120);

/// One raw broker measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Ceiling {
    /// `LPUSH` from one connection, each reply awaited.
    RedisPushOne,
    /// `LPUSH` from S connections at once, each reply awaited.
    RedisPush,
    /// `LPOP` from S connections at once, each reply awaited.
    RedisPop,
    /// `LPUSH` from S connections in pipelines of 100.
    RedisPushPipelined,
    /// `LPOP` from S connections in pipelines of 100.
    RedisPopPipelined,
    /// Persistent publishes on one channel, each confirm awaited before the next publish.
    AmqpPublishOne,
    /// Persistent publishes on one channel, confirms awaited in windows of 500.
    AmqpPublish,
    /// Consuming with one ack per message, prefetch 100.
    AmqpConsume,
}

impl Ceiling {
    /// What was measured, for the tables.
    pub(crate) fn label(self, senders: usize) -> String {
        let conns = if senders == 1 {
            "1 connection".to_owned()
        } else {
            format!("{senders} connections")
        };
        match self {
            Ceiling::RedisPushOne => "Redis LPUSH, 1 connection, unpipelined".into(),
            Ceiling::RedisPush => format!("Redis LPUSH, {conns}, unpipelined"),
            Ceiling::RedisPop => format!("Redis LPOP, {conns}, unpipelined"),
            Ceiling::RedisPushPipelined => {
                format!("Redis LPUSH, {conns}, pipelined ×{REDIS_PIPELINE}")
            }
            Ceiling::RedisPopPipelined => {
                format!("Redis LPOP, {conns}, pipelined ×{REDIS_PIPELINE}")
            }
            Ceiling::AmqpPublishOne => {
                "AMQP publish persistent, each confirm awaited (1 channel)".into()
            }
            Ceiling::AmqpPublish => {
                format!("AMQP publish persistent, confirms in windows of {AMQP_WINDOW} (1 channel)")
            }
            Ceiling::AmqpConsume => {
                format!("AMQP consume with acks, prefetch {AMQP_PREFETCH} (1 channel)")
            }
        }
    }
}

/// A Redis command of the ceiling loops.
#[derive(Debug, Clone, Copy)]
enum Op {
    Push,
    Pop,
}

/// Redis: `LPUSH` from one connection, then `LPUSH` and `LPOP` from `senders` connections unpipelined,
/// then pipelined, `tasks` messages each. Returns operations per second.
pub(crate) async fn redis(
    client: &redis::Client,
    key: &str,
    tasks: u64,
    senders: usize,
    payload: &[u8],
) -> Result<Vec<(Ceiling, f64)>, BenchError> {
    let mut conns = Vec::with_capacity(senders);
    for _ in 0..senders {
        conns.push(servers::redis_connection(client).await?);
    }
    let key: Arc<str> = key.into();
    let payload: Arc<[u8]> = payload.into();
    let mut rates = Vec::new();
    delete(&mut conns[0], &key).await?;
    let one = &conns[..1];
    let rate = spread(one, &key, &payload, tasks, Op::Push, 1).await?;
    rates.push((Ceiling::RedisPushOne, rate));
    delete(&mut conns[0], &key).await?;
    for (op, batch, ceiling) in [
        (Op::Push, 1, Ceiling::RedisPush),
        (Op::Pop, 1, Ceiling::RedisPop),
        (Op::Push, REDIS_PIPELINE, Ceiling::RedisPushPipelined),
        (Op::Pop, REDIS_PIPELINE, Ceiling::RedisPopPipelined),
    ] {
        let rate = spread(&conns, &key, &payload, tasks, op, batch).await?;
        rates.push((ceiling, rate));
    }
    delete(&mut conns[0], &key).await?;
    Ok(rates)
}

async fn delete(conn: &mut MultiplexedConnection, key: &str) -> Result<(), BenchError> {
    redis::cmd("DEL")
        .arg(key)
        .query_async::<()>(conn)
        .await
        .map_err(BenchError::redis(format!("deleting {key}")))
}

/// Runs `total` operations split over the connections, all at once, and returns operations per second.
async fn spread(
    conns: &[MultiplexedConnection],
    key: &Arc<str>,
    payload: &Arc<[u8]>,
    total: u64,
    op: Op,
    batch: usize,
) -> Result<f64, BenchError> {
    let started = Instant::now();
    let mut set = JoinSet::new();
    for (i, conn) in conns.iter().enumerate() {
        let share = share(total, conns.len(), i);
        let (mut conn, key, payload) = (conn.clone(), key.clone(), payload.clone());
        set.spawn(async move { run_ops(&mut conn, &key, &payload, share, op, batch).await });
    }
    let joined = tokio::time::timeout(PHASE_TIMEOUT, async {
        while let Some(result) = set.join_next().await {
            match result {
                Ok(Ok(())) => {}
                Ok(Err(source)) => {
                    return Err(BenchError::Redis {
                        what: format!("raw Redis ceiling ({op:?})"),
                        source,
                    })
                }
                Err(e) => return Err(BenchError::Failed(format!("a ceiling task failed: {e}"))),
            }
        }
        Ok(())
    })
    .await;
    match joined {
        Ok(result) => result?,
        Err(_) => {
            return Err(BenchError::Timeout {
                what: format!("the raw Redis ceiling ({op:?})"),
                timeout: PHASE_TIMEOUT,
            })
        }
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

async fn run_ops(
    conn: &mut MultiplexedConnection,
    key: &str,
    payload: &[u8],
    count: u64,
    op: Op,
    batch: usize,
) -> redis::RedisResult<()> {
    let mut left = count;
    while left > 0 {
        let n = left.min(batch as u64);
        left -= n;
        if n == 1 {
            let mut cmd = match op {
                Op::Push => redis::cmd("LPUSH"),
                Op::Pop => redis::cmd("LPOP"),
            };
            cmd.arg(key);
            if let Op::Push = op {
                cmd.arg(payload);
            }
            cmd.query_async::<redis::Value>(conn).await?;
        } else {
            let mut pipe = redis::pipe();
            for _ in 0..n {
                match op {
                    Op::Push => pipe.cmd("LPUSH").arg(key).arg(payload).ignore(),
                    Op::Pop => pipe.cmd("LPOP").arg(key).ignore(),
                };
            }
            pipe.query_async::<()>(conn).await?;
        }
    }
    Ok(())
}

/// The part of `total` that worker `index` of `workers` takes (the first ones take the remainder).
pub(crate) fn share(total: u64, workers: usize, index: usize) -> u64 {
    let workers = workers.max(1) as u64;
    total / workers + u64::from((index as u64) < total % workers)
}

/// RabbitMQ: persistent publishes to a durable queue, first a fifth of `tasks` awaiting each confirm,
/// then `tasks` with confirms awaited in windows of 500; then consuming all of them with acks. Returns
/// messages per second.
pub(crate) async fn amqp(
    connection: &lapin::Connection,
    queue: &str,
    tasks: u64,
    payload: &[u8],
) -> Result<Vec<(Ceiling, f64)>, BenchError> {
    match tokio::time::timeout(PHASE_TIMEOUT, amqp_inner(connection, queue, tasks, payload)).await {
        Ok(result) => result,
        Err(_) => Err(BenchError::Timeout {
            what: "the raw AMQP ceiling".into(),
            timeout: PHASE_TIMEOUT,
        }),
    }
}

async fn amqp_inner(
    connection: &lapin::Connection,
    queue: &str,
    tasks: u64,
    payload: &[u8],
) -> Result<Vec<(Ceiling, f64)>, BenchError> {
    let channel = connection
        .create_channel()
        .await
        .map_err(BenchError::amqp("opening a channel"))?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(BenchError::amqp("enabling publisher confirms"))?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(queue.into(), durable, FieldTable::default())
        .await
        .map_err(BenchError::amqp(format!("declaring queue {queue}")))?;
    let publish = || {
        channel.basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            payload,
            BasicProperties::default().with_delivery_mode(2),
        )
    };
    let mut rates = Vec::new();

    let one_by_one = (tasks / 5).max(1);
    let started = Instant::now();
    for _ in 0..one_by_one {
        let confirm = publish().await.map_err(BenchError::amqp("publishing"))?;
        confirmed(confirm.await)?;
    }
    rates.push((
        Ceiling::AmqpPublishOne,
        one_by_one as f64 / started.elapsed().as_secs_f64(),
    ));

    let started = Instant::now();
    let mut left = tasks;
    while left > 0 {
        let n = left.min(AMQP_WINDOW as u64);
        left -= n;
        let mut confirms = Vec::with_capacity(n as usize);
        for _ in 0..n {
            confirms.push(publish().await.map_err(BenchError::amqp("publishing"))?);
        }
        for confirm in confirms {
            confirmed(confirm.await)?;
        }
    }
    rates.push((
        Ceiling::AmqpPublish,
        tasks as f64 / started.elapsed().as_secs_f64(),
    ));
    let _ = channel.close(200, "OK".into()).await;

    let consumer_channel = connection
        .create_channel()
        .await
        .map_err(BenchError::amqp("opening a channel"))?;
    consumer_channel
        .basic_qos(AMQP_PREFETCH, BasicQosOptions::default())
        .await
        .map_err(BenchError::amqp("setting the prefetch"))?;
    let total = one_by_one + tasks;
    let started = Instant::now();
    let mut consumer = consumer_channel
        .basic_consume(
            queue.into(),
            "machinery-bench-ceiling".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(BenchError::amqp(format!("consuming {queue}")))?;
    // Each delivery is acknowledged on its own, the acks in flight together (awaiting each before taking
    // the next delivery would measure lapin's hand-off to its I/O loop, not RabbitMQ).
    let mut acks = JoinSet::new();
    let mut received = 0;
    while received < total {
        let Some(delivery) = consumer.next().await else {
            return Err(BenchError::Failed(format!(
                "the consumer of {queue} stopped after {received} of {total} messages"
            )));
        };
        let delivery = delivery.map_err(BenchError::amqp("receiving"))?;
        acks.spawn(async move { delivery.acker.ack(BasicAckOptions::default()).await });
        while let Some(acked) = acks.try_join_next() {
            acked_ok(acked)?;
        }
        received += 1;
    }
    while let Some(acked) = acks.join_next().await {
        acked_ok(acked)?;
    }
    rates.push((
        Ceiling::AmqpConsume,
        total as f64 / started.elapsed().as_secs_f64(),
    ));
    let _ = consumer_channel.close(200, "OK".into()).await;
    Ok(rates)
}

fn acked_ok(acked: Result<lapin::Result<bool>, tokio::task::JoinError>) -> Result<(), BenchError> {
    match acked {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(BenchError::Amqp {
            what: "acknowledging".into(),
            source: e,
        }),
        Err(e) => Err(BenchError::Failed(format!("an ack task failed: {e}"))),
    }
}

fn confirmed(confirmation: lapin::Result<lapin::Confirmation>) -> Result<(), BenchError> {
    let confirmation = confirmation.map_err(BenchError::amqp("awaiting a publisher confirm"))?;
    if confirmation.is_nack() {
        return Err(BenchError::Failed(
            "RabbitMQ refused a message (nack) in the AMQP ceiling".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::share;

    #[test]
    fn shares_add_up_to_the_total() {
        for (total, workers) in [(10, 3), (3, 10), (20_000, 10), (1, 1)] {
            let sum: u64 = (0..workers).map(|i| share(total, workers, i)).sum();
            assert_eq!(sum, total, "{total} over {workers}");
        }
    }
}
