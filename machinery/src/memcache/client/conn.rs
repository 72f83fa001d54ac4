//! One server's pool of connections, and one connection speaking memcached's text protocol: commands
//! written whole, replies read line by line with bounds on every length.

use std::collections::HashMap;
use std::sync::{Arc, MutexGuard};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::{
    MemcacheError, Server, StoreMode, StoreReply, CONNECT_TIMEOUT, IO_TIMEOUT, MAX_IDLE, MAX_LINE,
    MAX_VALUE,
};

/// One value read back, with its CAS token when asked for.
pub(super) struct Item {
    pub(super) key: String,
    pub(super) value: Vec<u8>,
    pub(super) cas: Option<u64>,
}

/// Runs one command: on a pooled connection under [`IO_TIMEOUT`], returning the connection to the pool
/// only after a complete, expected reply. An I/O error empties the pool (after a server restart every
/// idle connection is dead); an idempotent command that met it on a reused connection is tried once more
/// on a new one.
macro_rules! run {
    ($server:expr, $command:expr, $idempotent:expr, |$conn:ident| $op:expr) => {{
        let server: &Server = $server;
        let (mut $conn, reused) = server.checkout().await?;
        let mut result = server.timed($command, $op).await;
        if matches!(result, Err(MemcacheError::Io { .. })) {
            server.idle().clear();
            if reused && $idempotent {
                tracing::debug!(server = %server.addr, command = $command, "pooled connection failed; trying a new one");
                $conn = server.connect().await?;
                result = server.timed($command, $op).await;
            }
        }
        server.finish($conn, result)
    }};
}

impl Server {
    fn idle(&self) -> MutexGuard<'_, Vec<Conn>> {
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// An idle connection (`true`: reused) or a new one.
    async fn checkout(&self) -> Result<(Conn, bool), MemcacheError> {
        if let Some(conn) = self.idle().pop() {
            return Ok((conn, true));
        }
        Ok((self.connect().await?, false))
    }

    async fn connect(&self) -> Result<Conn, MemcacheError> {
        let stream =
            match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&*self.addr)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(source)) => return Err(self.io_error(source)),
                Err(_) => {
                    return Err(MemcacheError::Timeout {
                        server: self.addr.to_string(),
                        command: "connect",
                        timeout: CONNECT_TIMEOUT,
                    })
                }
            };
        stream.set_nodelay(true).map_err(|e| self.io_error(e))?;
        let io: Box<dyn Io> = match &self.tls {
            None => Box::new(stream),
            Some(tls) => {
                match tokio::time::timeout(CONNECT_TIMEOUT, tls.wrap(&self.addr, stream)).await {
                    Ok(Ok(stream)) => Box::new(stream),
                    Ok(Err(source)) => return Err(self.io_error(source)),
                    Err(_) => {
                        return Err(MemcacheError::Timeout {
                            server: self.addr.to_string(),
                            command: "TLS handshake",
                            timeout: CONNECT_TIMEOUT,
                        })
                    }
                }
            }
        };
        Ok(Conn {
            addr: self.addr.clone(),
            io: BufReader::new(io),
            line: Vec::with_capacity(128),
        })
    }

    fn checkin(&self, conn: Conn) {
        let mut idle = self.idle();
        if idle.len() < MAX_IDLE {
            idle.push(conn);
        }
    }

    fn io_error(&self, source: std::io::Error) -> MemcacheError {
        MemcacheError::Io {
            server: self.addr.to_string(),
            source,
        }
    }

    /// Waits for one command under [`IO_TIMEOUT`].
    async fn timed<T>(
        &self,
        command: &'static str,
        op: impl std::future::Future<Output = Result<T, MemcacheError>>,
    ) -> Result<T, MemcacheError> {
        match tokio::time::timeout(IO_TIMEOUT, op).await {
            Ok(result) => result,
            Err(_) => Err(MemcacheError::Timeout {
                server: self.addr.to_string(),
                command,
                timeout: IO_TIMEOUT,
            }),
        }
    }

    /// Returns the connection to the pool only if the command ended with a complete, expected reply.
    /// (A cancelled command never gets here: its connection is dropped with its future.)
    fn finish<T>(&self, conn: Conn, result: Result<T, MemcacheError>) -> Result<T, MemcacheError> {
        if result.is_ok() {
            self.checkin(conn);
        }
        result
    }

    pub(super) async fn retrieve(
        &self,
        command: &'static str,
        keys: &[&str],
    ) -> Result<Vec<Item>, MemcacheError> {
        run!(self, command, true, |conn| conn.retrieve(command, keys))
    }

    pub(super) async fn store(
        &self,
        mode: StoreMode,
        key: &str,
        value: &[u8],
        exptime: u32,
    ) -> Result<StoreReply, MemcacheError> {
        let command = match mode {
            StoreMode::Set => "set",
            StoreMode::Add => "add",
            StoreMode::Cas(_) => "cas",
        };
        // `add` and `cas` may have been carried out before the connection failed: not repeated here (the
        // backend's compare-and-swap loops read the record again instead).
        let idempotent = mode == StoreMode::Set;
        run!(self, command, idempotent, |conn| conn
            .store(command, mode, key, value, exptime))
    }

    pub(super) async fn set_many(
        &self,
        items: &[(&str, &[u8])],
        exptime: u32,
    ) -> Result<(), MemcacheError> {
        run!(self, "set", true, |conn| conn.set_many(items, exptime))
    }

    pub(super) async fn delete(&self, key: &str) -> Result<bool, MemcacheError> {
        run!(self, "delete", true, |conn| conn.delete(key))
    }

    pub(super) async fn settings(&self) -> Result<HashMap<String, String>, MemcacheError> {
        run!(self, "stats settings", true, |conn| conn.settings())
    }
}

/// A connection's stream: plain TCP, or TLS over it (`memcaches://`).
pub(super) trait Io: AsyncRead + AsyncWrite + Send + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// One connection, owned by one command at a time.
pub(super) struct Conn {
    addr: Arc<str>,
    io: BufReader<Box<dyn Io>>,
    line: Vec<u8>,
}

impl Conn {
    fn io_error(&self, source: std::io::Error) -> MemcacheError {
        MemcacheError::Io {
            server: self.addr.to_string(),
            source,
        }
    }

    fn unexpected(&self, command: &'static str, reply: &[u8]) -> MemcacheError {
        let cut = &reply[..reply.len().min(200)];
        MemcacheError::Protocol {
            server: self.addr.to_string(),
            command,
            reply: String::from_utf8_lossy(cut).into_owned(),
        }
    }

    /// `ERROR`, `CLIENT_ERROR ...` or `SERVER_ERROR ...`, if `line` is one.
    fn refusal(&self, command: &'static str, key: &str, line: &[u8]) -> Option<MemcacheError> {
        let is_error = line == b"ERROR"
            || line.starts_with(b"CLIENT_ERROR")
            || line.starts_with(b"SERVER_ERROR");
        is_error.then(|| MemcacheError::Refused {
            server: self.addr.to_string(),
            command,
            key: key.to_owned(),
            reply: String::from_utf8_lossy(line).into_owned(),
        })
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), MemcacheError> {
        let stream = self.io.get_mut();
        match stream.write_all(bytes).await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.io_error(e)),
        }
    }

    /// Reads one reply line into `self.line`, without its `\r\n`.
    async fn read_line(&mut self, command: &'static str) -> Result<(), MemcacheError> {
        self.line.clear();
        let read = (&mut self.io)
            .take(MAX_LINE)
            .read_until(b'\n', &mut self.line)
            .await;
        match read {
            Ok(0) => Err(self.io_error(std::io::ErrorKind::UnexpectedEof.into())),
            Ok(_) if self.line.ends_with(b"\r\n") => {
                self.line.truncate(self.line.len() - 2);
                Ok(())
            }
            Ok(_) => Err(self.unexpected(command, &self.line)),
            Err(e) => Err(self.io_error(e)),
        }
    }

    /// `get`/`gets` of `keys`: the `VALUE` items up to `END`.
    async fn retrieve(
        &mut self,
        command: &'static str,
        keys: &[&str],
    ) -> Result<Vec<Item>, MemcacheError> {
        let mut request = Vec::with_capacity(8 + keys.iter().map(|k| k.len() + 1).sum::<usize>());
        request.extend_from_slice(command.as_bytes());
        for key in keys {
            request.push(b' ');
            request.extend_from_slice(key.as_bytes());
        }
        request.extend_from_slice(b"\r\n");
        self.send(&request).await?;
        let mut items = Vec::new();
        loop {
            self.read_line(command).await?;
            if self.line == b"END" {
                return Ok(items);
            }
            if let Some(error) =
                self.refusal(command, keys.first().copied().unwrap_or(""), &self.line)
            {
                return Err(error);
            }
            let header = parse_value_line(&self.line, command == "gets")
                .ok_or_else(|| self.unexpected(command, &self.line))?;
            let mut value = vec![0; header.len + 2];
            if let Err(e) = self.io.read_exact(&mut value).await {
                return Err(self.io_error(e));
            }
            if !value.ends_with(b"\r\n") {
                return Err(self.unexpected(command, b"a value not followed by \\r\\n"));
            }
            value.truncate(header.len);
            items.push(Item {
                key: header.key,
                value,
                cas: header.cas,
            });
        }
    }

    async fn store(
        &mut self,
        command: &'static str,
        mode: StoreMode,
        key: &str,
        value: &[u8],
        exptime: u32,
    ) -> Result<StoreReply, MemcacheError> {
        let line = match mode {
            StoreMode::Cas(cas) => format!("cas {key} 0 {exptime} {} {cas}\r\n", value.len()),
            _ => format!("{command} {key} 0 {exptime} {}\r\n", value.len()),
        };
        let mut request = Vec::with_capacity(line.len() + value.len() + 2);
        request.extend_from_slice(line.as_bytes());
        request.extend_from_slice(value);
        request.extend_from_slice(b"\r\n");
        self.send(&request).await?;
        self.read_store_reply(command, key, value.len()).await
    }

    async fn read_store_reply(
        &mut self,
        command: &'static str,
        key: &str,
        size: usize,
    ) -> Result<StoreReply, MemcacheError> {
        self.read_line(command).await?;
        match self.line.as_slice() {
            b"STORED" => Ok(StoreReply::Stored),
            b"NOT_STORED" => Ok(StoreReply::NotStored),
            b"EXISTS" => Ok(StoreReply::Exists),
            b"NOT_FOUND" => Ok(StoreReply::NotFound),
            line if line.starts_with(b"SERVER_ERROR object too large") => {
                Err(MemcacheError::TooLarge {
                    server: self.addr.to_string(),
                    key: key.to_owned(),
                    size,
                })
            }
            line => Err(self
                .refusal(command, key, line)
                .unwrap_or_else(|| self.unexpected(command, line))),
        }
    }

    async fn set_many(
        &mut self,
        items: &[(&str, &[u8])],
        exptime: u32,
    ) -> Result<(), MemcacheError> {
        let mut request = Vec::new();
        for (key, value) in items {
            request
                .extend_from_slice(format!("set {key} 0 {exptime} {}\r\n", value.len()).as_bytes());
            request.extend_from_slice(value);
            request.extend_from_slice(b"\r\n");
        }
        self.send(&request).await?;
        for (key, value) in items {
            match self.read_store_reply("set", key, value.len()).await? {
                StoreReply::Stored => {}
                _ => {
                    let line = self.line.clone();
                    return Err(self.unexpected("set", &line));
                }
            }
        }
        Ok(())
    }

    async fn delete(&mut self, key: &str) -> Result<bool, MemcacheError> {
        self.send(format!("delete {key}\r\n").as_bytes()).await?;
        self.read_line("delete").await?;
        match self.line.as_slice() {
            b"DELETED" => Ok(true),
            b"NOT_FOUND" => Ok(false),
            line => Err(self
                .refusal("delete", key, line)
                .unwrap_or_else(|| self.unexpected("delete", line))),
        }
    }

    async fn settings(&mut self) -> Result<HashMap<String, String>, MemcacheError> {
        const COMMAND: &str = "stats settings";
        self.send(b"stats settings\r\n").await?;
        let mut settings = HashMap::new();
        loop {
            self.read_line(COMMAND).await?;
            if self.line == b"END" {
                return Ok(settings);
            }
            let text = String::from_utf8_lossy(&self.line);
            let mut parts = text.splitn(3, ' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("STAT"), Some(name), Some(value)) => {
                    settings.insert(name.to_owned(), value.to_owned());
                }
                _ => {
                    let line = self.line.clone();
                    return Err(self
                        .refusal(COMMAND, "", &line)
                        .unwrap_or_else(|| self.unexpected(COMMAND, &line)));
                }
            }
        }
    }
}

struct ValueHeader {
    key: String,
    len: usize,
    cas: Option<u64>,
}

/// `VALUE <key> <flags> <bytes>[ <cas unique>]`.
fn parse_value_line(line: &[u8], with_cas: bool) -> Option<ValueHeader> {
    let text = std::str::from_utf8(line).ok()?;
    let mut parts = text.split(' ');
    if parts.next()? != "VALUE" {
        return None;
    }
    let key = parts.next()?.to_owned();
    parts.next()?.parse::<u32>().ok()?;
    let len = parts.next()?.parse::<usize>().ok()?;
    if len > MAX_VALUE {
        return None;
    }
    let cas = match parts.next() {
        Some(cas) => Some(cas.parse::<u64>().ok()?),
        None if with_cas => return None,
        None => None,
    };
    if parts.next().is_some() {
        return None;
    }
    Some(ValueHeader { key, len, cas })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_lines_parse_strictly() {
        let header = parse_value_line(b"VALUE k 0 12 99", true).unwrap();
        assert_eq!(
            (header.key.as_str(), header.len, header.cas),
            ("k", 12, Some(99))
        );
        let header = parse_value_line(b"VALUE k 0 12", false).unwrap();
        assert_eq!(header.cas, None);
        assert!(parse_value_line(b"VALUE k 0 12", true).is_none());
        assert!(parse_value_line(b"VALUE k 0 x", false).is_none());
        assert!(parse_value_line(b"VALUE k 0 12 99 extra", false).is_none());
        assert!(parse_value_line(b"VALUE k 0 99999999999", false).is_none());
        assert!(parse_value_line(b"STORED", false).is_none());
    }
}
