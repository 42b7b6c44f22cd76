//! mesh-cp's dashboard (`/ui`) in a real browser: Debian's Chromium, headless, in a network
//! namespace with only a loopback and a relay to mesh-cp's status port. After known traffic
//! (order calls payment) and a deny (analytics -> payment, refused in n1's kernel), the
//! rendered page draws order -> payment as traffic and analytics -> payment as denied, lists
//! both nodes as current, and answers the explain form; the screenshot shows both edges in
//! their colours.

use std::time::{Duration, Instant};

use mesh_tests::{
    app,
    browser::{tags, Browser},
    demo::{Demo, PORT},
    mesh::http_get,
    relay::Relay,
};

const T: Duration = Duration::from_secs(30);
/// The colours the page draws traffic (under 1 % failing) and denied pairs in.
const OK_RGB: [u8; 3] = [0x2e, 0x7d, 0x32];
const DENIED_RGB: [u8; 3] = [0xd8, 0x1b, 0x60];

#[test]
fn the_dashboard_draws_traffic_and_denies_and_explains_in_a_real_browser() {
    // Borrowed, not moved out: the mesh is dropped in its fields' order (daemons first).
    let mut demo = Demo::start("ui");
    let Demo { cp, topo, .. } = &mut demo;

    let ip = topo.pod("payment").ipv4.to_string();
    let out = app::run(topo.pod("order"), &["loop", &ip, &PORT.to_string(), "5"], T);
    assert_eq!(out["failures"], 0, "{out}");
    let probe = app::run(topo.pod("analytics"), &["probe", &ip, &PORT.to_string()], T);
    assert_eq!(probe["outcome"], "eperm", "refused in n1's kernel: {probe}");

    // mesh-cp's own reading, from the nodes' /metrics (the port each named on its stream).
    let deadline = Instant::now() + T;
    let graph = loop {
        let g: serde_json::Value =
            serde_json::from_str(&http_get(cp.http, "/ui/graph").expect("/ui/graph"))
                .expect("JSON");
        let traffic = g["edges"].as_array().into_iter().flatten().any(|e| {
            e["source"] == "default/order"
                && e["destination"] == "default/payment"
                && e["connections_total"] == 5.0
        });
        if traffic {
            break g;
        }
        assert!(Instant::now() < deadline, "{g}");
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(graph["traffic"]["from"], "nodes", "{graph}");
    assert_eq!(graph["traffic"]["errors"], serde_json::json!([]), "{graph}");
    assert_eq!(
        graph["denied"],
        serde_json::json!([{ "source": "default/analytics", "destination": "default/payment", "ports": ["all"] }]),
        "{graph}"
    );

    // A page elsewhere that rebinds its name to mesh-cp's address gets nothing.
    let rebound = raw(
        cp.http,
        "GET /status HTTP/1.1\r\nhost: attacker.example:15014\r\nconnection: close\r\n\r\n",
    );
    assert!(rebound.starts_with("HTTP/1.1 421"), "{rebound}");
    assert!(!rebound.contains("trust_domain"), "{rebound}");
    // Nor does another site's page that names it by its address.
    let cross = raw(
        cp.http,
        &format!("GET /ui/graph HTTP/1.1\r\nhost: {}\r\nsec-fetch-site: cross-site\r\nconnection: close\r\n\r\n", cp.http),
    );
    assert!(cross.starts_with("HTTP/1.1 403"), "{cross}");

    let browser = Browser::new(topo).expect("browser");
    let relay = Relay::start_in(&browser.netns, cp.http).expect("relay into the browser's netns");
    let url = format!(
        "http://{}/ui#workload=default/payment&explain=default/analytics|default/payment|{PORT}",
        relay.addr
    );
    let dom = browser
        .dump_dom(&url, Duration::from_secs(8))
        .expect("the page");
    let lines = tags(&dom, "line");
    let edge = |class: &str, from: &str, to: &str| {
        lines.iter().any(|a| {
            a.contains(&format!("class=\"edge {class}\""))
                && a.contains(&format!("data-source=\"{from}\""))
                && a.contains(&format!("data-destination=\"{to}\""))
        })
    };
    assert!(
        edge("ok", "default/order", "default/payment"),
        "no traffic edge order -> payment in\n{dom}"
    );
    assert!(
        edge("denied", "default/analytics", "default/payment"),
        "no denied edge analytics -> payment in\n{dom}"
    );
    assert!(
        !edge("ok", "default/analytics", "default/payment"),
        "analytics -> payment drawn as traffic:\n{dom}"
    );
    let answer = tags(&dom, "pre")
        .into_iter()
        .find(|a| a.contains("id=\"explain-answer\""))
        .unwrap_or_default();
    assert!(answer.contains("data-verdict=\"deny\""), "{answer}\n{dom}");
    assert!(
        dom.contains("DENY default/analytics -&gt; default/payment port 8080")
            && dom.contains("policy: default/block-analytics  rule: 0"),
        "{dom}"
    );
    for node in ["n1", "n2"] {
        assert!(
            dom.contains(&format!("<td>{node}</td>")),
            "{node} in\n{dom}"
        );
    }
    assert_eq!(
        dom.matches("current, acked").count(),
        2,
        "both nodes current:\n{dom}"
    );
    // The application page of payment: order's traffic to it, and analytics' deny.
    let app_rows = dom
        .split("id=\"workload-pairs\"")
        .nth(1)
        .unwrap_or_default();
    assert!(
        app_rows.contains("<td>from</td><td>default/order</td>")
            && app_rows.contains("<td>from</td><td>default/analytics</td>"),
        "{dom}"
    );
    println!(
        "the browser saw: {} edges ({} of them denied), the explain answer {:?}",
        lines.iter().filter(|a| a.contains("class=\"edge")).count(),
        lines
            .iter()
            .filter(|a| a.contains("class=\"edge denied\""))
            .count(),
        answer
    );

    // The picture: both edges in their colours.
    let shot = browser
        .screenshot(&url, Duration::from_secs(8), (1400, 1000))
        .expect("a screenshot");
    let (ok, denied) = count_colours(&shot);
    println!(
        "screenshot {}: {ok} pixels of the traffic colour, {denied} of the denied colour",
        shot.display()
    );
    if let Some(keep) = std::env::var_os("MYCEL_DASHBOARD_PNG") {
        std::fs::copy(&shot, keep).expect("keep the screenshot");
    }
    // Only the edges, their arrowheads and the legend's swatches (54 pixels each at most)
    // are drawn in these colours.
    assert!(
        ok > 200,
        "the traffic edge is not in the picture ({ok} pixels)"
    );
    assert!(
        denied > 200,
        "the denied edge is not in the picture ({denied} pixels)"
    );
    drop(relay);
}

/// What `addr` answers `request`, sent as written.
fn raw(addr: std::net::SocketAddr, request: &str) -> String {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.write_all(request.as_bytes()).expect("send");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("answer");
    answer
}

/// Pixels within a small distance of each edge colour in the PNG at `path`.
fn count_colours(path: &std::path::Path) -> (usize, usize) {
    let file = std::fs::File::open(path).expect("the screenshot");
    let mut decoder = png::Decoder::new(std::io::BufReader::new(file));
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = decoder.read_info().expect("a PNG");
    let mut buf = vec![0; reader.output_buffer_size().expect("a size")];
    let info = reader.next_frame(&mut buf).expect("a frame");
    let channels = info.color_type.samples();
    let near = |px: &[u8], c: [u8; 3]| px.iter().zip(c).all(|(a, b)| a.abs_diff(b) <= 24);
    let (mut ok, mut denied) = (0, 0);
    for px in buf[..info.buffer_size()].chunks(channels) {
        if channels < 3 {
            continue;
        }
        if near(&px[..3], OK_RGB) {
            ok += 1;
        }
        if near(&px[..3], DENIED_RGB) {
            denied += 1;
        }
    }
    (ok, denied)
}
