//! A small HTTP/1.1 server over a Unix socket: one thread per connection (capped), requests
//! parsed with `httparse`, keep-alive, a body size limit and read timeouts so a slow or
//! half-open client only ever holds its own thread.

use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Most header bytes a request may have.
const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Most headers a request may have.
const MAX_HEADERS: usize = 64;
/// How long a whole request may take to arrive once its first byte has.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a keep-alive connection may sit idle between requests.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Most connections served at once; more are answered with an error and closed.
pub const MAX_CONNECTIONS: usize = 256;

/// One parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `PUT`, `PATCH`, ...
    pub method: String,
    /// The path, without a query string.
    pub path: String,
    /// The body (empty when none).
    pub body: Vec<u8>,
}

/// A response: a status and an optional JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// JSON body, if any.
    pub body: Option<String>,
}

impl Response {
    /// 204 No Content.
    pub fn no_content() -> Self {
        Response {
            status: 204,
            body: None,
        }
    }

    /// 200 with `body`.
    pub fn ok(body: String) -> Self {
        Response {
            status: 200,
            body: Some(body),
        }
    }

    /// 400 with Firecracker's `{"fault_message": ...}`.
    pub fn fault(message: impl AsRef<str>) -> Self {
        let body = serde_json::json!({ "fault_message": message.as_ref() }).to_string();
        Response {
            status: 400,
            body: Some(body),
        }
    }

    fn write_to(&self, out: &mut impl Write, keep_alive: bool) -> io::Result<()> {
        let reason = match self.status {
            100 => "Continue",
            200 => "OK",
            204 => "No Content",
            _ => "Bad Request",
        };
        let mut head = format!(
            "HTTP/1.1 {} {reason}\r\nServer: Firecracker API\r\nConnection: {}\r\n",
            self.status,
            if keep_alive { "keep-alive" } else { "close" }
        );
        match &self.body {
            Some(b) => {
                head.push_str(&format!(
                    "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                    b.len()
                ));
                head.push_str(b);
            }
            None => head.push_str("\r\n"),
        }
        out.write_all(head.as_bytes())?;
        out.flush()
    }
}

/// What reading one request produced.
enum Read1 {
    /// A request, and whether the connection stays open after its response.
    Request(Request, bool),
    /// A request that can't be served: answer this and close.
    Bad(Response),
    /// The client closed (or went quiet) between requests.
    Closed,
}

/// Reads one request from `stream`; `buf` carries bytes already read past the previous one.
fn read_request(stream: &mut UnixStream, buf: &mut Vec<u8>, max_body: usize) -> Read1 {
    let mut chunk = [0u8; 4096];
    // Bytes of a pipelined request already read start its clock.
    let mut deadline = (!buf.is_empty()).then(|| Instant::now() + REQUEST_TIMEOUT);
    // Headers.
    let (head_len, method, path, content_length, keep_alive, expect_continue) = loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(buf) {
            Ok(httparse::Status::Complete(n)) => {
                let method = req.method.unwrap_or("").to_string();
                let path = req.path.unwrap_or("");
                let path = path.split('?').next().unwrap_or("").to_string();
                let http10 = req.version == Some(0);
                let mut content_length: Option<usize> = None;
                let mut keep_alive = !http10;
                let mut expect_continue = false;
                for h in req.headers.iter() {
                    let value = String::from_utf8_lossy(h.value);
                    let value = value.trim();
                    if h.name.eq_ignore_ascii_case("content-length") {
                        match value.parse::<usize>() {
                            Ok(v) => content_length = Some(v),
                            Err(_) => {
                                return Read1::Bad(Response::fault(format!(
                                    "Invalid Content-Length header: {value:?}"
                                )))
                            }
                        }
                    } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                        return Read1::Bad(Response::fault(
                            "Transfer-Encoding is not supported; send a Content-Length",
                        ));
                    } else if h.name.eq_ignore_ascii_case("connection") {
                        if value.eq_ignore_ascii_case("close") {
                            keep_alive = false;
                        } else if value.eq_ignore_ascii_case("keep-alive") {
                            keep_alive = true;
                        }
                    } else if h.name.eq_ignore_ascii_case("expect")
                        && value.eq_ignore_ascii_case("100-continue")
                    {
                        expect_continue = true;
                    }
                }
                break (
                    n,
                    method,
                    path,
                    content_length.unwrap_or(0),
                    keep_alive,
                    expect_continue,
                );
            }
            Ok(httparse::Status::Partial) => {
                if buf.len() > MAX_HEADER_BYTES {
                    return Read1::Bad(Response::fault("Request headers are too large"));
                }
            }
            Err(e) => return Read1::Bad(Response::fault(format!("Invalid HTTP request: {e}"))),
        }
        // Idle between requests; once a request has begun, all of it must arrive by its
        // deadline (a client trickling a byte at a time gains nothing).
        let timeout = match deadline {
            None => IDLE_TIMEOUT,
            Some(d) => match d.checked_duration_since(Instant::now()) {
                Some(left) if !left.is_zero() => left,
                _ => return Read1::Closed,
            },
        };
        let _ = stream.set_read_timeout(Some(timeout));
        match stream.read(&mut chunk) {
            Ok(0) => return Read1::Closed,
            Ok(n) => {
                deadline.get_or_insert_with(|| Instant::now() + REQUEST_TIMEOUT);
                buf.extend_from_slice(&chunk[..n]);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Read1::Closed,
        }
    };
    if content_length > max_body {
        return Read1::Bad(Response::fault(format!(
            "Request payload with size {content_length} is larger than the limit of {max_body} \
             allowed by server."
        )));
    }
    if expect_continue {
        let _ = stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
    }
    buf.drain(..head_len);
    let deadline = deadline.unwrap_or_else(|| Instant::now() + REQUEST_TIMEOUT);
    while buf.len() < content_length {
        match deadline.checked_duration_since(Instant::now()) {
            Some(left) if !left.is_zero() => {
                let _ = stream.set_read_timeout(Some(left));
            }
            _ => return Read1::Closed,
        }
        match stream.read(&mut chunk) {
            Ok(0) => return Read1::Closed,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Read1::Closed,
        }
    }
    let body: Vec<u8> = buf.drain(..content_length).collect();
    Read1::Request(Request { method, path, body }, keep_alive)
}

/// Serves one connection until it closes, a request can't be parsed, or it times out.
pub fn serve_connection(
    mut stream: UnixStream,
    max_body: usize,
    handle: &(dyn Fn(&Request) -> Response + Sync),
) {
    let _ = stream.set_write_timeout(Some(REQUEST_TIMEOUT));
    let mut buf = Vec::new();
    loop {
        match read_request(&mut stream, &mut buf, max_body) {
            Read1::Request(req, keep_alive) => {
                let resp = handle(&req);
                if resp.write_to(&mut stream, keep_alive).is_err() || !keep_alive {
                    return;
                }
            }
            Read1::Bad(resp) => {
                crate::metrics::METRICS.api_server.bad_requests.inc();
                let _ = resp.write_to(&mut stream, false);
                return;
            }
            Read1::Closed => return,
        }
    }
}

/// Accepts connections on `listener` forever, each on its own thread (at most
/// [`MAX_CONNECTIONS`] at once), handing every request to `handle`.
pub fn serve(
    listener: UnixListener,
    max_body: usize,
    handle: Arc<dyn Fn(&Request) -> Response + Send + Sync>,
) {
    let live = Arc::new(AtomicUsize::new(0));
    let filtered = kiln_seccomp::current_kind();
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else {
            // Out of fds or memory: back off rather than spin; connections wait in the
            // listen queue meanwhile.
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        if live.load(Ordering::Acquire) >= MAX_CONNECTIONS {
            let _ = stream.set_write_timeout(Some(REQUEST_TIMEOUT));
            let _ = Response::fault("Too many connections").write_to(&mut stream, false);
            continue;
        }
        live.fetch_add(1, Ordering::AcqRel);
        let live2 = live.clone();
        let handle = handle.clone();
        let spawned = std::thread::Builder::new()
            .name("fc_api_conn".into())
            .spawn(move || {
                // Runs under the accepting thread's seccomp filter, if it has one.
                if let Some(kind) = filtered {
                    kiln_seccomp::note_inherited(kind);
                }
                serve_connection(stream, max_body, &*handle);
                live2.fetch_sub(1, Ordering::AcqRel);
            });
        if spawned.is_err() {
            live.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(raw: &[u8], max_body: usize) -> (Vec<Request>, String) {
        let (mut a, b) = UnixStream::pair().unwrap();
        let seen = std::sync::Mutex::new(Vec::new());
        a.write_all(raw).unwrap();
        a.shutdown(std::net::Shutdown::Write).unwrap();
        serve_connection(b, max_body, &|r: &Request| {
            seen.lock().unwrap().push(r.clone());
            Response::no_content()
        });
        let mut out = String::new();
        a.read_to_string(&mut out).unwrap();
        (seen.into_inner().unwrap(), out)
    }

    #[test]
    fn keep_alive_serves_pipelined_requests() {
        let (reqs, out) = roundtrip(
            b"GET /a?x=1 HTTP/1.1\r\n\r\nPUT /b HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
            100,
        );
        assert_eq!(reqs.len(), 2);
        assert_eq!(reqs[0].path, "/a");
        assert_eq!(reqs[1].method, "PUT");
        assert_eq!(reqs[1].body, b"{}");
        assert_eq!(out.matches("HTTP/1.1 204").count(), 2, "{out}");
    }

    #[test]
    fn oversized_and_malformed_requests_get_400_and_close() {
        let (reqs, out) = roundtrip(b"PUT /b HTTP/1.1\r\nContent-Length: 101\r\n\r\n", 100);
        assert!(reqs.is_empty());
        assert!(out.starts_with("HTTP/1.1 400"), "{out}");
        assert!(out.contains("larger than the limit of 100"), "{out}");
        let (reqs, out) = roundtrip(b"\x00\x01 garbage\r\n\r\n", 100);
        assert!(reqs.is_empty());
        assert!(out.starts_with("HTTP/1.1 400"), "{out}");
        let (_, out) = roundtrip(b"PUT /b HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 100);
        assert!(out.contains("Content-Length"), "{out}");
    }

    #[test]
    fn connection_close_and_http10_close_after_one_response() {
        let (reqs, out) = roundtrip(
            b"GET / HTTP/1.1\r\nConnection: close\r\n\r\nGET / HTTP/1.1\r\n\r\n",
            100,
        );
        assert_eq!(reqs.len(), 1);
        assert!(out.contains("Connection: close"), "{out}");
        let (reqs, _) = roundtrip(b"GET / HTTP/1.0\r\n\r\nGET / HTTP/1.0\r\n\r\n", 100);
        assert_eq!(reqs.len(), 1);
    }

    proptest::proptest! {
        /// Whatever bytes a client sends, the server answers only well-formed 204s (for the
        /// requests it could parse) and at most one 400, then stops; it never panics or hangs.
        #[test]
        fn arbitrary_bytes_never_panic(raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
                                       prefix in proptest::prelude::any::<bool>()) {
            let mut bytes = if prefix { b"PUT /x HTTP/1.1\r\nContent-Length: 5\r\n\r\n".to_vec() } else { Vec::new() };
            bytes.extend_from_slice(&raw);
            let (_, out) = roundtrip(&bytes, 100);
            proptest::prop_assert!(out.matches("HTTP/1.1 400").count() <= 1);
            for resp in out.split("HTTP/1.1 ").skip(1) {
                proptest::prop_assert!(resp.starts_with("204") || resp.starts_with("400"), "{}", resp);
            }
        }
    }

    #[test]
    fn expect_continue_is_answered_before_the_body() {
        let (reqs, out) = roundtrip(
            b"PUT /b HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n{}",
            100,
        );
        assert_eq!(reqs.len(), 1);
        assert!(
            out.starts_with("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204"),
            "{out}"
        );
        // Too large: refused without inviting the body.
        let (_, out) = roundtrip(
            b"PUT /b HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 200\r\n\r\n",
            100,
        );
        assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    }

    #[test]
    fn a_trickling_request_is_cut_off_at_its_deadline() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || {
            serve_connection(b, 100, &|_: &Request| Response::no_content());
        });
        let t0 = Instant::now();
        let mut closed = false;
        for byte in b"GET / HTTP/1.1\r\nX-Slow: "
            .iter()
            .chain([b'a'; 64].iter())
        {
            // One byte every 200 ms: each read succeeds well within any per-read timeout.
            if a.write_all(&[*byte]).is_err() {
                closed = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
            if server.is_finished() {
                closed = true;
                break;
            }
        }
        assert!(closed, "still open after {:?}", t0.elapsed());
        let took = t0.elapsed();
        assert!(
            took >= REQUEST_TIMEOUT && took < REQUEST_TIMEOUT + Duration::from_secs(4),
            "{took:?}"
        );
        server.join().unwrap();
    }

    #[test]
    fn a_truncated_body_is_dropped() {
        let (reqs, out) = roundtrip(b"PUT /b HTTP/1.1\r\nContent-Length: 10\r\n\r\n{}", 100);
        assert!(reqs.is_empty());
        assert!(out.is_empty(), "{out}");
    }
}
