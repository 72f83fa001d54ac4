//! The benchmark's own access to the servers: machinery configurations for its queues, raw Redis and
//! AMQP connections (for the ceilings, the command counts and the clean-up), and the clean-up itself.

use std::time::Duration;

use futures_util::StreamExt as _;
use lapin::options::QueueDeleteOptions;
use machinery::redis::RedisUrl;
use machinery::Config;
use redis::aio::MultiplexedConnection;
use redis::AsyncCommands as _;

use crate::error::BenchError;

/// How long results stay in the backend: long enough for a run, short enough to clean up after itself
/// when a run is interrupted.
pub(crate) const RESULTS_EXPIRE_SECS: u64 = 300;

/// How long connecting to a server may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The machinery configuration of the benchmark's queue: `queue` is the default queue and, on AMQP,
/// the binding key too, so that tasks sent without a routing key land in it and nowhere else.
pub(crate) fn config(broker: &str, backend: &str, queue: &str, prefetch: Option<u16>) -> Config {
    let mut config = Config::new(broker, backend).with_default_queue(queue);
    config.amqp.binding_key = queue.to_owned();
    config.results_expire_in = RESULTS_EXPIRE_SECS;
    if let Some(prefetch) = prefetch {
        config.amqp.prefetch_count = prefetch;
    }
    config
}

/// A `redis` client for `url`, parsed with Go machinery's rules as machinery parses it (a lone
/// `password@` is a password, `rediss://…#insecure`, `redis+socket://`).
pub(crate) fn redis_client(url: &str) -> Result<redis::Client, BenchError> {
    let parsed = RedisUrl::parse(url).map_err(|e| {
        BenchError::Usage(format!(
            "Redis URL {}: {e}",
            machinery::config::redact_url(url)
        ))
    })?;
    let what = format!("connecting to {}", parsed.redacted());
    let info = parsed
        .connection_info()
        .map_err(BenchError::redis(what.clone()))?;
    redis::Client::open(info).map_err(BenchError::redis(what))
}

/// A multiplexed connection of `client`, with a connect timeout.
pub(crate) async fn redis_connection(
    client: &redis::Client,
) -> Result<MultiplexedConnection, BenchError> {
    let settings =
        redis::AsyncConnectionConfig::new().set_connection_timeout(Some(CONNECT_TIMEOUT));
    client
        .get_multiplexed_async_connection_with_config(&settings)
        .await
        .map_err(BenchError::redis("connecting to Redis"))
}

/// Connects to RabbitMQ. As in Go (and machinery), `amqp://host:5672/` means the virtual host `/`.
pub(crate) async fn amqp_connect(url: &str) -> Result<lapin::Connection, BenchError> {
    let shown = machinery::config::redact_url(url);
    let mut uri: lapin::uri::AMQPUri = url
        .trim()
        .parse()
        .map_err(|reason: String| BenchError::Usage(format!("AMQP URL {shown}: {reason}")))?;
    if uri.vhost.is_empty() {
        uri.vhost = "/".into();
    }
    let properties = lapin::ConnectionProperties::default()
        .with_connection_name(format!("machinery-bench pid {}", std::process::id()).into());
    match tokio::time::timeout(
        CONNECT_TIMEOUT,
        lapin::Connection::connect_uri(uri, properties),
    )
    .await
    {
        Ok(connection) => connection.map_err(BenchError::amqp(format!("connecting to {shown}"))),
        Err(_) => Err(BenchError::Timeout {
            what: format!("connecting to {shown}"),
            timeout: CONNECT_TIMEOUT,
        }),
    }
}

/// Deletes the result states of these task ids from a Redis result backend, 1,000 keys per `UNLINK`
/// in one pipeline.
pub(crate) async fn forget_states(
    conn: &mut MultiplexedConnection,
    uuids: &[String],
) -> Result<(), BenchError> {
    if uuids.is_empty() {
        return Ok(());
    }
    let mut pipe = redis::pipe();
    for chunk in uuids.chunks(1000) {
        pipe.cmd("UNLINK").arg(chunk).ignore();
    }
    pipe.query_async::<()>(conn)
        .await
        .map_err(BenchError::redis("deleting the benchmark's task states"))
}

/// Deletes every key machinery keeps for `queue` on a Redis broker: the list, its dead letters, the
/// consumer registry, the redelivery marks, and each consumer's in-flight list and heartbeat; and the
/// `extra` keys.
pub(crate) async fn delete_redis_queue(
    conn: &mut MultiplexedConnection,
    queue: &str,
    extra: &[String],
) -> Result<(), BenchError> {
    let mut keys = vec![
        queue.to_owned(),
        format!("{queue}.dead"),
        format!("machinery:consumers:{queue}"),
        format!("machinery:redelivered:{queue}"),
    ];
    keys.extend_from_slice(extra);
    for prefix in ["machinery:inflight", "machinery:heartbeat"] {
        let pattern = format!("{prefix}:{queue}:*");
        let found: Vec<String> = {
            let mut iter = conn
                .scan_match::<_, String>(&pattern)
                .await
                .map_err(BenchError::redis(format!("scanning for {pattern}")))?;
            let mut found = Vec::new();
            while let Some(key) = iter.next().await {
                found.push(key.map_err(BenchError::redis(format!("scanning for {pattern}")))?);
            }
            found
        };
        keys.extend(found);
    }
    redis::cmd("DEL")
        .arg(&keys)
        .query_async::<()>(conn)
        .await
        .map_err(BenchError::redis(format!("deleting queue {queue}")))
}

/// Deletes AMQP queues (missing ones are fine).
pub(crate) async fn delete_amqp_queues(
    connection: &lapin::Connection,
    queues: &[String],
) -> Result<(), BenchError> {
    let channel = connection
        .create_channel()
        .await
        .map_err(BenchError::amqp("opening a channel to delete queues"))?;
    for queue in queues {
        channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await
            .map_err(BenchError::amqp(format!("deleting queue {queue}")))?;
    }
    let _ = channel.close(200, "OK".into()).await;
    Ok(())
}

/// The port of a broker URL whose host is this machine (`127.0.0.1`, `::1` or `localhost`), with
/// `default` when the URL names none; `None` for another host or an unreadable URL.
pub(crate) fn local_port(url: &str, default: u16) -> Option<u16> {
    let parsed = url::Url::parse(url).ok()?;
    // `amqp://` is not a scheme the URL standard knows, so its host comes back as an opaque name, IP
    // addresses included.
    let local = match parsed.host()? {
        url::Host::Domain(name) => {
            name == "localhost"
                || name
                    .trim_matches(['[', ']'])
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        url::Host::Ipv4(ip) => ip.is_loopback(),
        url::Host::Ipv6(ip) => ip.is_loopback(),
    };
    local.then(|| parsed.port().unwrap_or(default))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_ports_of_broker_urls() {
        assert_eq!(
            local_port("amqp://guest:guest@127.0.0.1:5672/", 5672),
            Some(5672)
        );
        assert_eq!(local_port("amqp://localhost/", 5672), Some(5672));
        assert_eq!(local_port("amqps://[::1]:5671/vhost", 5672), Some(5671));
        assert_eq!(local_port("amqp://rabbit.example.com:5672/", 5672), None);
        assert_eq!(local_port("not a url", 5672), None);
    }
}
