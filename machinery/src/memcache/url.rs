//! memcached URLs.

use super::backend::DEFAULT_PORT;
use crate::config::ConfigError;

/// Parses `memcache://h1:p1[,h2:p2...]` (or `memcaches://…`) into `host:port` strings, in order (a
/// missing port is 11211).
pub fn parse_url(url: &str) -> Result<Vec<String>, ConfigError> {
    let invalid = |reason: &str| ConfigError::InvalidUrl {
        role: "result backend",
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    let url_text = url.trim();
    let rest = url_text
        .strip_prefix("memcache://")
        .or_else(|| url_text.strip_prefix(super::tls::SCHEME))
        .ok_or_else(|| invalid("expected memcache://host:port[,host:port...]"))?;
    let rest = rest.trim_end_matches('/');
    if rest.contains(['@', '?', '/']) {
        return Err(invalid(
            "expected memcache://host:port[,host:port...]; credentials, paths and options are not supported",
        ));
    }
    let mut servers = Vec::new();
    for entry in rest.split(',') {
        let entry = entry.trim();
        if entry.is_empty() {
            return Err(invalid(
                "empty server address; expected memcache://host:port[,host:port...]",
            ));
        }
        let has_port = match entry.rsplit_once(':') {
            // `[::1]` is an IPv6 address without a port; `[::1]:11211` and `host:11211` have one.
            Some((host, port)) => {
                !host.is_empty()
                    && !port.ends_with(']')
                    && (!host.contains(':') || host.ends_with(']'))
            }
            None => false,
        };
        if has_port {
            let port = entry.rsplit_once(':').map(|(_, p)| p).unwrap_or_default();
            if port.parse::<u16>().is_err() {
                return Err(invalid(&format!(
                    "server {entry:?}: port {port:?} is not a number from 0 to 65535"
                )));
            }
            servers.push(entry.to_owned());
        } else {
            servers.push(format!("{entry}:{DEFAULT_PORT}"));
        }
    }
    Ok(servers)
}
