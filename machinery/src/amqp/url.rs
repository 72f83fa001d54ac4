//! Broker URLs: Go's `multiple_broker_separator` list, parsing, and redaction for messages.

use lapin::uri::AMQPUri;

use crate::config::ConfigError;

/// The largest AMQP frame we offer unless the URL says otherwise (`?frame_max=`): RabbitMQ's default, as
/// Go's client offers. A message's headers travel in one frame, so a smaller offer leaves RabbitMQ unable
/// to deliver a message with larger headers that another client published: the connection drops, and the
/// same message comes back, for ever. lapin keeps send and receive rings of 32 frames per connection
/// (8 MiB at this size); it allocates them zeroed at the size the URL names, so only the pages traffic has
/// passed through count towards the RSS (`docs/amqp.md`, "Frames and memory").
const DEFAULT_FRAME_MAX: u32 = 128 * 1024;

/// The heartbeat we ask for unless the URL says otherwise (`?heartbeat=`), in seconds: Go's amqp091
/// default. lapin drops a connection that has heard nothing for twice this, so a half-open link (a
/// failover or NAT drop that leaves the socket open with nothing arriving) is replaced after about 20 s
/// instead of the 120 s that RabbitMQ's proposal of 60 s would give.
const DEFAULT_HEARTBEAT: u16 = 10;

/// One URL of the list: what lapin connects to, and how we name it in logs and errors.
#[derive(Clone)]
pub(crate) struct Endpoint {
    pub(crate) uri: AMQPUri,
    /// The URL with its password replaced by `***`.
    pub(crate) display: String,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.display)
    }
}

/// Splits `urls` with `separator` (when not empty) like Go's `AMQPConnector.Connect`, or else at each
/// comma that starts another `amqp://` or `amqps://` URL (a RabbitMQ cluster's nodes), and parses each.
/// The session tries them in order.
///
/// `amqp://host:5672/` means the virtual host `/`, as in Go's amqp091 (lapin would read it as the empty
/// virtual host, which RabbitMQ never has); `amqp://host:5672/%2f` is the same, `amqp://host/staging` is
/// `staging`.
pub(crate) fn endpoints(
    role: &'static str,
    urls: &str,
    separator: &str,
) -> Result<Vec<Endpoint>, ConfigError> {
    let list: Vec<&str> = if separator.is_empty() {
        split_nodes(urls.trim())
    } else {
        urls.split(separator)
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect()
    };
    if list.is_empty() {
        return Err(ConfigError::InvalidUrl {
            role,
            url: String::new(),
            reason: "no AMQP URL given".into(),
        });
    }
    list.into_iter()
        .map(|url| {
            let display = redact(url);
            let mut uri: AMQPUri =
                url.parse()
                    .map_err(|reason: String| ConfigError::InvalidUrl {
                        role,
                        url: display.clone(),
                        reason: reason.replace(url, &display),
                    })?;
            if uri.vhost.is_empty() {
                uri.vhost = "/".into();
            }
            if uri.query.frame_max.is_none() {
                uri.query.frame_max = Some(DEFAULT_FRAME_MAX);
            }
            if uri.query.heartbeat.is_none() {
                uri.query.heartbeat = Some(DEFAULT_HEARTBEAT);
            }
            Ok(Endpoint { uri, display })
        })
        .collect()
}

use crate::config::redact_url as redact;

/// The URLs, passwords redacted, for messages.
pub(crate) fn display(endpoints: &[Endpoint]) -> String {
    endpoints
        .iter()
        .map(|e| e.display.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The URLs with their indexes in the order to try them: from the first, or, when the connection to the
/// one at `lost` went away, from the one after it (wrapping round).
pub(crate) fn turn(
    endpoints: &[Endpoint],
    lost: usize,
) -> impl Iterator<Item = (usize, &Endpoint)> {
    let start = if lost == usize::MAX { 0 } else { lost + 1 };
    let count = endpoints.len();
    (0..count)
        .map(move |i| (start + i) % count.max(1))
        .filter_map(|i| endpoints.get(i).map(|e| (i, e)))
}

/// `amqp://a/,amqp://b/` → both; a comma not followed by a scheme stays in its URL.
fn split_nodes(urls: &str) -> Vec<&str> {
    let mut list = Vec::new();
    let mut start = 0;
    for (at, _) in urls.match_indices(',') {
        let next = urls[at + 1..].trim_start();
        if at >= start && (next.starts_with("amqp://") || next.starts_with("amqps://")) {
            list.push(urls[start..at].trim());
            start = at + 1;
        }
    }
    list.push(urls[start..].trim());
    list.retain(|url| !url.is_empty());
    list
}

/// Why an AMQP broker or result backend could not start: its URL, which no retry mends, or the server,
/// with the role's error `E` ([`BrokerError`](crate::broker::BrokerError) or
/// [`BackendError`](crate::backend::BackendError)).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError<E: std::error::Error + 'static> {
    /// The URL cannot be used.
    #[error(transparent)]
    Url(ConfigError),
    /// The server could not be reached.
    #[error(transparent)]
    Server(E),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_comma_before_a_scheme_separates_nodes() {
        let list = endpoints(
            "broker",
            "amqp://g:p,w@h1:5673/, amqp://h2:5674/,amqps://h3/",
            "",
        )
        .unwrap();
        let shown: Vec<&str> = list.iter().map(|e| e.display.as_str()).collect();
        assert_eq!(
            shown,
            ["amqp://g:***@h1:5673/", "amqp://h2:5674/", "amqps://h3/"]
        );
        assert_eq!(list[0].uri.authority.userinfo.password, "p,w");
    }

    #[test]
    fn the_turn_starts_after_the_node_that_was_lost() {
        let list = endpoints("broker", "amqp://a/,amqp://b/,amqp://c/", "").unwrap();
        let order = |lost| turn(&list, lost).map(|(i, _)| i).collect::<Vec<_>>();
        assert_eq!(order(usize::MAX), [0, 1, 2]);
        assert_eq!(order(0), [1, 2, 0]);
        assert_eq!(order(2), [0, 1, 2]);
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("amqp://guest:s3cret@localhost:5672/"),
            "amqp://guest:***@localhost:5672/"
        );
        assert_eq!(
            redact("amqps://u:p@w@h:5671/vh?heartbeat=5"),
            "amqps://u:***@h:5671/vh?heartbeat=5"
        );
        assert_eq!(redact("amqp://localhost/"), "amqp://localhost/");
    }

    #[test]
    fn the_root_path_is_the_default_virtual_host_as_in_go() {
        let list = endpoints("broker", "amqp://guest:guest@localhost:5672/", "").unwrap();
        assert_eq!(list[0].uri.vhost, "/");
        let list = endpoints("broker", "amqp://guest:guest@localhost:5672/%2f", "").unwrap();
        assert_eq!(list[0].uri.vhost, "/");
        let list = endpoints("broker", "amqp://localhost/staging", "").unwrap();
        assert_eq!(list[0].uri.vhost, "staging");
        assert_eq!(list[0].uri.authority.userinfo.username, "guest");
    }

    #[test]
    fn a_separator_gives_several_urls_in_order() {
        let list = endpoints("broker", "amqp://a:pw@h1:5672/, amqps://b:pw@h2:5671/", ",").unwrap();
        let shown: Vec<_> = list.iter().map(|e| e.display.as_str()).collect();
        assert_eq!(shown, ["amqp://a:***@h1:5672/", "amqps://b:***@h2:5671/"]);
        assert_eq!(list[1].uri.authority.port, 5671);
    }

    #[test]
    fn a_bad_url_is_an_error_without_the_password() {
        let err = endpoints("broker", "amqpx://user:topsecret@h/", "").unwrap_err();
        let text = err.to_string();
        assert!(!text.contains("topsecret"), "{text}");
        assert!(text.contains("amqpx://user:***@h/"), "{text}");
    }
}
