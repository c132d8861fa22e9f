//! A minimal Redis (RESP2) connection: commands written from a reused buffer, replies read
//! one at a time into reused buffers. Enough for SET, GET, EVALSHA and WATCH/MULTI/EXEC,
//! without the per-command allocations of a general client.

use std::io::Write as _;
use std::net::SocketAddr;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// One reply's shape. Bulk data lands in [`Resp::bulk`]; array elements are read with
/// further calls to [`Resp::read`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply {
    /// `+…` (the text is not kept).
    Status,
    /// `:n`.
    Int(i64),
    /// `$…`: `true` with the data in [`Resp::bulk`], `false` for the null bulk string.
    Bulk(bool),
    /// `*n`: `Some(n)` elements follow, `None` for the null array (an aborted EXEC).
    Array(Option<usize>),
}

/// One open connection to Redis.
pub struct Resp {
    io: BufReader<TcpStream>,
    out: Vec<u8>,
    line: Vec<u8>,
    /// The data of the last bulk reply.
    pub bulk: Vec<u8>,
}

impl Resp {
    /// Connects to `addr` with `TCP_NODELAY`.
    pub async fn connect(addr: SocketAddr) -> Result<Self> {
        let stream = TcpStream::connect(addr).await.with_context(|| format!("connecting to Redis at {addr}"))?;
        stream.set_nodelay(true)?;
        Ok(Resp {
            io: BufReader::new(stream),
            out: Vec::with_capacity(256),
            line: Vec::with_capacity(64),
            bulk: Vec::with_capacity(64),
        })
    }

    /// Queues one command; [`Resp::flush`] sends everything queued.
    pub fn push(&mut self, args: &[&[u8]]) {
        // Writing to a Vec cannot fail.
        let _ = write!(self.out, "*{}\r\n", args.len());
        for arg in args {
            let _ = write!(self.out, "${}\r\n", arg.len());
            self.out.extend_from_slice(arg);
            self.out.extend_from_slice(b"\r\n");
        }
    }

    /// Sends every queued command.
    pub async fn flush(&mut self) -> Result<()> {
        self.io.get_mut().write_all(&self.out).await?;
        self.out.clear();
        Ok(())
    }

    /// Sends one command and reads its reply.
    pub async fn call(&mut self, args: &[&[u8]]) -> Result<Reply> {
        self.push(args);
        self.flush().await?;
        self.read().await
    }

    /// Reads one reply (an array's header only). An error reply is returned as `Err`.
    pub async fn read(&mut self) -> Result<Reply> {
        self.line.clear();
        if self.io.read_until(b'\n', &mut self.line).await? == 0 {
            bail!("Redis closed the connection");
        }
        let line = self.line.strip_suffix(b"\r\n").context("Redis: reply line without CRLF")?;
        let (&kind, rest) = line.split_first().context("Redis: empty reply line")?;
        match kind {
            b'+' => Ok(Reply::Status),
            b'-' => bail!("Redis: {}", String::from_utf8_lossy(rest)),
            b':' => Ok(Reply::Int(parse_int(rest)?)),
            b'$' => {
                let len = parse_int(rest)?;
                if len < 0 {
                    return Ok(Reply::Bulk(false));
                }
                let len = usize::try_from(len)?;
                self.bulk.resize(len + 2, 0);
                self.io.read_exact(&mut self.bulk).await?;
                self.bulk.truncate(len);
                Ok(Reply::Bulk(true))
            }
            b'*' => {
                let len = parse_int(rest)?;
                Ok(Reply::Array(usize::try_from(len).ok()))
            }
            _ => bail!("Redis: unknown reply type {:?}", kind as char),
        }
    }

    /// Reads a reply that must be `+…` (such as `+OK` or `+QUEUED`).
    pub async fn read_status(&mut self) -> Result<()> {
        match self.read().await? {
            Reply::Status => Ok(()),
            other => bail!("Redis: expected a status reply, got {other:?}"),
        }
    }

    /// Reads a reply that must be a bulk string holding an integer (`None` for null).
    pub async fn read_int_bulk(&mut self) -> Result<Option<i64>> {
        match self.read().await? {
            Reply::Bulk(false) => Ok(None),
            Reply::Bulk(true) => Ok(Some(parse_int(&self.bulk)?)),
            other => bail!("Redis: expected a bulk reply, got {other:?}"),
        }
    }
}

/// Formats `n` in decimal into `buf` and returns the digits, without allocating.
pub fn decimal(n: i64, buf: &mut [u8; 20]) -> &[u8] {
    let mut cursor = std::io::Cursor::new(&mut buf[..]);
    // 20 bytes hold every i64.
    let _ = write!(cursor, "{n}");
    let len = usize::try_from(cursor.position()).unwrap_or(0);
    &buf[..len]
}

fn parse_int(digits: &[u8]) -> Result<i64> {
    std::str::from_utf8(digits)
        .ok()
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("Redis: not an integer: {:?}", String::from_utf8_lossy(digits)))
}
