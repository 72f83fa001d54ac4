//! The keys the broker keeps beside Go's queue list (`docs/redis.md` lists them): a consumer's in-flight
//! list and heartbeat, the queue's consumer registry, recovery lock, redelivery marks and dead letters.

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
}

impl QueueKeys {
    pub(in crate::redis) fn new(queue: &str) -> Self {
        QueueKeys {
            queue: queue.to_owned(),
            consumers: format!("machinery:consumers:{queue}"),
            inflight_prefix: format!("machinery:inflight:{queue}:"),
            heartbeat_prefix: format!("machinery:heartbeat:{queue}:"),
            redelivered: format!("machinery:redelivered:{queue}"),
            recovering: format!("machinery:recovering:{queue}"),
            dead: dead_letter_key(queue),
        }
    }

    pub(in crate::redis) fn inflight(&self, tag: &str) -> String {
        format!("{}{tag}", self.inflight_prefix)
    }

    pub(in crate::redis) fn heartbeat(&self, tag: &str) -> String {
        format!("{}{tag}", self.heartbeat_prefix)
    }

    /// The worker card beside the heartbeat ([`super::card`]).
    pub(in crate::redis) fn card(&self, tag: &str) -> String {
        format!("{}{}:{tag}", super::card::CARD_PREFIX, self.queue)
    }
}

/// The dead-letter list of a queue: `<queue>.dead`.
pub fn dead_letter_key(queue: &str) -> String {
    format!("{queue}.dead")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sit_beside_gos_queue() {
        let keys = QueueKeys::new("machinery_tasks");
        assert_eq!(keys.inflight("w1"), "machinery:inflight:machinery_tasks:w1");
        assert_eq!(
            keys.heartbeat("w1"),
            "machinery:heartbeat:machinery_tasks:w1"
        );
        assert_eq!(keys.dead, "machinery_tasks.dead");
        assert_eq!(keys.card("w1"), "machinery:worker:machinery_tasks:w1");
    }
}
