//! The router: the terminal HTTP filter. It applies the selected route's action — direct
//! response, redirect, or forwarding to a cluster with rewrites, header mutations, load
//! balancing and the route timeout — and maps upstream failures to Envoy's local replies.

use super::hcm::authority;
use super::headers::{number_header, strip_hop_by_hop};
use super::retry;
use super::upgrade::spawn_tunnel;
use crate::cluster::ClusterManager;
use crate::route::headers::Vars;
use crate::route::{Action, HostRewrite, RouteEntry, RouteTable};
use crate::stats::HttpStats;
use arc_swap::ArcSwap;
use http::header::{HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use mecha_filters::{
    empty, full, Body, BoxFuture, ClearRouteCache, HandBackIfNoRoute, HttpService, NoRoute,
    RequestInfo, Unrouted,
};
use std::sync::Arc;

static EXPECTED_TIMEOUT: HeaderName = HeaderName::from_static("x-envoy-expected-rq-timeout-ms");
static UPSTREAM_SERVICE_TIME: HeaderName = HeaderName::from_static("x-envoy-upstream-service-time");

/// The route the connection manager chose for `req` (carried in its [`RequestInfo`]).
pub(crate) fn selected_route(req: &Request<Body>) -> Option<&RouteEntry> {
    req.extensions()
        .get::<RequestInfo>()?
        .route
        .0
        .as_ref()?
        .downcast_ref::<RouteEntry>()
}

pub struct Router {
    /// The connection manager's route table (for re-selection after `ClearRouteCache`).
    pub routes: Arc<ArcSwap<RouteTable>>,
    pub clusters: Arc<ArcSwap<ClusterManager>>,
    pub stats: HttpStats,
    /// `envoy.extensions.filters.http.router.v3.Router.suppress_envoy_headers`.
    pub suppress_envoy_headers: bool,
}

impl HttpService for Router {
    fn call<'a>(&'a self, req: Request<Body>) -> BoxFuture<'a, Response<Body>> {
        mecha_filters::boxed_in_place(|| self.route(req))
    }

    fn would_route(
        &self,
        method: &http::Method,
        host: &str,
        path_and_query: &str,
        headers: &http::HeaderMap,
    ) -> Option<bool> {
        Some(
            self.routes
                .load()
                .route(method, host, path_and_query, headers)
                .is_some(),
        )
    }
}

impl Router {
    async fn route(&self, mut req: Request<Body>) -> Response<Body> {
        self.stats.rq_total.inc();
        let selected = if req.extensions_mut().remove::<ClearRouteCache>().is_some() {
            let table = self.routes.load();
            let path = req
                .uri()
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/");
            table
                .route(req.method(), authority(&req), path, req.headers())
                .cloned()
        } else {
            req.extensions()
                .get::<RequestInfo>()
                .and_then(|i| i.route.0.clone())
                .and_then(|r| r.downcast::<RouteEntry>().ok())
        };
        let route = match selected {
            Some(r) => r,
            _ => {
                if req.extensions_mut().remove::<HandBackIfNoRoute>().is_some() {
                    let mut resp = Response::new(empty());
                    *resp.status_mut() = StatusCode::NOT_FOUND;
                    resp.extensions_mut().insert(NoRoute);
                    resp.extensions_mut().insert(Unrouted::new(req));
                    return resp;
                }
                self.stats.no_route.inc();
                let grpc = super::headers::request_is_grpc(&req);
                let mut resp = retry::local_reply_for(StatusCode::NOT_FOUND, "", grpc);
                resp.extensions_mut().insert(NoRoute);
                return resp;
            }
        };
        let (remote, local) = req
            .extensions()
            .get::<RequestInfo>()
            .map(|i| (i.downstream_remote, i.downstream_local))
            .unwrap_or((([0, 0, 0, 0], 0).into(), ([0, 0, 0, 0], 0).into()));
        let protocol = match req.version() {
            http::Version::HTTP_2 => "HTTP/2",
            http::Version::HTTP_10 => "HTTP/1.0",
            _ => "HTTP/1.1",
        };
        let mut vars = Vars {
            downstream_remote: remote,
            downstream_local: local,
            upstream: None,
            protocol,
        };

        let action = match &route.action {
            Action::Direct { status, body } => {
                self.stats.rq_direct_response.inc();
                let grpc = super::headers::request_is_grpc(&req);
                let mut resp = if body.is_empty() || grpc {
                    // Envoy sends direct responses with sendLocalReply: gRPC-converted.
                    let text = if grpc {
                        std::str::from_utf8(body).unwrap_or("")
                    } else {
                        ""
                    };
                    retry::local_reply_for(*status, text, grpc)
                } else {
                    let mut r = Response::new(full(body.clone()));
                    *r.status_mut() = *status;
                    r.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        HeaderValue::from_static("text/plain"),
                    );
                    r
                };
                apply_response_ops(&route, None, &mut resp, &vars);
                return resp;
            }
            Action::Redirect(rd) => {
                self.stats.rq_redirect.inc();
                let host = authority(&req).to_string();
                let pq = req
                    .uri()
                    .path_and_query()
                    .map(|p| p.as_str())
                    .unwrap_or("/")
                    .to_string();
                let location = rd.location(&route, "http", &host, &pq);
                let grpc = super::headers::request_is_grpc(&req);
                let mut resp = retry::local_reply_for(rd.status, "", grpc);
                if let Ok(v) = HeaderValue::from_str(&location) {
                    resp.headers_mut().insert(http::header::LOCATION, v);
                }
                apply_response_ops(&route, None, &mut resp, &vars);
                return resp;
            }
            Action::Route(a) => a,
        };

        let cm = self.clusters.load_full();
        // Resolve the cluster while the picked name still borrows the request: no per-request
        // copy of the name.
        let picked = action
            .pick_cluster(req.headers())
            .and_then(|(c, ops)| cm.get(c).map(|cluster| (cluster, ops.cloned())));
        let Some((cluster, weighted_ops)) = picked else {
            self.stats.no_cluster.inc();
            let grpc = super::headers::request_is_grpc(&req);
            return retry::local_reply_for(action.not_found_status, "", grpc);
        };
        let query = req.uri().query();
        let mut set_cookie = None;
        let hash = if action.hash_policy.is_empty() {
            None
        } else {
            action.hash(req.headers(), query, remote, local, &mut set_cookie)
        };
        // ORIGINAL_DST clusters: the host is the connection's original destination (or header).
        let dst = cluster.http_destination(req.headers(), local);
        let Some(host) = cluster.pick_for(hash, dst) else {
            cluster.stats.upstream_cx_none_healthy.inc();
            let grpc = super::headers::request_is_grpc(&req);
            return retry::local_reply_for(
                StatusCode::SERVICE_UNAVAILABLE,
                "no healthy upstream",
                grpc,
            );
        };
        vars.upstream = Some(host.addr);

        // An HTTP/2 request carries its authority in the URI only (a path rewrite below drops
        // it): the upstream gets it as Host unless a host rewrite says otherwise.
        let uri_host = if req.headers().contains_key(http::header::HOST) {
            None
        } else {
            req.uri()
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        };
        // Path and host rewrites.
        if action.prefix_rewrite.is_some() || action.regex_rewrite.is_some() {
            let pq = req
                .uri()
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/");
            if let Some(new_pq) = route.rewrite_path(pq, action) {
                if let Ok(uri) = http::Uri::builder().path_and_query(new_pq).build() {
                    *req.uri_mut() = uri;
                }
            }
        }
        let new_host = match &action.host_rewrite {
            HostRewrite::None => None,
            HostRewrite::Literal(v) => Some(v.clone()),
            HostRewrite::Auto => (!host.hostname.is_empty())
                .then(|| HeaderValue::from_str(&host.hostname).ok())
                .flatten(),
            HostRewrite::Header(h) => req.headers().get(h).cloned(),
        };
        let new_host = new_host.or(uri_host);
        let headers = req.headers_mut();
        if let Some(h) = new_host {
            headers.insert(http::header::HOST, h);
        }
        if let Some(ops) = &weighted_ops {
            ops.apply_request(headers, &vars);
        }
        for level in &route.header_levels {
            level.apply_request(headers, &vars);
        }
        let plan = retry::Plan::new(&action.resilience, action.timeout, headers);
        if let (Some(t), false) = (plan.expected_timeout(), self.suppress_envoy_headers) {
            headers.insert(
                EXPECTED_TIMEOUT.clone(),
                number_header(t.as_millis() as u64),
            );
        }

        let downstream_upgrade = if req.headers().contains_key(http::header::UPGRADE) {
            Some(hyper::upgrade::on(&mut req))
        } else {
            None
        };
        let start = crate::clock::now_std();
        // Attempts, retries and timeouts live in retry.rs; Err is the local reply to send.
        let upgrade = downstream_upgrade.is_some();
        let mut resp = match retry::forward(plan, cluster, host, hash, req, upgrade).await {
            Ok(r) => r,
            Err(local) => return local,
        };
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(down) = downstream_upgrade {
                let up = hyper::upgrade::on(&mut resp);
                spawn_tunnel(down, up, self.stats.downstream_cx_upgrades_active.clone());
            }
            strip_hop_by_hop(resp.headers_mut(), true);
        } else {
            strip_hop_by_hop(resp.headers_mut(), false);
        }
        if !self.suppress_envoy_headers {
            resp.headers_mut().insert(
                UPSTREAM_SERVICE_TIME.clone(),
                number_header(
                    crate::clock::now_std()
                        .saturating_duration_since(start)
                        .as_millis() as u64,
                ),
            );
        }
        if let Some(c) = set_cookie {
            resp.headers_mut().append(http::header::SET_COOKIE, c);
        }
        apply_response_ops(&route, weighted_ops.as_deref(), &mut resp, &vars);
        resp
    }
}

fn apply_response_ops(
    route: &RouteEntry,
    weighted: Option<&crate::route::headers::HeaderOps>,
    resp: &mut Response<Body>,
    vars: &Vars<'_>,
) {
    if let Some(ops) = weighted {
        ops.apply_response(resp.headers_mut(), vars);
    }
    for level in &route.header_levels {
        level.apply_response(resp.headers_mut(), vars);
    }
}
