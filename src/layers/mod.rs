//! Cross-cutting request handling as `tower` layers, generic over the request and response
//! bodies, so every listener stacks the same ones: the public HTTP router and the gRPC server
//! today, the peer listener next. Each concern is one layer, readable and testable alone:
//!
//! - [`RequestIdLayer`]: keeps a sane client `x-request-id` or makes one, and echoes it;
//! - [`ObserveLayer`]: counts and times every request in bounded metric series by its HTTP
//!   status, and logs it (gRPC, whose outcome is in its trailers, observes its calls with
//!   `grpc::layers::CallMetricsLayer` instead);
//! - [`AdmissionLayer`]: refuses new work while draining and sheds it past the in-flight limit,
//!   each protocol answering in its own form ([`Refusals`]); admitted work counts as in flight
//!   until its response body is done.
//!
//! Authorization is not a layer: it needs the account and project a route names, so each
//! protocol's front end builds an [`AccessRequest`](crate::auth::AccessRequest) and asks
//! [`Authorizer::decide`](crate::auth::Authorizer::decide).
//!
//! The futures are hand-written (`pin-project-lite`), so a layer costs no allocation per
//! request.

mod admission;
mod guarded;
mod observe;
mod request_id;

pub(crate) use admission::{AdmissionLayer, Refusals};
pub(crate) use guarded::{BodyGuard, GuardedBody, GuardedFuture};
pub(crate) use observe::labels as observe_labels;
pub(crate) use observe::{ObserveLayer, RouteOf};
pub(crate) use request_id::{RequestId, RequestIdLayer, fresh as fresh_request_id};
