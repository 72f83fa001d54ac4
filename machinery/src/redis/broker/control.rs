//! Cancelling running tasks over Redis pub/sub: [`Broker::publish_cancel`](crate::broker::Broker)
//! publishes the task id on [`CANCEL_CHANNEL`]; every worker process subscribes to it.

use std::time::Duration;

use futures_util::StreamExt as _;
use tokio::sync::mpsc;

use super::RedisBroker;
use crate::broker::{spawn_cancel_listener, BrokerError, CancelReceiver, Listening};
use crate::redis::conn::Endpoint;
use crate::retry::Backoff;

/// The pub/sub channel of cancellation requests. Pub/sub spans a server's databases; task ids are unique,
/// so a worker of another database that hears an id it does not run ignores it.
pub const CANCEL_CHANNEL: &str = "machinery:control:cancel";

impl RedisBroker {
    pub(super) async fn publish_cancel_request(&self, task_uuid: &str) -> Result<(), BrokerError> {
        let mut conn = self.inner.conn.clone();
        redis::cmd("PUBLISH")
            .arg(CANCEL_CHANNEL)
            .arg(task_uuid)
            .query_async::<i64>(&mut conn)
            .await
            .map(drop)
            .map_err(|e| BrokerError::operation("publish a cancellation", e))
    }

    /// Returns once subscribed (see [`spawn_cancel_listener`]).
    pub(super) async fn listen_for_cancellations(&self) -> CancelReceiver {
        let endpoint = self.inner.endpoint.clone();
        spawn_cancel_listener(|sender, listening| listen(endpoint, sender, listening)).await
    }
}

/// Subscribes to [`CANCEL_CHANNEL`] and forwards each id, reconnecting after a lost connection (behind
/// Sentinel to the master named then; on a cluster to the next seed, each of which relays every
/// `PUBLISH`), until the receiver is dropped.
async fn listen(
    endpoint: Endpoint,
    sender: mpsc::UnboundedSender<String>,
    mut listening: Listening,
) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let mut attempt = 0usize;
    loop {
        let this = attempt;
        attempt = attempt.wrapping_add(1);
        let subscribed = async {
            let mut pubsub = endpoint.pubsub_client(this).await?.pubsub().await?;
            pubsub.subscribe(CANCEL_CHANNEL).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        let opened = tokio::select! {
            opened = tokio::time::timeout(Duration::from_secs(10), subscribed) => opened,
            () = sender.closed() => return,
        };
        match opened {
            Ok(Ok(pubsub)) => {
                listening.now();
                backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
                let mut stream = pubsub.into_on_message();
                loop {
                    tokio::select! {
                        message = stream.next() => match message {
                            Some(message) => {
                                let Ok(uuid) = message.get_payload::<String>() else { continue };
                                if sender.send(uuid).is_err() {
                                    return;
                                }
                            }
                            None => break,
                        },
                        () = sender.closed() => return,
                    }
                }
                tracing::debug!("the cancellation channel lost its connection; reconnecting");
            }
            Ok(Err(error)) => {
                tracing::debug!(%error, "cannot subscribe to the cancellation channel");
            }
            Err(_) => tracing::debug!("subscribing to the cancellation channel timed out"),
        }
        listening.attempted();
        tokio::select! {
            () = tokio::time::sleep(backoff.next_delay()) => {}
            () = sender.closed() => return,
        }
    }
}
