//! Go's global delayed-task set on a Redis Cluster: our senders use each queue's own set there
//! (`{<queue>}:delayed`), but Go senders `ZADD` their ETA tasks to `delayed_tasks`, whose entries name
//! queues in any slot, so no script can move them atomically. Each consumer claims due entries one by one
//! with `ZREM` (one claimant wins an entry) and then pushes it to the queue its `RoutingKey` names: Go's
//! own worker does the same two steps, and a crash between them loses that entry, as it does in Go.

use chrono::Utc;
use redis::AsyncCommands as _;

use super::{op, Envelope, Inner};
use crate::broker::BrokerError;

/// Most entries one poll claims (the next poll claims the rest).
const CLAIM_LIMIT: isize = 100;

/// The queue a Go signature names (`RoutingKey`, any case, as Go's decoder reads it), if any.
fn routing_key(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    value.as_object()?.iter().find_map(|(key, value)| {
        (key.eq_ignore_ascii_case("routingkey"))
            .then(|| value.as_str().map(str::to_owned))
            .flatten()
    })
}

/// Claims the due entries of Go's `delayed_tasks` and pushes each onto its queue (the default queue when
/// it names none); returns how many it moved. A push the server refuses (the key is not a list) puts the
/// entry in the default queue's dead letters with the reason.
pub(super) async fn claim(inner: &Inner) -> Result<u64, BrokerError> {
    let key = &inner.config.delayed_tasks_key;
    let now = Utc::now().timestamp_nanos_opt().unwrap_or(i64::MAX);
    let mut conn = inner.conn.clone();
    let due: Vec<Vec<u8>> = conn
        .zrangebyscore_limit(key, "-inf", now, 0, CLAIM_LIMIT)
        .await
        .map_err(op("promote Go's delayed tasks"))?;
    let mut moved = 0;
    for body in due {
        let claimed: u64 = conn
            .zrem(key, &body)
            .await
            .map_err(op("promote Go's delayed tasks"))?;
        if claimed == 0 {
            continue;
        }
        let queue = routing_key(&body)
            .filter(|queue| !queue.is_empty())
            .unwrap_or_else(|| inner.default_queue.clone());
        if let Err(error) = conn.rpush::<_, _, ()>(&queue, &body).await {
            let reason = format!("cannot move the delayed task to queue {queue:?}: {error}");
            let envelope = Envelope::encode(&queue, &reason, Utc::now(), &body);
            let dead = inner.keys(&inner.default_queue).dead;
            conn.rpush::<_, _, ()>(&dead, envelope)
                .await
                .map_err(op("promote Go's delayed tasks"))?;
        }
        moved += 1;
    }
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::routing_key;

    #[test]
    fn the_routing_key_is_read_in_any_case() {
        assert_eq!(
            routing_key(br#"{"RoutingKey":"q1"}"#).as_deref(),
            Some("q1")
        );
        assert_eq!(
            routing_key(br#"{"routingkey":"q2"}"#).as_deref(),
            Some("q2")
        );
        assert_eq!(routing_key(br#"{"Name":"x"}"#), None);
        assert_eq!(routing_key(b"not json"), None);
    }
}
