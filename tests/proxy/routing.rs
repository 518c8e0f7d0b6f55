use crate::common::*;

fn vhost_routes(routes: &str) -> String {
    format!(
        "            name: local\n            virtual_hosts:\n            - name: all\n              domains: [\"*\"]\n              routes:\n{routes}"
    )
}

#[tokio::test]
async fn prefix_route_reaches_upstream_and_stats_move() {
    let up = Upstream::echo("a").await;
    let (admin, port) = (free_port(), free_port());
    let cfg = http_bootstrap(
        admin,
        port,
        "",
        &vhost_routes(
            "              - match: { prefix: \"/\" }\n                route: { cluster: a }\n",
        ),
        &static_cluster("a", &[up.addr], "ROUND_ROBIN", ""),
    );
    let m = Mecha::start(&cfg, admin).await;
    let r = get(&format!("http://127.0.0.1:{port}/hello?x=1"))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-upstream-name"), Some("a"));
    let j = r.json();
    assert_eq!(j["uri"], "/hello?x=1");
    assert!(j["headers"]["x-request-id"][0].as_str().unwrap().len() == 36);
    assert_eq!(m.stat("cluster.a.upstream_rq_total").await, Some(1));
    assert_eq!(m.stat("cluster.a.upstream_rq_2xx").await, Some(1));
    assert_eq!(m.stat("http.ingress_http.downstream_rq_2xx").await, Some(1));
}
