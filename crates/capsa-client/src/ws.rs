//! The WebSocket endpoints from the client side: interactive exec (stdin,
//! resizes and signals in; output and the exit out) and the live console.

use bytes::Bytes;
use futures::stream::SplitSink;
use futures::{SinkExt, StreamExt};
use hyper::StatusCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest, protocol::WebSocketConfig};

use crate::http::{sb_path, BoxStream, Client, ClientError, ExecChunk, Io, Result};
use capsa_api::types::ExecRequest;
use capsa_api::ErrorBody;

type Ws = tokio_tungstenite::WebSocketStream<Box<dyn Io>>;

/// Largest message accepted from capsad: an exec event holds one output
/// chunk in base64, far below this.
const MAX_WS_MESSAGE: usize = 4 << 20;

/// The sending half of an interactive exec: stdin bytes and controls.
/// Dropping it (or [`close`](Self::close)) ends the exec: capsad kills the
/// command when its client leaves.
pub struct ExecInput {
    sink: SplitSink<Ws, Message>,
}

impl std::fmt::Debug for ExecInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExecInput")
    }
}

impl ExecInput {
    async fn control(&mut self, v: serde_json::Value) -> Result<()> {
        self.sink
            .send(Message::Text(v.to_string().into()))
            .await
            .map_err(ws_err)
    }

    /// Bytes for the command's stdin (on a PTY: keys typed).
    pub async fn stdin(&mut self, data: &[u8]) -> Result<()> {
        self.sink
            .send(Message::Binary(Bytes::copy_from_slice(data)))
            .await
            .map_err(ws_err)
    }

    /// Closes the command's stdin (on a PTY: `^D`).
    pub async fn stdin_eof(&mut self) -> Result<()> {
        self.control(serde_json::json!({"type": "stdin_eof"})).await
    }

    /// Resizes the command's PTY (ignored without one).
    pub async fn resize(&mut self, rows: u16, cols: u16) -> Result<()> {
        self.control(serde_json::json!({"type": "resize", "rows": rows, "cols": cols}))
            .await
    }

    /// Sends signal `signal` to the command's process group.
    pub async fn signal(&mut self, signal: i32) -> Result<()> {
        self.control(serde_json::json!({"type": "signal", "signal": signal}))
            .await
    }

    /// Closes the WebSocket: capsad kills the command if it still runs.
    pub async fn close(mut self) {
        let _ = self.sink.send(Message::Close(None)).await;
        let _ = self.sink.close().await;
    }
}

/// The sending half of a live console: bytes typed into the guest.
pub struct ConsoleInput {
    sink: SplitSink<Ws, Message>,
}

impl std::fmt::Debug for ConsoleInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConsoleInput")
    }
}

impl ConsoleInput {
    /// Types `data` into the console.
    pub async fn send(&mut self, data: &[u8]) -> Result<()> {
        self.sink
            .send(Message::Binary(Bytes::copy_from_slice(data)))
            .await
            .map_err(ws_err)
    }

    /// Closes the WebSocket (the sandbox keeps running).
    pub async fn close(mut self) {
        let _ = self.sink.send(Message::Close(None)).await;
        let _ = self.sink.close().await;
    }
}

fn ws_err(e: tungstenite::Error) -> ClientError {
    ClientError::WebSocket(e.to_string())
}

impl Client {
    async fn websocket(&self, path: &str) -> Result<Ws> {
        let (io, host) = self.connect_io().await?;
        let mut req = format!("ws://{host}{path}")
            .into_client_request()
            .map_err(ws_err)?;
        let auth = format!("Bearer {}", self.token)
            .parse()
            .map_err(|_| ClientError::WebSocket("the token is not a valid header value".into()))?;
        req.headers_mut().insert(hyper::header::AUTHORIZATION, auth);
        let config = WebSocketConfig::default()
            .max_message_size(Some(MAX_WS_MESSAGE))
            .max_frame_size(Some(MAX_WS_MESSAGE));
        match tokio_tungstenite::client_async_with_config(req, io, Some(config)).await {
            Ok((ws, _)) => Ok(ws),
            // Refused before the upgrade (no such sandbox, bad token): the
            // daemon's error body says why.
            Err(tungstenite::Error::Http(resp)) => {
                let status =
                    StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
                let body = resp.body().as_deref().unwrap_or_default();
                Err(match serde_json::from_slice::<ErrorBody>(body) {
                    Ok(b) => ClientError::Api {
                        status,
                        detail: b.error,
                    },
                    Err(_) => ClientError::Decode(format!(
                        "WebSocket refused with {status}: {}",
                        String::from_utf8_lossy(&body[..body.len().min(512)])
                    )),
                })
            }
            Err(e) => Err(ws_err(e)),
        }
    }

    /// `GET /v1/sandboxes/{name}/exec/ws`: an interactive exec. `req.stdin`
    /// is ignored (stdin stays open: write it with [`ExecInput::stdin`]).
    /// The stream yields output as it comes and ends with
    /// [`ExecChunk::Exit`]; an `error` event becomes an `Err`.
    pub async fn exec_interactive(
        &self,
        name: &str,
        req: &ExecRequest,
    ) -> Result<(ExecInput, BoxStream<ExecChunk>)> {
        let ws = self.websocket(&sb_path(name, "/exec/ws")).await?;
        let (mut sink, stream) = ws.split();
        let first = serde_json::to_string(req).map_err(|e| ClientError::Decode(e.to_string()))?;
        sink.send(Message::Text(first.into()))
            .await
            .map_err(ws_err)?;
        let events = stream.filter_map(|m| async move {
            match m {
                Ok(Message::Text(t)) => Some(decode_event(t.as_str())),
                Ok(Message::Binary(_)) => Some(Err(ClientError::Decode(
                    "a binary frame on the exec WebSocket".into(),
                ))),
                Ok(_) => None,
                Err(e) => Some(Err(ws_err(e))),
            }
        });
        Ok((ExecInput { sink }, Box::pin(events)))
    }

    /// `GET /v1/sandboxes/{name}/console/ws`: the live serial console (its
    /// history first). The stream yields what the guest prints.
    pub async fn console_interactive(
        &self,
        name: &str,
    ) -> Result<(ConsoleInput, BoxStream<Bytes>)> {
        self.byte_pipe(&sb_path(name, "/console/ws")).await
    }

    /// `GET /v1/sandboxes/{name}/screen/vnc`: a VNC viewer's RFB stream;
    /// without `input`, view-only (the daemon drops the viewer's input).
    pub async fn screen_vnc(
        &self,
        name: &str,
        input: bool,
    ) -> Result<(ConsoleInput, BoxStream<Bytes>)> {
        self.byte_pipe(&sb_path(name, &format!("/screen/vnc?input={input}")))
            .await
    }

    async fn byte_pipe(&self, path: &str) -> Result<(ConsoleInput, BoxStream<Bytes>)> {
        let ws = self.websocket(path).await?;
        let (sink, stream) = ws.split();
        let out = stream.filter_map(|m| async move {
            match m {
                Ok(Message::Binary(b)) => Some(Ok(b)),
                Ok(Message::Text(t)) => Some(Ok(Bytes::copy_from_slice(t.as_bytes()))),
                Ok(_) => None,
                Err(e) => Some(Err(ws_err(e))),
            }
        });
        Ok((ConsoleInput { sink }, Box::pin(out)))
    }
}

fn decode_event(text: &str) -> Result<ExecChunk> {
    crate::http::decode_exec_event(text.as_bytes())
}
