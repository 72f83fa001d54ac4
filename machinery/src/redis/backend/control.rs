//! The task-control keys of the Redis backend: unique-task claims (`scripts/unique_*.lua`) and
//! rate-limit schedules (`scripts/rate_reserve.lua`).

use std::sync::LazyLock;
use std::time::Duration;

use super::{op, RedisBackend};
use crate::backend::BackendError;
use crate::redis::lua::Lua;

struct Scripts {
    claim: Lua,
    release: Lua,
    reserve: Lua,
}

static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    claim: Lua::new(include_str!("../scripts/unique_claim.lua")),
    release: Lua::new(include_str!("../scripts/unique_release.lua")),
    reserve: Lua::new(include_str!("../scripts/rate_reserve.lua")),
});

/// The bodies of the task-control methods of [`Backend`](crate::backend::Backend) for [`RedisBackend`].
impl RedisBackend {
    pub(super) async fn claim_unique_key(
        &self,
        key: &str,
        task_uuid: &str,
        ttl: Duration,
    ) -> Result<Option<String>, BackendError> {
        self.check_key(key)?;
        let millis = ttl.as_millis().clamp(1, u128::from(u64::MAX)).to_string();
        let mut conn = self.inner.conn.clone();
        SCRIPTS
            .claim
            .run(
                &mut conn,
                &[key.as_bytes()],
                &[task_uuid.as_bytes(), millis.as_bytes()],
            )
            .await
            .map_err(op("claim unique-task key"))
    }

    pub(super) async fn release_unique_key(
        &self,
        key: &str,
        task_uuid: &str,
    ) -> Result<(), BackendError> {
        let mut conn = self.inner.conn.clone();
        SCRIPTS
            .release
            .run::<i64, _>(&mut conn, &[key.as_bytes()], &[task_uuid.as_bytes()])
            .await
            .map(drop)
            .map_err(op("release unique-task key"))
    }

    pub(super) async fn reserve_rate(
        &self,
        key: &str,
        interval: Duration,
    ) -> Result<Duration, BackendError> {
        self.check_key(key)?;
        let micros = interval
            .as_micros()
            .clamp(1, u128::from(u64::MAX))
            .to_string();
        let mut conn = self.inner.conn.clone();
        let wait: i64 = SCRIPTS
            .reserve
            .run(&mut conn, &[key.as_bytes()], &[micros.as_bytes()])
            .await
            .map_err(op("reserve rate-limit slot"))?;
        Ok(Duration::from_micros(u64::try_from(wait).unwrap_or(0)))
    }
}
