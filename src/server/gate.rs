//! The gate every gRPC request passes before tonic's routes: the body limit
//! (`ingest.message_bytes_max`, see `limit`) and, when `ingest.auth` is on, authentication —
//! a request without a principal's bearer token (or its connection's client certificate) is
//! answered UNAUTHENTICATED here and reaches no service. Every request that passes carries its
//! [`Caller`] in its extensions; each RPC then checks the scope it needs (`auth::check`) and
//! refuses with [`forbidden`].
//!
//! Threads: every core; one gate per connection, on the core that accepted it.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::{Either, Ready};
use hyper::body::Incoming;
use tonic::service::Routes;
use tower::Service;

use super::limit::{limit_request, LimitedBody};
use super::status::status;
use crate::auth::{authenticate, Caller, Denied, Principal, Principals};
use crate::telemetry::metric;
use crate::wire::proto::ErrorCode;

/// What the gate of one connection knows.
#[derive(Clone)]
pub struct Gate {
    routes: Routes,
    message_bytes_max: usize,
    /// `ingest.auth`'s principals; `None`: every caller is [`Caller::Anyone`].
    principals: Option<Arc<Principals>>,
    /// The principal the connection's client certificate names, if any.
    certificate: Option<Arc<Principal>>,
}

impl Gate {
    /// The gate of one connection.
    pub fn new(
        routes: Routes,
        message_bytes_max: usize,
        principals: Option<Arc<Principals>>,
        certificate: Option<Arc<Principal>>,
    ) -> Gate {
        Gate {
            routes,
            message_bytes_max,
            principals,
            certificate,
        }
    }

    /// Who sends `request`, or why no one known does.
    fn caller(&self, request: &hyper::Request<Incoming>) -> Result<Caller, crate::auth::AuthFailure> {
        let Some(principals) = &self.principals else {
            return Ok(Caller::Anyone);
        };
        let header = request
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .map(|value| value.as_bytes());
        authenticate(principals, header, self.certificate.as_ref()).map(Caller::Principal)
    }
}

type Inner = hyper::Request<LimitedBody<Incoming>>;
type Answer = hyper::Response<tonic::body::Body>;

impl Service<hyper::Request<Incoming>> for Gate {
    type Response = Answer;
    type Error = Infallible;
    type Future = Either<Ready<Result<Answer, Infallible>>, <Routes as Service<Inner>>::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        <Routes as Service<Inner>>::poll_ready(&mut self.routes, cx)
    }

    fn call(&mut self, request: hyper::Request<Incoming>) -> Self::Future {
        let caller = match self.caller(&request) {
            Ok(caller) => caller,
            Err(failure) => {
                metrics::counter!(metric::AUTH_FAILURES, "reason" => failure.label()).increment(1);
                tracing::debug!(path = %request.uri().path(), reason = failure.label(), "call refused: not authenticated");
                let refusal = status(ErrorCode::Unauthenticated, failure.to_string());
                return Either::Left(futures::future::ready(Ok(refusal.into_http())));
            }
        };
        let mut request = limit_request(request, self.message_bytes_max);
        request.extensions_mut().insert(caller);
        Either::Right(self.routes.call(request))
    }
}

/// The status of a call its caller may not make (PERMISSION_DENIED, code FORBIDDEN), counted.
pub fn forbidden(denied: Denied) -> tonic::Status {
    status(ErrorCode::Forbidden, refused(denied))
}

/// The reason of a refusal for want of a scope, counted; for a stream's batch error.
pub fn refused(denied: Denied) -> String {
    metrics::counter!(metric::AUTH_FAILURES, "reason" => "forbidden").increment(1);
    denied.to_string()
}
