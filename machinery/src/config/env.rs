//! Loading a [`Config`] from environment variables with Go machinery's names (reference §1.5).

use serde_json::{Map, Value};

use super::{Config, ConfigError};

impl Config {
    /// The defaults, overridden by Go machinery's environment variables: `BROKER`, `RESULT_BACKEND`,
    /// `DEFAULT_QUEUE`, `RESULTS_EXPIRE_IN`, `LOCK`, `NO_UNIX_SIGNALS`, `AMQP_EXCHANGE`,
    /// `AMQP_EXCHANGE_TYPE`, `AMQP_BINDING_KEY`, `AMQP_PREFETCH_COUNT`, `AMQP_AUTO_DELETE`,
    /// `AMQP_DELAYED_QUEUE`, `AMQP_QUEUE_DECLARE_ARGS` and `AMQP_QUEUE_BINDING_ARGS` (`k:v,k2:v2`),
    /// `REDIS_*` (see [`RedisConfig`](super::RedisConfig)), plus our `UNKNOWN_TASK_REQUEUES` and the TLS
    /// settings `TLS_CA_FILE`, `TLS_CERT_FILE`, `TLS_KEY_FILE`, `TLS_SERVER_NAME`, `TLS_INSECURE`, each
    /// also with a `BROKER_`, `RESULT_BACKEND_` or `LOCK_` prefix for one role (see
    /// [`TlsSection`](super::TlsSection)).
    pub fn from_env() -> Result<Config, ConfigError> {
        Config::from_lookup(|name| std::env::var(name).ok())
    }

    /// Like [`Config::from_env`], reading variables through `lookup` (handy in tests).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let mut c = Config::default();
        let env = Env { lookup: &lookup };
        env.string("BROKER", &mut c.broker);
        c.broker_defaulted = super::BrokerDefaulted(env.get("BROKER").is_none());
        env.string("LOCK", &mut c.lock);
        env.string(
            "MULTIPLE_BROKEN_SEPARATOR",
            &mut c.multiple_broker_separator,
        );
        env.string(
            "MULTIPLE_BROKER_SEPARATOR",
            &mut c.multiple_broker_separator,
        );
        env.string("DEFAULT_QUEUE", &mut c.default_queue);
        env.string("RESULT_BACKEND", &mut c.result_backend);
        env.number("RESULTS_EXPIRE_IN", &mut c.results_expire_in)?;
        env.boolean("NO_UNIX_SIGNALS", &mut c.no_unix_signals)?;
        env.number("UNKNOWN_TASK_REQUEUES", &mut c.unknown_task_requeues)?;

        let a = &mut c.amqp;
        env.string("AMQP_EXCHANGE", &mut a.exchange);
        env.string("AMQP_EXCHANGE_TYPE", &mut a.exchange_type);
        env.map("AMQP_QUEUE_DECLARE_ARGS", &mut a.queue_declare_args)?;
        env.map("AMQP_QUEUE_BINDING_ARGS", &mut a.queue_binding_args)?;
        env.string("AMQP_BINDING_KEY", &mut a.binding_key);
        env.number("AMQP_PREFETCH_COUNT", &mut a.prefetch_count)?;
        env.boolean("AMQP_AUTO_DELETE", &mut a.auto_delete)?;
        env.string("AMQP_DELAYED_QUEUE", &mut a.delayed_queue);
        env.string("AMQP_QUEUE_TYPE", &mut a.queue_type);

        let r = &mut c.redis;
        env.number("REDIS_MAX_IDLE", &mut r.max_idle)?;
        env.number("REDIS_MAX_ACTIVE", &mut r.max_active)?;
        env.number("REDIS_IDLE_TIMEOUT", &mut r.idle_timeout)?;
        env.boolean("REDIS_WAIT", &mut r.wait)?;
        env.number("REDIS_READ_TIMEOUT", &mut r.read_timeout)?;
        env.number("REDIS_WRITE_TIMEOUT", &mut r.write_timeout)?;
        env.number("REDIS_CONNECT_TIMEOUT", &mut r.connect_timeout)?;
        env.number(
            "REDIS_NORMAL_TASKS_POLL_PERIOD",
            &mut r.normal_tasks_poll_period,
        )?;
        env.number(
            "REDIS_DELAYED_TASKS_POLL_PERIOD",
            &mut r.delayed_tasks_poll_period,
        )?;
        env.string("REDIS_DELAYED_TASKS_KEY", &mut r.delayed_tasks_key);
        env.string("REDIS_CLIENT_NAME", &mut r.client_name);
        env.string("REDIS_MASTER_NAME", &mut r.master_name);
        env.string("REDIS_SENTINEL_PASSWORD", &mut r.sentinel_password);
        env.number("REDIS_WAIT_REPLICAS", &mut r.wait_replicas)?;
        env.boolean("REDIS_CLUSTER_MODE", &mut r.cluster_enabled)?;
        env.boolean("REDIS_CLUSTER_ENABLED", &mut r.cluster_enabled)?;
        env.number("REDIS_HEARTBEAT_TIMEOUT", &mut r.heartbeat_timeout)?;

        env.tls("", &mut c.tls.shared)?;
        env.tls("BROKER_", &mut c.tls.broker)?;
        env.tls("RESULT_BACKEND_", &mut c.tls.result_backend)?;
        env.tls("LOCK_", &mut c.tls.lock)?;
        Ok(c)
    }
}

struct Env<'a> {
    lookup: &'a dyn Fn(&str) -> Option<String>,
}

impl Env<'_> {
    fn get(&self, var: &str) -> Option<String> {
        (self.lookup)(var).filter(|v| !v.is_empty())
    }

    fn error(var: &str, value: String, expected: &'static str) -> ConfigError {
        ConfigError::Env {
            var: var.to_owned(),
            value,
            expected,
        }
    }

    fn string(&self, var: &str, out: &mut String) {
        if let Some(value) = self.get(var) {
            *out = value;
        }
    }

    fn number<N: std::str::FromStr>(&self, var: &str, out: &mut N) -> Result<(), ConfigError> {
        if let Some(value) = self.get(var) {
            *out = value
                .trim()
                .parse()
                .map_err(|_| Env::error(var, value, "a non-negative integer in range"))?;
        }
        Ok(())
    }

    fn boolean(&self, var: &str, out: &mut bool) -> Result<(), ConfigError> {
        if let Some(value) = self.get(var) {
            // The spellings Go's strconv.ParseBool accepts.
            *out = match value.trim() {
                "1" | "t" | "T" | "true" | "TRUE" | "True" => true,
                "0" | "f" | "F" | "false" | "FALSE" | "False" => false,
                _ => return Err(Env::error(var, value, "true or false")),
            };
        }
        Ok(())
    }

    /// `{prefix}TLS_CA_FILE`, `…_CERT_FILE`, `…_KEY_FILE`, `…_SERVER_NAME`, `…_INSECURE`.
    fn tls(&self, prefix: &str, out: &mut super::TlsConfig) -> Result<(), ConfigError> {
        self.string(&format!("{prefix}TLS_CA_FILE"), &mut out.ca_file);
        self.string(&format!("{prefix}TLS_CERT_FILE"), &mut out.cert_file);
        self.string(&format!("{prefix}TLS_KEY_FILE"), &mut out.key_file);
        self.string(&format!("{prefix}TLS_SERVER_NAME"), &mut out.server_name);
        let var = format!("{prefix}TLS_INSECURE");
        if self.get(&var).is_some() {
            let mut insecure = false;
            self.boolean(&var, &mut insecure)?;
            out.insecure = Some(insecure);
        }
        Ok(())
    }

    /// envconfig's map form `k:v,k2:v2`; integer values become JSON numbers (so `x-max-priority:10` is
    /// an integer argument, as RabbitMQ needs).
    fn map(&self, var: &str, out: &mut Map<String, Value>) -> Result<(), ConfigError> {
        let Some(value) = self.get(var) else {
            return Ok(());
        };
        let mut map = Map::new();
        for pair in value.split(',').filter(|p| !p.trim().is_empty()) {
            let Some((k, v)) = pair.split_once(':') else {
                return Err(Env::error(
                    var,
                    value.clone(),
                    "key:value pairs separated by commas",
                ));
            };
            let v = v.trim();
            let v = match v.parse::<i64>() {
                Ok(n) => Value::from(n),
                Err(_) => match v {
                    "true" => Value::Bool(true),
                    "false" => Value::Bool(false),
                    _ => Value::String(v.to_owned()),
                },
            };
            map.insert(k.trim().to_owned(), v);
        }
        *out = map;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn load(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|name| vars.get(name).cloned())
    }

    #[test]
    fn go_names_override_defaults() {
        let c = load(&[
            ("BROKER", "redis://127.0.0.1:6379"),
            ("RESULT_BACKEND", "redis://127.0.0.1:6379/1"),
            ("DEFAULT_QUEUE", "q"),
            ("RESULTS_EXPIRE_IN", "60"),
            ("AMQP_EXCHANGE", "ex"),
            ("AMQP_PREFETCH_COUNT", "9"),
            (
                "AMQP_QUEUE_DECLARE_ARGS",
                "x-max-priority:10,x-queue-mode:lazy",
            ),
            ("REDIS_DELAYED_TASKS_KEY", "dk"),
            ("REDIS_CLUSTER_MODE", "true"),
            ("MULTIPLE_BROKEN_SEPARATOR", ","),
        ])
        .unwrap();
        assert_eq!(c.broker, "redis://127.0.0.1:6379");
        assert_eq!(c.result_backend, "redis://127.0.0.1:6379/1");
        assert_eq!(c.default_queue, "q");
        assert_eq!(c.results_expire_in, 60);
        assert_eq!(c.amqp.exchange, "ex");
        assert_eq!(c.amqp.prefetch_count, 9);
        assert_eq!(c.amqp.queue_declare_args["x-max-priority"], 10);
        assert_eq!(c.amqp.queue_declare_args["x-queue-mode"], "lazy");
        assert_eq!(c.redis.delayed_tasks_key, "dk");
        assert!(c.redis.cluster_enabled);
        assert_eq!(c.multiple_broker_separator, ",");
    }

    #[test]
    fn tls_variables_fill_the_shared_settings_and_each_role() {
        let c = load(&[
            ("TLS_CA_FILE", "/ca.pem"),
            ("TLS_CERT_FILE", "/c.pem"),
            ("TLS_KEY_FILE", "/c.key"),
            ("TLS_INSECURE", "false"),
            ("BROKER_TLS_SERVER_NAME", "rabbit.internal"),
            ("RESULT_BACKEND_TLS_CA_FILE", "/backend-ca.pem"),
            ("LOCK_TLS_INSECURE", "true"),
        ])
        .unwrap();
        assert_eq!(c.tls.shared.ca_file, "/ca.pem");
        assert_eq!(c.tls.shared.insecure, Some(false));
        let broker = c.tls.for_broker();
        assert_eq!(
            (broker.server_name.as_str(), broker.key_file.as_str()),
            ("rabbit.internal", "/c.key")
        );
        let backend = c.tls.for_result_backend();
        assert_eq!(
            (backend.ca_file.as_str(), backend.cert_file.as_str()),
            ("/backend-ca.pem", "/c.pem")
        );
        assert_eq!(c.tls.for_lock(false).insecure, Some(true));
        let err = load(&[("BROKER_TLS_INSECURE", "yes")]).unwrap_err();
        assert!(err.to_string().contains("BROKER_TLS_INSECURE"), "{err}");
    }

    #[test]
    fn empty_environment_gives_defaults() {
        assert_eq!(load(&[]).unwrap(), Config::default());
    }

    #[test]
    fn bad_values_name_the_variable() {
        let err = load(&[("RESULTS_EXPIRE_IN", "soon")]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "environment variable RESULTS_EXPIRE_IN=\"soon\": expected a non-negative integer in range"
        );
        assert!(load(&[("NO_UNIX_SIGNALS", "maybe")]).is_err());
        assert!(load(&[("AMQP_QUEUE_BINDING_ARGS", "novalue")]).is_err());
    }
}
