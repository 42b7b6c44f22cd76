//! What the HTTP proxy changes in the messages it passes on, apart from how it moves them:
//! the headers about one hop's connection, upgrades the proxy must see or refuse, the form
//! an endpoint's protocol wants, and the mesh's own error header, which only the mesh sets.
//! Pure functions of parsed messages: the fuzz target `http_message` drives them with what a
//! client or an endpoint may send.

use hyper::{
    header::{self, HeaderName, HeaderValue},
    http::request::Parts,
    HeaderMap, Request, Version,
};

use super::MESH_ERROR;

/// Headers that describe one hop's connection, not the message: a proxy does not pass them on
/// (an endpoint's `Connection: close` would otherwise close the client's connection). gRPC's
/// `te: trailers` is the one `te` HTTP/2 allows, and stays.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // On the raw bytes: a name listed beside a value that is not visible ASCII is still named.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .filter_map(|n| HeaderName::from_bytes(n.trim_ascii()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::TRANSFER_ENCODING,
        header::TRAILER,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
    // Every `te` field, not only the first.
    if headers
        .get_all(header::TE)
        .iter()
        .any(|v| !v.as_bytes().eq_ignore_ascii_case(b"trailers"))
    {
        headers.remove(header::TE);
    }
}

/// `Upgrade: h2c` would turn the connection into HTTP/2 that this proxy no longer sees (a
/// known way around a proxy's per-request rules): the request goes as a plain one.
pub fn refuse_h2c_upgrade<B>(req: &mut Request<B>) {
    // On the raw bytes: a value that is not visible ASCII must not hide the token.
    let h2c = req.headers().get_all(header::UPGRADE).iter().any(|v| {
        v.as_bytes()
            .windows(3)
            .any(|w| w.eq_ignore_ascii_case(b"h2c"))
    });
    if h2c {
        let headers = req.headers_mut();
        headers.remove(header::UPGRADE);
        headers.remove("http2-settings");
    }
}

/// Whether the request asks to switch protocols (WebSocket) or to tunnel (`CONNECT`): its
/// connection becomes a byte stream once the endpoint agrees.
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    let asked = req.headers().get_all(header::CONNECTION).iter().any(|v| {
        v.as_bytes()
            .split(|b| *b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"upgrade"))
    });
    req.method() == hyper::Method::CONNECT || (asked && req.headers().contains_key(header::UPGRADE))
}

/// A request the proxy will not pass on as it is, and why.
#[derive(Debug, thiserror::Error)]
pub enum Unfit {
    /// An HTTP/2 `:path` that is not a path (`?a=1`, `evil.com`, `http://other/`): as an
    /// HTTP/1.1 target it would name another resource or another host.
    #[error("the request's path {0:?} does not start with '/'")]
    Path(String),
}

/// A request as the endpoint's protocol wants it: without the client's hop-by-hop headers
/// (but an upgrade's, which the endpoint must see), and for an HTTP/1.1 endpoint
/// (`h2_upstream` false) with a Host header, one Cookie header, and an origin-form target.
pub fn to_upstream(parts: &mut Parts, upgrade: bool, h2_upstream: bool) -> Result<(), Unfit> {
    if !upgrade {
        strip_hop_by_hop(&mut parts.headers);
    }
    if h2_upstream {
        return Ok(());
    }
    // An HTTP/2 client's authority is the HTTP/1.1 Host header.
    if !parts.headers.contains_key(header::HOST) {
        if let Some(host) = parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            parts.headers.insert(header::HOST, host);
        }
    }
    if parts.version == Version::HTTP_2 {
        parts.version = Version::HTTP_11;
        // HTTP/2 may split cookies over several fields; HTTP/1.1 servers read one.
        let cookies: Vec<&[u8]> = parts
            .headers
            .get_all(header::COOKIE)
            .iter()
            .map(HeaderValue::as_bytes)
            .collect();
        if cookies.len() > 1 {
            if let Ok(joined) = HeaderValue::from_bytes(&cookies.join(&b"; "[..])) {
                parts.headers.insert(header::COOKIE, joined);
            }
        }
        let target = parts.uri.path_and_query().cloned();
        let path = target.as_ref().map_or("/", |p| p.as_str());
        let fits = path.starts_with('/') || (path == "*" && parts.method == hyper::Method::OPTIONS);
        if !fits {
            return Err(Unfit::Path(path.chars().take(64).collect()));
        }
        if parts.method != hyper::Method::CONNECT {
            // A clone of `Bytes`, not of the text.
            let mut uri = hyper::Uri::builder();
            if let Some(target) = &target {
                uri = uri.path_and_query(target.clone());
            }
            parts.uri = uri
                .build()
                .map_err(|_| Unfit::Path(path.chars().take(64).collect()))?;
        }
    }
    Ok(())
}

/// An endpoint's answer's headers as the client gets them: without those about the
/// endpoint's connection, and without the mesh's own error header, which only the mesh may
/// set.
pub fn from_endpoint(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
    headers.remove(MESH_ERROR);
}

/// The parts of a request, for another try (`Parts` is not `Clone`: its extensions are
/// dropped, which hyper's client does not use).
pub fn clone_parts(parts: &Parts) -> Parts {
    let mut request = Request::new(());
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = parts.uri.clone();
    *request.version_mut() = parts.version;
    *request.headers_mut() = parts.headers.clone();
    request.into_parts().0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(headers: &[(&str, &[u8])]) -> Request<()> {
        let mut req = Request::get("http://pay.shop/x?y").body(()).unwrap();
        for (name, value) in headers {
            req.headers_mut().append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_bytes(value).unwrap(),
            );
        }
        req
    }

    #[test]
    fn hop_by_hop_headers_go_even_when_named_beside_non_ascii() {
        let req = request(&[
            ("connection", b"x-secret\xff, keep-alive, x-hop"),
            ("x-hop", b"1"),
            ("keep-alive", b"timeout=5"),
            ("te", b"gzip"),
            ("x-app", b"stays"),
        ]);
        let (mut parts, ()) = req.into_parts();
        to_upstream(&mut parts, false, false).unwrap();
        let names: Vec<&str> = parts.headers.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["x-app", "host"]);
        assert_eq!(parts.headers[header::HOST], "pay.shop");
    }

    #[test]
    fn upgrades_need_to_be_asked_for_and_h2c_is_refused_in_any_case() {
        assert!(!is_upgrade(&request(&[("upgrade", b"websocket")])));
        assert!(is_upgrade(&request(&[
            ("connection", b"keep-alive, Upgrade"),
            ("upgrade", b"websocket"),
        ])));
        let mut h2c = request(&[
            ("connection", b"upgrade, http2-settings"),
            ("upgrade", b"H2C\xff"),
            ("http2-settings", b"AAMAAABkAAQAAP__"),
        ]);
        refuse_h2c_upgrade(&mut h2c);
        assert!(!is_upgrade(&h2c));
        assert!(!h2c.headers().contains_key("http2-settings"));
    }

    /// The `http` crate refuses a path without '/' (`?a=1`, `evil.com`) in any URI, so the
    /// one left to refuse is `*` beside any method but OPTIONS.
    #[test]
    fn an_http2_request_becomes_http1_or_is_refused() {
        for (method, path, fits) in [
            (hyper::Method::GET, "/x?y=1", true),
            (hyper::Method::OPTIONS, "*", true),
            (hyper::Method::GET, "*", false),
        ] {
            let mut req = Request::builder()
                .method(method)
                .uri(path)
                .version(Version::HTTP_2)
                .body(())
                .unwrap();
            let h = req.headers_mut();
            h.insert(header::HOST, HeaderValue::from_static("pay.shop"));
            h.append(header::COOKIE, HeaderValue::from_static("a=1"));
            h.append(header::COOKIE, HeaderValue::from_static("b=2"));
            h.append(header::TE, HeaderValue::from_static("trailers"));
            h.append(header::TE, HeaderValue::from_static("gzip"));
            let (mut parts, ()) = req.into_parts();
            let done = to_upstream(&mut parts, false, false);
            assert_eq!(done.is_ok(), fits, "{path}: {done:?}");
            if fits {
                assert_eq!(parts.uri, path);
                assert_eq!(parts.version, Version::HTTP_11);
                assert_eq!(parts.headers[header::COOKIE], "a=1; b=2");
                assert!(
                    !parts.headers.contains_key(header::TE),
                    "every te looked at"
                );
            }
        }
    }

    #[test]
    fn an_endpoint_cannot_speak_for_the_mesh() {
        let mut headers = HeaderMap::new();
        headers.insert(MESH_ERROR, HeaderValue::from_static("forged"));
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        headers.insert("x-app", HeaderValue::from_static("stays"));
        from_endpoint(&mut headers);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key("x-app"));
    }
}
