//! Lua scripts that survive a server restart: run with `EVALSHA`, and loaded again when the server
//! answers `NOSCRIPT`.

use redis::{Cmd, ErrorKind, RedisResult, ServerErrorKind};

/// A Lua script run with `EVALSHA`, loaded on first use and again after `NOSCRIPT` (a restarted or
/// flushed server).
#[derive(Debug)]
pub(crate) struct Lua {
    script: redis::Script,
}

impl Lua {
    pub(crate) fn new(source: &str) -> Self {
        Lua {
            script: redis::Script::new(source),
        }
    }

    /// `EVALSHA` of this script as a plain command, for pipelines.
    pub(crate) fn cmd<K: redis::ToRedisArgs, A: redis::ToRedisArgs>(
        &self,
        keys: &[K],
        args: &[A],
    ) -> Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.script.get_hash()).arg(keys.len());
        for key in keys {
            cmd.arg(key);
        }
        for arg in args {
            cmd.arg(arg);
        }
        cmd
    }

    /// Runs the script.
    pub(crate) async fn run<T: redis::FromRedisValue, C: redis::aio::ConnectionLike>(
        &self,
        conn: &mut C,
        keys: &[&[u8]],
        args: &[&[u8]],
    ) -> RedisResult<T> {
        let mut invocation = self.script.prepare_invoke();
        for key in keys {
            invocation.key(*key);
        }
        for arg in args {
            invocation.arg(*arg);
        }
        invocation.invoke_async(conn).await
    }

    /// Loads the script (after a pipeline that used it failed with `NOSCRIPT`).
    pub(crate) async fn load<C: redis::aio::ConnectionLike>(
        &self,
        conn: &mut C,
    ) -> RedisResult<()> {
        self.script.load_async(conn).await.map(drop)
    }
}

/// Whether a pipeline failed because the server does not know a script.
pub(crate) fn is_noscript(error: &redis::RedisError) -> bool {
    error.kind() == ErrorKind::Server(ServerErrorKind::NoScript)
}
