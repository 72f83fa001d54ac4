//! Loading a [`Config`] from a YAML or TOML file (Go's `NewFromYaml`, without its 1000-byte limit).

use std::path::Path;

use super::{Config, ConfigError};

impl Config {
    /// Reads a YAML (`.yaml`, `.yml`) or TOML (`.toml`) file over the defaults. Keys are Go's YAML keys
    /// (`broker`, `default_queue`, `result_backend`, `amqp: {exchange: ..}`, ...).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
        let path = path.as_ref();
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        match path.extension().and_then(|e| e.to_str()) {
            Some("yaml" | "yml") => Config::from_yaml_str(&text).map_err(|e| with_path(e, &shown)),
            Some("toml") => Config::from_toml_str(&text).map_err(|e| with_path(e, &shown)),
            _ => Err(ConfigError::Format { path: shown }),
        }
    }

    /// Parses YAML text over the defaults.
    pub fn from_yaml_str(text: &str) -> Result<Config, ConfigError> {
        if text.trim().is_empty() {
            return Ok(Config::default());
        }
        serde_yaml_ng::from_str(text).map_err(|e| ConfigError::Parse {
            path: "<yaml>".into(),
            reason: e.to_string(),
        })
    }

    /// Parses TOML text over the defaults.
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: "<toml>".into(),
            reason: e.to_string(),
        })
    }
}

fn with_path(error: ConfigError, path: &str) -> ConfigError {
    match error {
        ConfigError::Parse { reason, .. } => ConfigError::Parse {
            path: path.to_owned(),
            reason,
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_overrides_defaults_with_go_keys() {
        let config = Config::from_yaml_str(
            "broker: redis://localhost:6379\ndefault_queue: q\nresults_expire_in: 60\namqp:\n  exchange: ex\n  prefetch_count: 7\n  queue_declare_args:\n    x-max-priority: 10\nredis:\n  max_idle_timeout: 9\n  delayed_tasks_key: dk\n",
        )
        .unwrap();
        assert_eq!(config.broker, "redis://localhost:6379");
        assert_eq!(config.result_backend, "memory://");
        assert_eq!(config.default_queue, "q");
        assert_eq!(config.results_expire_in, 60);
        assert_eq!(config.amqp.exchange, "ex");
        assert_eq!(config.amqp.exchange_type, "direct");
        assert_eq!(config.amqp.prefetch_count, 7);
        assert_eq!(config.amqp.queue_declare_args["x-max-priority"], 10);
        assert_eq!(config.redis.idle_timeout, 9);
        assert_eq!(config.redis.delayed_tasks_key, "dk");
    }

    #[test]
    fn broker_lists_and_high_availability_settings() {
        let config = Config::from_yaml_str(
            "broker:\n  - amqp://a:5673/\n  - amqp://b:5674/\namqp:\n  queue_type: quorum\nredis:\n  master_name: mymaster\n  sentinel_password: sp\n  wait_replicas: 1\n",
        )
        .unwrap();
        assert_eq!(config.broker, "amqp://a:5673/,amqp://b:5674/");
        assert_eq!(config.amqp.queue_type, "quorum");
        assert_eq!(
            (
                config.redis.master_name.as_str(),
                config.redis.sentinel_password.as_str(),
                config.redis.wait_replicas
            ),
            ("mymaster", "sp", 1)
        );
    }

    #[test]
    fn toml_overrides_defaults() {
        let config = Config::from_toml_str(
            "broker = \"amqp://guest:guest@localhost:5672/\"\n[amqp]\nbinding_key = \"bk\"\n",
        )
        .unwrap();
        assert_eq!(config.broker, "amqp://guest:guest@localhost:5672/");
        assert_eq!(config.amqp.binding_key, "bk");
        assert_eq!(config.amqp.exchange, "machinery_exchange");
    }

    #[test]
    fn files_by_extension() {
        let dir = std::env::temp_dir().join(format!("machinery-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let yaml = dir.join("c.yml");
        std::fs::write(&yaml, "default_queue: from_file\n").unwrap();
        assert_eq!(Config::from_file(&yaml).unwrap().default_queue, "from_file");
        let ini = dir.join("c.ini");
        std::fs::write(&ini, "x").unwrap();
        assert!(matches!(
            Config::from_file(&ini),
            Err(ConfigError::Format { .. })
        ));
        let bad = dir.join("bad.yaml");
        std::fs::write(&bad, "results_expire_in: [").unwrap();
        let err = Config::from_file(&bad).unwrap_err().to_string();
        assert!(err.contains("bad.yaml"), "{err}");
        assert!(matches!(
            Config::from_file(dir.join("missing.yaml")),
            Err(ConfigError::Read { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
