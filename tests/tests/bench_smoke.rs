//! `cargo xtask bench --quick`'s harness, run on the debug build so that it cannot rot. It
//! checks that every setup and metric produced samples and a report; it asserts no time.

use mesh_tests::{
    bench::{self, Options, SETUPS},
    topology::TEST_PREFIX,
};

#[test]
fn the_benchmark_harness_measures_every_setup_and_writes_a_report() {
    let out =
        std::env::temp_dir().join(format!("{TEST_PREFIX}bench-report-{}", std::process::id()));
    let report = bench::run(&Options::quick(TEST_PREFIX, out.clone()));
    let written = std::fs::read_to_string(out.join("latest.json"));
    let chart = std::fs::read_to_string(out.join("latest.svg"));
    let _ = std::fs::remove_dir_all(&out);
    let report = report.expect("the quick benchmark runs");
    for metric in [
        "bulk-1.bytes_per_second",
        "bulk-4.bytes_per_second",
        "rpc.p50_us",
        "rpc.p99_us",
        "rpc.p999_us",
        "connrate.per_second",
        "bulk-1.machine_cpu_s_per_gb",
        "connrate.machine_cpu_us_per_conn",
    ] {
        // A quick run leaves bulk through the socket map out (`Options::sockmap_bulk`).
        let bulk = metric.starts_with("bulk");
        for setup in SETUPS
            .iter()
            .filter(|s| !(bulk && s.name.ends_with("-sockmap")))
        {
            let samples = &report.samples[metric][setup.name];
            assert!(
                !samples.is_empty() && samples.iter().all(|v| *v > 0.0),
                "{metric} {}: {samples:?}",
                setup.name
            );
        }
    }
    // The HTTP figures run their own setups: direct, the port relayed as bytes, the port
    // served request by request.
    for metric in [
        "http-1.1.p50_us",
        "http-1.1.p99_us",
        "http-1.1.per_second",
        "http-h2.per_second",
        "http-h2.p50_us",
    ] {
        for setup in [
            "direct",
            "mycel-l4",
            "mycel-http",
            "mycel-l4-sockmap",
            "mycel-http-sockmap",
        ] {
            let samples = &report.samples[metric][setup];
            assert!(
                !samples.is_empty() && samples.iter().all(|v| *v > 0.0),
                "{metric} {setup}: {samples:?}"
            );
        }
    }
    let written: serde_json::Value = serde_json::from_str(&written.expect("latest.json")).unwrap();
    let ratios = written["ratios"].as_array().expect("ratios");
    assert_eq!(ratios.len(), 17);
    // The bound from kernel work is given for the throughput and CPU targets.
    let bounded = ratios
        .iter()
        .filter(|r| r["kernel_work_bound"].as_f64().is_some_and(|b| b > 0.0))
        .count();
    // And for new connections through the socket map (its bulk figures are left out here).
    assert_eq!(bounded, 5, "{ratios:?}");
    // Idle memory is measured on both transports.
    for setup in ["mycel-tls", "mycel-quic"] {
        assert!(
            report.samples["idle-1000.rss_mb"].contains_key(setup),
            "no idle memory for {setup}"
        );
    }
    for key in [
        "crypto-floor.cpu_s_per_gb",
        "idle-1000.rss_mb",
        "policy-change.seconds",
        "bulk-1.cpu_s_per_gb",
        "bulk-1.daemon_sys_s_per_gb",
        "connrate.daemon_sys_us_per_conn",
        "connrate.connect_setup_us",
    ] {
        assert!(report.samples.contains_key(key), "no {key}");
    }
    let chart = chart.expect("latest.svg");
    assert!(
        chart.starts_with("<svg") && chart.contains("CPU-s per GB"),
        "{chart}"
    );
    println!("{}", report.table);
}
