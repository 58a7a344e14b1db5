//! The gRPC front end of authorization: a call's metadata and instance name become an
//! [`AccessRequest`], decided by the same [`Authorizer`](crate::auth::Authorizer) (and decision
//! cache) as HTTP; a refusal becomes its status code (`status::of_decision`).

use tonic::metadata::MetadataMap;
use tonic::{Extensions, Status};

use super::proto::reapi;
use super::resource::project_of_instance;
use super::status;
use crate::auth::{AccessRequest, Action, Decision};
use crate::context::NodeContext;
use crate::layers::RequestId;

/// Metadata naming the account; the second is the name Tuist's clients send.
const ACCOUNT_METADATA: [&str; 2] = ["x-kura-account", "x-tuist-account-handle"];

/// What a call carries that authorization reads: its metadata and the request id the shared
/// layer assigned.
pub(crate) struct CallInfo<'a> {
    pub metadata: &'a MetadataMap,
    pub extensions: &'a Extensions,
}

impl<'a> CallInfo<'a> {
    pub(crate) fn of<T>(request: &'a tonic::Request<T>) -> Self {
        CallInfo {
            metadata: request.metadata(),
            extensions: request.extensions(),
        }
    }
}

/// A request that names an instance (the project it addresses).
pub(crate) trait NamesInstance {
    fn instance_name(&self) -> &str;
}

macro_rules! names_instance {
    ($($message:ty),*) => {
        $(impl NamesInstance for $message {
            fn instance_name(&self) -> &str {
                &self.instance_name
            }
        })*
    };
}

names_instance!(
    reapi::GetCapabilitiesRequest,
    reapi::FindMissingBlobsRequest,
    reapi::BatchUpdateBlobsRequest,
    reapi::BatchReadBlobsRequest,
    reapi::GetTreeRequest,
    reapi::GetActionResultRequest,
    reapi::UpdateActionResultRequest
);

/// The start of every call that names an instance: its project, the call authorized for
/// `action` there, and the message.
pub(crate) async fn admit<T: NamesInstance>(
    node: &NodeContext,
    request: tonic::Request<T>,
    action: Action,
) -> Result<(String, T), Status> {
    let project = project_of_instance(request.get_ref().instance_name())?;
    authorize(node, &CallInfo::of(&request), &project, action).await?;
    Ok((project, request.into_inner()))
}

/// Decides whether the call may perform `action` on `project`; `Ok` carries nothing, a
/// refusal is the status to answer.
pub(crate) async fn authorize(
    node: &NodeContext,
    call: &CallInfo<'_>,
    project: &str,
    action: Action,
) -> Result<(), Status> {
    let decision = decide(node, call, project, action).await;
    match status::of_decision(&decision) {
        None => Ok(()),
        Some(refusal) => Err(refusal),
    }
}

/// The decision for a call, as a plain value (the two-front-ends test compares it with HTTP's).
pub(crate) async fn decide(
    node: &NodeContext,
    call: &CallInfo<'_>,
    project: &str,
    action: Action,
) -> Decision {
    let account = ACCOUNT_METADATA
        .iter()
        .find_map(|name| call.metadata.get(*name))
        .map(|value| value.to_str().map(str::to_ascii_lowercase));
    let account = match account {
        None => node.account.clone(),
        Some(Ok(account)) => account,
        // Not ASCII: it cannot name this node's account.
        Some(Err(_)) => return Decision::WrongAccount,
    };
    let authorization = match call.metadata.get("authorization").map(|v| v.to_str()) {
        None => None,
        Some(Ok(value)) => Some(value),
        Some(Err(_)) => return Decision::InvalidToken,
    };
    let request_id = call.extensions.get::<RequestId>().map(|id| &*id.0);
    let request = AccessRequest {
        account: &account,
        project: Some(project),
        action,
        authorization,
        request_id,
    };
    node.auth.decide(&node.account, &request).await
}
