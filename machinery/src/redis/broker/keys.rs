//! The keys the broker keeps beside Go's queue list (`docs/redis.md` lists them): a consumer's in-flight
//! list and heartbeat, the queue's consumer registry, recovery lock, redelivery marks and dead letters.
//!
//! Two layouts. On one server the keys keep the names they always had (`machinery:inflight:<queue>:…`,
//! `<queue>.dead`), so that a deployment that upgrades finds what it left in flight. On a Redis Cluster
//! every key of a queue is `{<queue>}:…`: the hash tag is the queue's name, so each of them hashes to
//! the slot of the list `<queue>` itself (the list Go writes, which keeps its name), and every script and
//! pipeline of a queue runs on one node. The queue's delayed tasks then have a set of their own,
//! `{<queue>}:delayed`, so that promotion is one atomic step on that node too.

/// The keys we keep beside Go's queue list.
#[derive(Debug, Clone)]
pub(in crate::redis) struct QueueKeys {
    pub(in crate::redis) queue: String,
    pub(in crate::redis) consumers: String,
    pub(in crate::redis) inflight_prefix: String,
    pub(in crate::redis) heartbeat_prefix: String,
    pub(in crate::redis) redelivered: String,
    /// The recovery lock: one consumer per queue scans for dead consumers per period.
    pub(in crate::redis) recovering: String,
    pub(in crate::redis) dead: String,
    /// On a cluster, the queue's own delayed-task set (one server shares Go's `delayed_tasks`).
    pub(in crate::redis) delayed: Option<String>,
    /// What a worker card's key starts with (the consumer tag follows; [`super::card`]).
    pub(in crate::redis) card_prefix: String,
}

impl QueueKeys {
    /// The keys of `queue`, in the cluster layout when `cluster` is set.
    pub(in crate::redis) fn new(queue: &str, cluster: bool) -> Self {
        if cluster {
            return QueueKeys {
                queue: queue.to_owned(),
                consumers: format!("{{{queue}}}:consumers"),
                inflight_prefix: format!("{{{queue}}}:inflight:"),
                heartbeat_prefix: format!("{{{queue}}}:heartbeat:"),
                redelivered: format!("{{{queue}}}:redelivered"),
                recovering: format!("{{{queue}}}:recovering"),
                dead: cluster_dead_letter_key(queue),
                delayed: Some(cluster_delayed_key(queue)),
                card_prefix: format!("{{{queue}}}:worker:"),
            };
        }
        QueueKeys {
            queue: queue.to_owned(),
            consumers: format!("machinery:consumers:{queue}"),
            inflight_prefix: format!("machinery:inflight:{queue}:"),
            heartbeat_prefix: format!("machinery:heartbeat:{queue}:"),
            redelivered: format!("machinery:redelivered:{queue}"),
            recovering: format!("machinery:recovering:{queue}"),
            dead: dead_letter_key(queue),
            delayed: None,
            card_prefix: format!("{}{queue}:", super::card::CARD_PREFIX),
        }
    }

    pub(in crate::redis) fn inflight(&self, tag: &str) -> String {
        format!("{}{tag}", self.inflight_prefix)
    }

    pub(in crate::redis) fn heartbeat(&self, tag: &str) -> String {
        format!("{}{tag}", self.heartbeat_prefix)
    }

    /// The worker card beside the heartbeat ([`super::card`]): `machinery:worker:<queue>:<tag>` on one
    /// server, `{<queue>}:worker:<tag>` on a cluster (in the queue's slot, so that the scripts that
    /// release a consumer can delete it).
    pub(in crate::redis) fn card(&self, tag: &str) -> String {
        format!("{}{tag}", self.card_prefix)
    }
}

/// The dead-letter list of a queue: `<queue>.dead` (on a Redis Cluster, `{<queue>}:dead`).
pub fn dead_letter_key(queue: &str) -> String {
    format!("{queue}.dead")
}

/// The dead-letter list of a queue on a Redis Cluster, in the queue's slot.
pub fn cluster_dead_letter_key(queue: &str) -> String {
    format!("{{{queue}}}:dead")
}

/// The delayed-task set of a queue on a Redis Cluster, in the queue's slot.
pub(in crate::redis) fn cluster_delayed_key(queue: &str) -> String {
    format!("{{{queue}}}:delayed")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sit_beside_gos_queue() {
        let keys = QueueKeys::new("machinery_tasks", false);
        assert_eq!(keys.inflight("w1"), "machinery:inflight:machinery_tasks:w1");
        assert_eq!(
            keys.heartbeat("w1"),
            "machinery:heartbeat:machinery_tasks:w1"
        );
        assert_eq!(keys.dead, "machinery_tasks.dead");
        assert_eq!(keys.card("w1"), "machinery:worker:machinery_tasks:w1");
    }

    #[test]
    fn cluster_keys_carry_the_queue_as_their_hash_tag() {
        let keys = QueueKeys::new("q", true);
        assert_eq!(keys.inflight("w1"), "{q}:inflight:w1");
        assert_eq!(keys.heartbeat("w1"), "{q}:heartbeat:w1");
        assert_eq!(keys.consumers, "{q}:consumers");
        assert_eq!(keys.dead, "{q}:dead");
        assert_eq!(keys.delayed.as_deref(), Some("{q}:delayed"));
        let slot = redis::cluster_routing::Slot::for_key("q");
        for key in [
            &keys.inflight("w1"),
            &keys.redelivered,
            &keys.recovering,
            &keys.dead,
        ] {
            assert_eq!(redis::cluster_routing::Slot::for_key(key), slot, "{key}");
        }
    }
}
