//! The authorization rows of `grpc-api.md` on every gRPC service: missing and invalid tokens
//! (UNAUTHENTICATED), another account and read-only tokens writing (PERMISSION_DENIED), the
//! auth backend down with nothing cached (UNAVAILABLE), and the allowed calls going through.
//! The decision is the one HTTP gets (same authorizer and cache); only the mapping differs.

use crate::common;

use common::control_plane::{ControlPlane, Mode};
use common::grpc::{Grpc, blob_name, sha256, upload_name, write_messages};
use common::{Node, static_auth_node};
use kura::grpc::proto::bytestream::QueryWriteStatusRequest;
use kura::grpc::proto::reapi::{
    ActionResult, FindMissingBlobsRequest, GetActionResultRequest, GetCapabilitiesRequest,
    GetTreeRequest, UpdateActionResultRequest,
};
use tonic::Code;

const WRITER: &str = "tok-grpc-writer-1";
const READER: &str = "tok-grpc-reader-2";
const GLOBEX: &str = "tok-grpc-globex-3";

/// One call of every method; `Write` for the ones that need a write grant.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Call {
    Capabilities,
    FindMissing,
    BatchRead,
    BatchUpdate,
    GetTree,
    GetActionResult,
    UpdateActionResult,
    Read,
    Write,
    QueryWriteStatus,
}

const CALLS: [Call; 10] = [
    Call::Capabilities,
    Call::FindMissing,
    Call::BatchRead,
    Call::BatchUpdate,
    Call::GetTree,
    Call::GetActionResult,
    Call::UpdateActionResult,
    Call::Read,
    Call::Write,
    Call::QueryWriteStatus,
];

impl Call {
    fn writes(self) -> bool {
        matches!(
            self,
            Call::BatchUpdate | Call::UpdateActionResult | Call::Write | Call::QueryWriteStatus
        )
    }

    /// The call's status code (`Ok` when it succeeded; NOT_FOUND means it got past auth).
    async fn code(self, grpc: &Grpc) -> Code {
        let blob = b"auth-row-blob".to_vec();
        let result = match self {
            Call::Capabilities => grpc
                .capabilities()
                .get_capabilities(grpc.request(GetCapabilitiesRequest {
                    instance_name: "ios".into(),
                }))
                .await
                .map(|_| ()),
            Call::FindMissing => grpc
                .cas()
                .find_missing_blobs(grpc.request(FindMissingBlobsRequest {
                    instance_name: "ios".into(),
                    blob_digests: vec![sha256(&blob)],
                    digest_function: 0,
                }))
                .await
                .map(|_| ()),
            Call::BatchRead => grpc
                .batch_read("ios", vec![sha256(&blob)], vec![])
                .await
                .map(|_| ()),
            Call::BatchUpdate => grpc
                .batch_update("ios", vec![(sha256(&blob), blob.clone(), 0)], 0)
                .await
                .map(|_| ()),
            Call::GetTree => {
                let request = GetTreeRequest {
                    instance_name: "ios".into(),
                    root_digest: Some(sha256(b"no tree")),
                    ..Default::default()
                };
                grpc.cas().get_tree(grpc.request(request)).await.map(|_| ())
            }
            Call::GetActionResult => grpc
                .action_cache()
                .get_action_result(grpc.request(GetActionResultRequest {
                    instance_name: "ios".into(),
                    action_digest: Some(sha256(b"no action")),
                    ..Default::default()
                }))
                .await
                .map(|_| ()),
            Call::UpdateActionResult => grpc
                .action_cache()
                .update_action_result(grpc.request(UpdateActionResultRequest {
                    instance_name: "ios".into(),
                    action_digest: Some(sha256(b"an action")),
                    action_result: Some(ActionResult::default()),
                    ..Default::default()
                }))
                .await
                .map(|_| ()),
            Call::Read => grpc
                .read(&blob_name("ios", &sha256(b"no blob")), 0, 0)
                .await
                .map(|_| ()),
            Call::Write => {
                let messages = write_messages(
                    &upload_name("ios", "auth", &sha256(&blob)),
                    &blob,
                    0,
                    4,
                    true,
                );
                grpc.send(messages).await.map(|_| ())
            }
            Call::QueryWriteStatus => grpc
                .bytestream()
                .query_write_status(grpc.request(QueryWriteStatusRequest {
                    resource_name: upload_name("ios", "never", &sha256(b"q")),
                }))
                .await
                .map(|_| ()),
        };
        match result {
            Ok(()) => Code::Ok,
            Err(status) => status.code(),
        }
    }
}

/// Got past authorization: succeeded, or failed for a reason that is not auth.
fn allowed(code: Code) -> bool {
    !matches!(
        code,
        Code::Unauthenticated | Code::PermissionDenied | Code::Unavailable
    )
}

fn static_node() -> (Node, tempfile::TempDir) {
    static_auth_node(&[
        (
            "writer",
            WRITER,
            r#"account = { read = [], write = ["acme"] }"#,
        ),
        (
            "reader",
            READER,
            r#"account = { read = ["acme"], write = [] }"#,
        ),
        (
            "globex",
            GLOBEX,
            r#"account = { read = ["globex"], write = ["globex"] }"#,
        ),
    ])
}

#[tokio::test]
async fn every_service_applies_the_decision_table() {
    let (node, _dir) = static_node();
    let anonymous = Grpc::connect(&node).await;
    for call in CALLS {
        assert_eq!(
            call.code(&anonymous).await,
            Code::Unauthenticated,
            "{call:?} without a token"
        );
        assert_eq!(
            call.code(&anonymous.token("nonsense")).await,
            Code::Unauthenticated,
            "{call:?} invalid"
        );
        let writer = anonymous.token(WRITER);
        assert!(allowed(call.code(&writer).await), "{call:?} writer");
        let other_account = writer.account("globex");
        assert_eq!(
            call.code(&other_account).await,
            Code::PermissionDenied,
            "{call:?} other account"
        );
        let globex = anonymous.token(GLOBEX);
        assert_eq!(
            call.code(&globex).await,
            Code::PermissionDenied,
            "{call:?} no grant here"
        );
        let reader = anonymous.token(READER);
        let expected_reader = if call.writes() {
            Some(Code::PermissionDenied)
        } else {
            None
        };
        let code = call.code(&reader).await;
        match expected_reader {
            Some(code_expected) => assert_eq!(code, code_expected, "{call:?} read-only writing"),
            None => assert!(allowed(code), "{call:?} reader: {code:?}"),
        }
    }
    // The account may also come as Tuist's metadata name, in any case.
    let mut request = tonic::Request::new(GetCapabilitiesRequest::default());
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {WRITER}").parse().unwrap());
    request
        .metadata_mut()
        .insert("x-tuist-account-handle", "ACME".parse().unwrap());
    assert!(
        anonymous
            .capabilities()
            .get_capabilities(request)
            .await
            .is_ok()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_is_down_means_unavailable_on_every_service() {
    let plane = ControlPlane::start().await;
    plane.answer(
        WRITER,
        serde_json::json!({"active": true, "sub": "u", "exp": 4_000_000_000u64, "cache_grants": {"account": {"write": ["acme"]}}}),
    );
    let node = Node::start_with(plane.node_options());
    plane.set_mode(Mode::Fail);
    let grpc = Grpc::connect(&node).await.token(WRITER);
    for call in CALLS {
        // One backend call per token per second after a failure: wait out the back-off so
        // each call really asks (and finds the backend down).
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        assert_eq!(call.code(&grpc).await, Code::Unavailable, "{call:?}");
    }
    plane.set_mode(Mode::Normal);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert!(allowed(Call::FindMissing.code(&grpc).await));
}
