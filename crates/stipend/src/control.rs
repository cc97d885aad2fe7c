//! The control socket: how `stipend account …`, `grant` and `give` reach a running server.
//!
//! The store has one writer at a time (it holds the store's lock). While `stipend serve` runs, it
//! is that writer, so the CLI sends its command over a Unix socket in the data directory and the
//! server runs it on its own ledger. Only the operator's user can use it, which is the same rule as
//! for the store's files: the socket is bound inside a directory of mode 0700 (so there is no
//! moment at which it has the umask's mode), is itself 0600, and the server checks each peer's
//! uid (`SO_PEERCRED`) against its own. One JSON line in, one out, within a few seconds.

use crate::limits::{
    CONTROL_CLIENT_TIMEOUT, CONTROL_CONNECTIONS_MAX, CONTROL_REQUEST_BYTES_MAX,
    CONTROL_REQUEST_TIMEOUT,
};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use stipend_agents::Agents;
use stipend_gateway::KeyRing;
use stipend_ledger::Books;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

use crate::commands::{Request, Response, execute};

/// A reply on the control socket.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    /// The command ran.
    Ok(Response),
    /// The command was refused; nothing changed.
    Error {
        /// Why, for a person.
        message: String,
    },
}

/// Binds the control socket in its private directory, replacing a stale one (the caller holds
/// the store's lock, so no other server can be using it).
pub fn bind(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::DirBuilderExt;
    if let Some(directory) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(directory)
            .with_context(|| format!("cannot create {}", directory.display()))?;
        // It may have existed with another mode.
        std::fs::set_permissions(directory, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot restrict {}", directory.display()))?;
    }
    if path.exists() {
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove the stale socket {}", path.display()))?;
    }
    let listener = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("cannot listen on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot restrict {}", path.display()))?;
    Ok(listener)
}

/// Accepts control connections until the task is dropped.
pub async fn serve(
    listener: tokio::net::UnixListener,
    ledger: Arc<dyn Books>,
    keys: KeyRing,
    agents: Option<Arc<Agents>>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(CONTROL_CONNECTIONS_MAX));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "control socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::warn!("too many control connections; closing one");
            continue;
        };
        let ledger = Arc::clone(&ledger);
        let keys = keys.clone();
        let agents = agents.clone();
        tokio::spawn(async move {
            if let Err(error) = handle(stream, ledger, keys, agents).await {
                tracing::warn!(%error, "control connection failed");
            }
            drop(slot);
        });
    }
}

async fn handle(
    stream: tokio::net::UnixStream,
    ledger: Arc<dyn Books>,
    keys: KeyRing,
    agents: Option<Arc<Agents>>,
) -> anyhow::Result<()> {
    // The directory's mode already keeps other users out; this holds even if it is changed.
    let peer = stream.peer_cred()?.uid();
    let own = rustix::process::getuid().as_raw();
    let (read, mut write) = stream.into_split();
    if peer != own {
        tracing::warn!(
            peer_uid = peer,
            "a control connection from another user was refused"
        );
        let reply = Reply::Error {
            message: "the control socket serves the server's own user only".to_string(),
        };
        let mut text = serde_json::to_string(&reply)?;
        text.push('\n');
        write.write_all(text.as_bytes()).await?;
        return Ok(());
    }
    let mut line = String::new();
    let mut reader = tokio::io::BufReader::new(read.take(CONTROL_REQUEST_BYTES_MAX));
    if tokio::time::timeout(CONTROL_REQUEST_TIMEOUT, reader.read_line(&mut line))
        .await
        .is_err()
    {
        anyhow::bail!(
            "no request within {} s; closed",
            CONTROL_REQUEST_TIMEOUT.as_secs()
        );
    }
    let reply = match serde_json::from_str::<Request>(&line) {
        Ok(request) => {
            tracing::info!(command = request.name(), "control command");
            let run = move || execute(&*ledger, &keys, agents.as_deref(), request);
            match tokio::task::spawn_blocking(run).await {
                Ok(Ok(response)) => Reply::Ok(response),
                Ok(Err(error)) => Reply::Error {
                    message: error.to_string(),
                },
                Err(_) => Reply::Error {
                    message: "the command failed inside the server".to_string(),
                },
            }
        }
        Err(error) => Reply::Error {
            message: format!("malformed control request: {error}"),
        },
    };
    let mut text = serde_json::to_string(&reply)?;
    text.push('\n');
    write.write_all(text.as_bytes()).await?;
    write.shutdown().await?;
    Ok(())
}

/// Sends one command to the server listening on `socket`.
pub fn call(socket: &Path, request: &Request) -> anyhow::Result<Reply> {
    let mut stream = UnixStream::connect(socket).with_context(|| {
        format!(
            "the store is in use by a running server, but its control socket {} does not answer",
            socket.display()
        )
    })?;
    stream.set_read_timeout(Some(CONTROL_CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CONTROL_CLIENT_TIMEOUT))?;
    let mut text = serde_json::to_string(request)?;
    text.push('\n');
    stream.write_all(text.as_bytes())?;
    let mut line = String::new();
    BufReader::new((&stream).take(16 * 1024 * 1024))
        .read_line(&mut line)
        .context("no reply from the server")?;
    serde_json::from_str(&line).context("the server's reply is malformed")
}
