//! A small blocking HTTP/1.1 client for the service's JSON API: one kept-alive
//! connection, `Content-Length` or chunked bodies. Enough for the benchmark to create
//! operations and read them back without pulling an HTTP stack into the xtask.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// One connection to `host:port`, reopened when the server closes it.
#[derive(Debug)]
pub(crate) struct Http {
    address: String,
    connection: Option<BufReader<TcpStream>>,
}

impl Http {
    /// A client of the service listening at `base` (`http://host:port`).
    pub(crate) fn new(base: &str) -> Result<Self> {
        let address =
            base.strip_prefix("http://").context("the service's address is not http://")?;
        Ok(Self { address: address.trim_end_matches('/').to_owned(), connection: None })
    }

    /// `GET path`: the status and the JSON body (`Value::Null` when it is not JSON).
    pub(crate) fn get(&mut self, path: &str) -> Result<(u16, Value)> {
        self.request("GET", path, None)
    }

    /// `POST path` with a JSON body.
    pub(crate) fn post(&mut self, path: &str, body: &Value) -> Result<(u16, Value)> {
        self.request("POST", path, Some(body))
    }

    fn request(&mut self, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, Value)> {
        // A kept-alive connection the server closed fails on the first use: retry once on
        // a fresh one.
        match self.exchange(method, path, body) {
            Ok(answer) => Ok(answer),
            Err(_) if self.connection.take().is_some() => self.exchange(method, path, body),
            Err(error) => Err(error),
        }
        .with_context(|| format!("{method} {path}"))
    }

    fn exchange(&mut self, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, Value)> {
        if self.connection.is_none() {
            let stream = TcpStream::connect(&self.address)
                .with_context(|| format!("connecting to {}", self.address))?;
            stream.set_nodelay(true)?;
            stream.set_read_timeout(Some(Duration::from_secs(60)))?;
            self.connection = Some(BufReader::new(stream));
        }
        let reader = self.connection.as_mut().context("no connection")?;
        let body = body.map(Value::to_string).unwrap_or_default();
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAccept: application/json\r\n",
            self.address
        );
        if method != "GET" {
            head.push_str("Content-Type: application/json\r\n");
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        let stream = reader.get_mut();
        stream.write_all(head.as_bytes())?;
        stream.write_all(body.as_bytes())?;
        stream.flush()?;

        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            bail!("the server closed the connection");
        }
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("bad status line {line:?}"))?;
        let (mut length, mut chunked, mut close) = (None, false, false);
        loop {
            line.clear();
            reader.read_line(&mut line)?;
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            let Some((name, value)) = header.split_once(':') else { continue };
            let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
            match name.as_str() {
                "content-length" => length = value.parse::<usize>().ok(),
                "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
                "connection" => close = value.eq_ignore_ascii_case("close"),
                _ => {}
            }
        }
        let bytes = if chunked {
            read_chunked(reader)?
        } else if let Some(length) = length {
            let mut bytes = vec![0; length];
            reader.read_exact(&mut bytes)?;
            bytes
        } else {
            close = true;
            let mut bytes = Vec::new();
            reader.read_to_end(&mut bytes)?;
            bytes
        };
        if close {
            self.connection = None;
        }
        Ok((status, serde_json::from_slice(&bytes).unwrap_or(Value::Null)))
    }
}

fn read_chunked(reader: &mut BufReader<TcpStream>) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
            .with_context(|| format!("bad chunk size {line:?}"))?;
        let start = bytes.len();
        bytes.resize(start + size, 0);
        reader.read_exact(&mut bytes[start..])?;
        line.clear();
        reader.read_line(&mut line)?;
        if size == 0 {
            return Ok(bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;

    use serde_json::json;

    use super::Http;

    /// A server that answers each of `answers` on connections it accepts in turn, one
    /// request per answer, closing the connection after an answer that says so; returns
    /// its base URL and the requests it read (head and body).
    fn serve(answers: Vec<&'static str>) -> (String, std::thread::JoinHandle<Vec<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("address"));
        let server = std::thread::spawn(move || {
            let mut requests = Vec::new();
            let mut answers = answers.into_iter().peekable();
            while answers.peek().is_some() {
                let (stream, _) = listener.accept().expect("accept");
                let mut reader = BufReader::new(stream);
                for answer in answers.by_ref() {
                    let mut request = String::new();
                    let mut length = 0;
                    loop {
                        let mut line = String::new();
                        reader.read_line(&mut line).expect("request line");
                        if let Some(value) =
                            line.to_ascii_lowercase().strip_prefix("content-length:")
                        {
                            length = value.trim().parse().expect("length");
                        }
                        request.push_str(&line);
                        if line == "\r\n" {
                            break;
                        }
                    }
                    let mut body = vec![0; length];
                    reader.read_exact(&mut body).expect("body");
                    request.push_str(&String::from_utf8_lossy(&body));
                    requests.push(request);
                    reader.get_mut().write_all(answer.as_bytes()).expect("answer");
                    if answer.contains("Connection: close") {
                        break;
                    }
                }
            }
            requests
        });
        (base, server)
    }

    #[test]
    fn reads_sized_and_chunked_bodies_on_one_kept_alive_connection() {
        let (base, server) = serve(vec![
            "HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\nContent-Length: 8\r\n\r\n{\"a\":1}\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{\"b\"\r\n3\r\n:2}\r\n0\r\n\r\n",
        ]);
        let mut http = Http::new(&base).expect("client");
        let (status, body) = http.post("/api/resources", &json!({"x": "y"})).expect("post");
        assert_eq!((status, body), (202, json!({"a": 1})));
        let (status, body) = http.get("/api/workers").expect("get");
        assert_eq!((status, body), (200, json!({"b": 2})));
        let requests = server.join().expect("server");
        assert!(requests[0].starts_with("POST /api/resources HTTP/1.1\r\n"), "{requests:?}");
        assert!(requests[0].ends_with("\r\n\r\n{\"x\":\"y\"}"), "{requests:?}");
        assert!(requests[1].starts_with("GET /api/workers HTTP/1.1\r\n"), "{requests:?}");
    }

    #[test]
    fn opens_a_new_connection_after_the_server_closed_one() {
        let (base, server) = serve(vec![
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n[]",
            "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 9\r\n\r\nnot json!",
        ]);
        let mut http = Http::new(&base).expect("client");
        assert_eq!(http.get("/readyz").expect("first"), (200, json!([])));
        assert_eq!(http.get("/readyz").expect("second"), (503, serde_json::Value::Null));
        assert_eq!(server.join().expect("server").len(), 2);
    }

    #[test]
    fn refuses_an_address_that_is_not_http() {
        assert!(Http::new("https://127.0.0.1:1").is_err());
    }
}
