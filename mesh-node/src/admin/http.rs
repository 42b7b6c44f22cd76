//! A minimal HTTP/1.1 server for the admin and metrics endpoints: `GET` only, one request per
//! connection, five seconds per request. Enough for curl, probes and Prometheus; nothing here
//! is exposed beyond what the routes answer.

use std::{sync::Arc, time::Duration};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpListener,
};

/// An HTTP/1.1 endpoint's answers to `GET`s.
pub trait Routes: Send + Sync + 'static {
    fn get(&self, path: &str) -> Reply;
}

pub struct Reply {
    status: &'static str,
    content_type: &'static str,
    body: String,
}

impl Reply {
    pub fn ok(content_type: &'static str, body: String) -> Self {
        Self {
            status: "200 OK",
            content_type,
            body,
        }
    }

    pub fn text(body: String) -> Self {
        Self::ok(TEXT, body)
    }

    pub fn not_found() -> Self {
        Self {
            status: "404 Not Found",
            content_type: TEXT,
            body: "not found\n".into(),
        }
    }

    /// 503: not ready, or not yet able to answer.
    pub fn unavailable(body: String) -> Self {
        Self {
            status: "503 Service Unavailable",
            content_type: TEXT,
            body,
        }
    }

    pub fn error(e: impl std::fmt::Display) -> Self {
        Self {
            status: "500 Internal Server Error",
            content_type: TEXT,
            body: format!("{e}\n"),
        }
    }
}

const TEXT: &str = "text/plain; charset=utf-8";

/// Answers requests on `listener` with `routes`, one short-lived task per connection.
pub async fn serve<R: Routes>(listener: TcpListener, routes: Arc<R>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let routes = routes.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), answer(stream, &*routes)).await;
        });
    }
}

/// Reads one request from `stream` (its head at most 4 KiB) and writes `routes`' answer.
pub async fn answer<S, R>(mut stream: S, routes: &R) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
    R: Routes,
{
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
        if len == buf.len() {
            let reply = Reply {
                status: "431 Request Header Fields Too Large",
                content_type: TEXT,
                body: String::new(),
            };
            return respond(&mut stream, reply).await;
        }
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            return Ok(());
        }
        len += n;
    }
    let head = String::from_utf8_lossy(&buf[..len]);
    let mut parts = head.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let reply = match method {
        "GET" => routes.get(path),
        _ => Reply {
            status: "405 Method Not Allowed",
            content_type: TEXT,
            body: String::new(),
        },
    };
    respond(&mut stream, reply).await
}

async fn respond<S: AsyncWrite + Unpin>(stream: &mut S, reply: Reply) -> std::io::Result<()> {
    let msg = format!(
        "HTTP/1.1 {}\r\ncontent-type: {}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{}",
        reply.status,
        reply.content_type,
        reply.body.len(),
        reply.body
    );
    stream.write_all(msg.as_bytes()).await?;
    stream.shutdown().await
}
