//! The HTTP filter seam, in process: a filter built by a registered factory answers requests
//! itself, mutates them, reads its per-route config, re-routes (clear route cache) and sees the
//! response on the way back.

use crate::common::*;
use mecha_filters::{
    BoxFuture, ClearRouteCache, FactoryContext, HttpFilter, HttpFilterFactory, Next, Registry,
    RequestInfo,
};
use std::any::Any;
use std::sync::Arc;

struct Tag(String);

struct TestFilter;

impl HttpFilter for TestFilter {
    fn call<'a>(
        &'a self,
        mut req: http::Request<mecha_filters::Body>,
        next: Next<'a>,
    ) -> BoxFuture<'a, http::Response<mecha_filters::Body>> {
        Box::pin(async move {
            if req.headers().contains_key("x-answer") {
                let mut r = mecha_filters::local_reply(
                    http::StatusCode::from_u16(299).unwrap(),
                    "answered by filter",
                );
                r.headers_mut().insert("x-by", "filter".parse().unwrap());
                return r;
            }
            let tag = req
                .extensions()
                .get::<RequestInfo>()
                .and_then(|i| i.per_filter.get::<Tag>("test.rewrite").map(|t| t.0.clone()))
                .unwrap_or_else(|| "none".into());
            req.headers_mut()
                .insert("x-filter-tag", tag.parse().unwrap());
            if req.headers().contains_key("x-reroute") {
                *req.uri_mut() = "/rerouted".parse().unwrap();
                req.extensions_mut().insert(ClearRouteCache);
            }
            let mut resp = next.run(req).await;
            let status = resp.status().as_u16().to_string();
            resp.headers_mut()
                .insert("x-filter-saw-status", status.parse().unwrap());
            resp
        })
    }
}

struct TestFactory;

impl HttpFilterFactory for TestFactory {
    fn type_names(&self) -> &[&'static str] {
        &["test.Rewrite"]
    }
    fn create(
        &self,
        _c: Option<&mecha_config::TypedConfig>,
        _p: &str,
        _ctx: &FactoryContext,
    ) -> Result<Arc<dyn HttpFilter>, mecha_config::ConfigError> {
        Ok(Arc::new(TestFilter))
    }
    fn per_route(
        &self,
        c: &mecha_config::TypedConfig,
        path: &str,
    ) -> Result<Arc<dyn Any + Send + Sync>, mecha_config::ConfigError> {
        match c.value.get("tag").and_then(|v| v.as_str()) {
            Some(t) => Ok(Arc::new(Tag(t.to_string()))),
            None => Err(mecha_config::ConfigError::new(
                format!("{path}.tag"),
                "required",
            )),
        }
    }
}

fn bootstrap(a: std::net::SocketAddr, b: std::net::SocketAddr, tag_field: &str) -> String {
    format!(
        r#"
static_resources:
  listeners:
  - name: ingress
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress_http
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/rerouted" }}
                route: {{ cluster: b }}
              - match: {{ prefix: "/" }}
                route: {{ cluster: a }}
                typed_per_filter_config:
                  test.rewrite: {{ "@type": type.googleapis.com/test.Rewrite, {tag_field}: route-a }}
          http_filters:
          - name: test.rewrite
            typed_config: {{ "@type": type.googleapis.com/test.Rewrite }}
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
  clusters:
{}{}"#,
        static_cluster("a", &[a], "ROUND_ROBIN", ""),
        static_cluster("b", &[b], "ROUND_ROBIN", "")
    )
}

fn registry() -> Registry {
    let mut r = Registry::new();
    r.register_http(Arc::new(TestFactory));
    r
}

#[tokio::test]
async fn filter_answers_mutates_reroutes_and_sees_responses() {
    let (a, b) = (Upstream::echo("a").await, Upstream::echo("b").await);
    let boot = mecha_config::parse_bootstrap(&bootstrap(a.addr, b.addr, "tag")).unwrap();
    let server = mecha_proxy::Server::start(boot, registry(), Default::default())
        .await
        .unwrap();
    let base = format!("http://{}", server.listener_addr("ingress").unwrap());

    let r = get_with(&format!("{base}/x"), &[("x-answer", "1")]).await;
    assert_eq!(
        (r.status, r.text().as_str(), r.header("x-by")),
        (299, "answered by filter", Some("filter"))
    );
    assert_eq!(
        a.hits() + b.hits(),
        0,
        "an answered request never reaches an upstream"
    );

    let r = get(&format!("{base}/x")).await.unwrap();
    assert_eq!(r.header("x-upstream-name"), Some("a"));
    assert_eq!(
        r.json()["headers"]["x-filter-tag"][0],
        "route-a",
        "per-route config reached the filter"
    );
    assert_eq!(r.header("x-filter-saw-status"), Some("200"));

    let r = get_with(&format!("{base}/x"), &[("x-reroute", "1")]).await;
    assert_eq!(
        r.header("x-upstream-name"),
        Some("b"),
        "cleared route cache re-selects the route"
    );
    assert_eq!(r.json()["path"], "/rerouted");

    let r = get(&format!("{base}/rerouted")).await.unwrap();
    assert_eq!(r.json()["headers"]["x-filter-tag"][0], "none");
}

#[tokio::test]
async fn bad_per_route_config_is_a_build_error_with_its_path() {
    let boot = mecha_config::parse_bootstrap(&bootstrap(
        "127.0.0.1:1".parse().unwrap(),
        "127.0.0.1:2".parse().unwrap(),
        "tagg",
    ))
    .unwrap();
    let ctx = mecha_proxy::BuildContext::new(registry());
    let err = match mecha_proxy::build(&boot, &ctx) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains(
            "virtual_hosts[0].routes[1].typed_per_filter_config[\"test.rewrite\"].tag: required"
        ),
        "{err}"
    );
}
