//! Keeping passwords out of logs and errors.

/// Replaces the userinfo of any URL-like text with `***` (keeping a user name), so that no password reaches
/// a log line or an error message.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    // A socket URL's path comes after the '@', so look for it in the whole remainder there.
    let search_end = if scheme == "redis+socket" {
        rest.len()
    } else {
        authority_end
    };
    match rest[..search_end].rfind('@') {
        Some(at) => {
            let userinfo = &rest[..at];
            let shown = match userinfo.split_once(':') {
                Some((user, _)) if !user.is_empty() => format!("{user}:***"),
                _ => "***".to_owned(),
            };
            format!("{scheme}://{shown}{}", &rest[at..])
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn passwords_never_show() {
        assert_eq!(
            redact_url("amqp://guest:s3cret@localhost:5672/"),
            "amqp://guest:***@localhost:5672/"
        );
        assert_eq!(
            redact_url("redis://s3cret@localhost:6379/1"),
            "redis://***@localhost:6379/1"
        );
        assert_eq!(
            redact_url("redis+socket://s3cret@/tmp/r.sock:/2"),
            "redis+socket://***@/tmp/r.sock:/2"
        );
        assert_eq!(redact_url("kafka://u:p@h:9092"), "kafka://u:***@h:9092");
        assert_eq!(redact_url("memory://"), "memory://");
        assert_eq!(redact_url("null"), "null");
    }
}
