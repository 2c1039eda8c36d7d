//! An API server double for the answers no API server here can be made to give:
//! - a review that authenticates a token for another audience than the one asked for: a
//!   webhook token authenticator need not honour audiences, and the API server passes its
//!   answer on; the CA's own audience check must refuse it;
//! - a review without the node-name extra (API servers before 1.30), for which the CA reads
//!   the node of the pod the token is bound to;
//! - no API server at all, which is an error to report, not a refusal to cache.
//!
//! Like an API server, the double answers with each token's own audiences, never with the
//! ones the request asked for.

use std::{convert::Infallible, net::SocketAddr};

use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, body::Bytes, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use super::*;

const AGENT: &str = "system:serviceaccount:nodemesh-system:nodemesh-agent";

/// What the double knows of a token: (audiences, extra); every token is the agent's.
fn token(token: &str) -> Option<(&'static [&'static str], Value)> {
    match token {
        "agent" => Some((
            &["nodemesh"],
            json!({EXTRA_NODE_NAME: ["node1"], EXTRA_POD_NAME: ["agent-a"]}),
        )),
        "agent-for-another-audience" => Some((
            &["https://kubernetes.default.svc"],
            json!({EXTRA_NODE_NAME: ["node1"], EXTRA_POD_NAME: ["agent-a"]}),
        )),
        "agent-without-node-extra" => Some((&["nodemesh"], json!({EXTRA_POD_NAME: ["agent-b"]}))),
        _ => None,
    }
}

async fn answer(request: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let path = request.uri().path().to_owned();
    let body = request
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let (status, value) = match path.as_str() {
        "/apis/authentication.k8s.io/v1/tokenreviews" => {
            let review: TokenReview = serde_json::from_slice(&body).expect("a TokenReview");
            let status = match token(&review.spec.token) {
                Some((audiences, extra)) => json!({
                    "authenticated": true,
                    "audiences": audiences,
                    "user": {"username": AGENT, "extra": extra},
                }),
                None => json!({"authenticated": false, "error": "invalid bearer token"}),
            };
            (
                201,
                json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                       "metadata": {}, "spec": review.spec, "status": status}),
            )
        }
        "/api/v1/namespaces/nodemesh-system/pods/agent-b" => (
            200,
            json!({"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": "agent-b", "namespace": "nodemesh-system"},
                   "spec": {"nodeName": "node2", "containers": [{"name": "agent", "image": "x"}]}}),
        ),
        _ => (
            404,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                   "reason": "NotFound", "code": 404, "message": "not found"}),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())));
    *response.status_mut() = hyper::StatusCode::from_u16(status).expect("a status");
    response
}

async fn double() -> kube::Client {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(
                TokioIo::new(stream),
                service_fn(|r| async { Ok::<_, Infallible>(answer(r).await) }),
            ));
        }
    });
    client_for(&url)
}

fn client_for(url: &str) -> kube::Client {
    kube::Client::try_from(kube::Config::new(url.parse().expect("url"))).expect("client")
}

fn reviewer(client: kube::Client) -> TokenReviewer {
    TokenReviewer::new(client, "nodemesh", "nodemesh-system/nodemesh-agent")
}

const FROM: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));

#[tokio::test]
async fn a_token_authenticated_for_another_audience_is_refused() {
    let reviewer = reviewer(double().await);
    assert_eq!(reviewer.node_of("agent", FROM).await.unwrap(), "node1");
    let refused = refusal(reviewer.node_of("agent-for-another-audience", FROM).await);
    assert_eq!(
        refused,
        "token rejected by the API server: the token is for [\"https://kubernetes.default.svc\"], not for the \"nodemesh\" audience"
    );
}

#[tokio::test]
async fn without_the_node_name_extra_the_bound_pods_node_is_used() {
    let reviewer = reviewer(double().await);
    assert_eq!(
        reviewer
            .node_of("agent-without-node-extra", FROM)
            .await
            .unwrap(),
        "node2"
    );
}

#[tokio::test]
async fn an_unreachable_api_server_is_an_error_not_a_cached_refusal() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr: SocketAddr = listener.local_addr().expect("address");
    drop(listener);
    let reviewer = reviewer(client_for(&format!("http://{addr}")));
    for _ in 0..2 {
        assert!(matches!(
            reviewer.node_of("agent", FROM).await,
            Err(ReviewError::Api(_))
        ));
    }
    assert!(reviewer.cached(&digest("agent")).is_none());
}
