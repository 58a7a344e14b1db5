//! REAPI v2 over gRPC against the real node: one test per row of `grpc-api.md` (capabilities,
//! CAS, action cache, ByteStream with resume, health, drain), the HTTP/gRPC blob sharing, and
//! crash safety of concurrent ByteStream writes.

use crate::common;

use std::time::Duration;

use common::grpc::{Grpc, blake3, blob_name, sha256, upload_name, write_messages};
use common::{Node, NodeOptions, client, payload};
use kura::grpc::proto::reapi::{
    ActionResult, Digest, Directory, DirectoryNode, FileNode, GetActionResultRequest,
    GetCapabilitiesRequest, GetTreeRequest, OutputDirectory, OutputFile, Tree,
    UpdateActionResultRequest,
};
use prost::Message;
use tonic::Code;

const SHA256: i32 = 1;
const BLAKE3: i32 = 9;
const ZSTD: i32 = 1;

fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::bulk::compress(data, 3).unwrap()
}

#[tokio::test]
async fn capabilities_advertise_both_digest_functions_zstd_and_an_honest_batch_limit() {
    let node = Node::start();
    let grpc = Grpc::connect(&node).await;
    let request = grpc.request(GetCapabilitiesRequest::default());
    let answer = grpc
        .capabilities()
        .get_capabilities(request)
        .await
        .unwrap()
        .into_inner();
    let cache = answer.cache_capabilities.expect("cache capabilities");
    assert_eq!(cache.digest_functions, vec![SHA256, BLAKE3]);
    assert!(
        cache
            .action_cache_update_capabilities
            .unwrap()
            .update_enabled
    );
    assert_eq!(
        cache.max_batch_total_size_bytes,
        4 * 1024 * 1024 - 64 * 1024
    );
    assert_eq!(cache.supported_compressors, vec![ZSTD]);
    assert_eq!(cache.supported_batch_update_compressors, vec![ZSTD]);
    assert_eq!(cache.symlink_absolute_path_strategy, 2, "ALLOWED");
    let low = answer.low_api_version.unwrap();
    let high = answer.high_api_version.unwrap();
    assert_eq!((low.major, low.minor, high.major, high.minor), (2, 0, 2, 3));
}

#[tokio::test]
async fn find_missing_blobs_reports_only_what_is_not_stored_and_never_the_empty_blob() {
    let node = Node::start();
    let grpc = Grpc::connect(&node).await;
    let stored = payload(1, 5000);
    let absent = payload(2, 5000);
    assert_eq!(
        grpc.write(&upload_name("ios", "u1", &sha256(&stored)), &stored)
            .await
            .unwrap(),
        5000
    );
    let wrong_size = Digest {
        size_bytes: 4999,
        ..sha256(&stored)
    };
    let asked = vec![
        sha256(&stored),
        sha256(&absent),
        sha256(b""),
        wrong_size.clone(),
    ];
    let missing = grpc.missing("ios", asked, SHA256).await.unwrap();
    assert_eq!(missing, vec![sha256(&absent), wrong_size]);
    // Another project does not see it.
    let elsewhere = grpc
        .missing("android", vec![sha256(&stored)], SHA256)
        .await
        .unwrap();
    assert_eq!(elsewhere.len(), 1);
    // A malformed digest refuses the call.
    let bad = Digest {
        hash: "XYZ".into(),
        size_bytes: 1,
    };
    let status = grpc.missing("ios", vec![bad], SHA256).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn batches_store_and_read_plain_and_zstd_and_refuse_mismatches_per_item() {
    let node = Node::start();
    let grpc = Grpc::connect(&node).await;
    let plain = payload(3, 4096);
    let squeezable = vec![b'a'; 100_000];
    let mismatched = payload(4, 100);
    let zstd_mismatched = payload(5, 2000);
    let codes = grpc
        .batch_update(
            "ios",
            vec![
                (sha256(&plain), plain.clone(), 0),
                (sha256(&squeezable), zstd(&squeezable), ZSTD),
                (sha256(&payload(6, 100)), mismatched.clone(), 0),
                (sha256(&payload(7, 2000)), zstd(&zstd_mismatched), ZSTD),
                (sha256(&plain), plain[..10].to_vec(), 0),
            ],
            SHA256,
        )
        .await
        .unwrap();
    assert_eq!(
        codes,
        vec![
            Code::Ok,
            Code::Ok,
            Code::InvalidArgument,
            Code::InvalidArgument,
            Code::InvalidArgument
        ]
    );
    // Nothing of the refused items was stored, under either digest.
    let missing = grpc
        .missing(
            "ios",
            vec![
                sha256(&payload(6, 100)),
                sha256(&mismatched),
                sha256(&payload(7, 2000)),
            ],
            SHA256,
        )
        .await
        .unwrap();
    assert_eq!(missing.len(), 3);

    let absent = sha256(b"not stored");
    let read = grpc
        .batch_read(
            "ios",
            vec![sha256(&plain), sha256(&squeezable), absent, sha256(b"")],
            vec![ZSTD],
        )
        .await
        .unwrap();
    assert_eq!(read[0].0, Code::Ok);
    assert_eq!(read[0].1, plain, "random bytes do not shrink: sent plain");
    assert_eq!(read[0].2, 0);
    assert_eq!(read[1].0, Code::Ok);
    assert_eq!(read[1].2, ZSTD, "compressible and accepted: zstd");
    assert_eq!(
        zstd::bulk::decompress(&read[1].1, 200_000).unwrap(),
        squeezable
    );
    assert_eq!(read[2].0, Code::NotFound);
    assert_eq!(
        (read[3].0, read[3].1.len()),
        (Code::Ok, 0),
        "the empty blob"
    );
    let unaccepted = grpc
        .batch_read("ios", vec![sha256(&squeezable)], vec![])
        .await
        .unwrap();
    assert_eq!((unaccepted[0].1.clone(), unaccepted[0].2), (squeezable, 0));
}

#[tokio::test]
async fn a_batch_over_the_advertised_limit_is_refused_whole() {
    let node = Node::start_with(
        NodeOptions::default()
            .env("KURA_GRPC_MAX_BATCH_TOTAL_SIZE", "64KiB")
            .env("KURA_GRPC_INLINE_MAX", "64KiB"),
    );
    let grpc = Grpc::connect(&node).await;
    let a = payload(8, 40_000);
    let b = payload(9, 40_000);
    let status = grpc
        .batch_update(
            "ios",
            vec![(sha256(&a), a.clone(), 0), (sha256(&b), b.clone(), 0)],
            SHA256,
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("max_batch_total_size_bytes"),
        "{}",
        status.message()
    );
    // A small zstd item that claims a large size counts at its size.
    let zeros = vec![0u8; 100_000];
    let status = grpc
        .batch_update("ios", vec![(sha256(&zeros), zstd(&zeros), ZSTD)], SHA256)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = grpc
        .batch_read("ios", vec![sha256(&a), sha256(&b)], vec![])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        grpc.missing("ios", vec![sha256(&a), sha256(&b)], SHA256)
            .await
            .unwrap()
            .len(),
        2
    );
}

#[tokio::test]
async fn bytestream_reads_ranges_and_refuses_offsets_past_the_end() {
    let node = Node::start();
    let grpc = Grpc::connect(&node).await;
    // Larger than the inline size and than one read chunk: a file body, several messages.
    let data = payload(10, 3 * 1024 * 1024 + 17);
    let digest = sha256(&data);
    assert_eq!(
        grpc.write(&upload_name("ios", "big", &digest), &data)
            .await
            .unwrap(),
        data.len() as i64
    );
    let name = blob_name("ios", &digest);
    assert_eq!(grpc.read(&name, 0, 0).await.unwrap(), data);
    assert_eq!(
        grpc.read(&name, 1000, 5000).await.unwrap(),
        &data[1000..6000]
    );
    assert_eq!(
        grpc.read(&name, data.len() as i64, 0).await.unwrap(),
        Vec::<u8>::new()
    );
    let past = grpc
        .read(&name, data.len() as i64 + 1, 0)
        .await
        .unwrap_err();
    assert_eq!(past.code(), Code::OutOfRange);
    let negative = grpc.read(&name, -1, 0).await.unwrap_err();
    assert_eq!(negative.code(), Code::OutOfRange);
    let missing = grpc
        .read(&blob_name("ios", &sha256(b"nope")), 0, 0)
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    assert_eq!(
        grpc.read(&blob_name("ios", &sha256(b"")), 0, 0)
            .await
            .unwrap(),
        Vec::<u8>::new()
    );
    let bad = grpc.read("ios/blobs/xyz/3", 0, 0).await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
}

/// A node with the smallest gRPC message limit it accepts (64 KiB), batches up to
/// `max_batch_total` and 32 KiB inlined.
fn node_with_64k_messages(max_batch_total: &str) -> Node {
    Node::start_with(
        NodeOptions::default()
            .env("KURA_GRPC_MAX_MESSAGE_SIZE", "64KiB")
            .env("KURA_GRPC_MAX_BATCH_TOTAL_SIZE", max_batch_total)
            .env("KURA_GRPC_INLINE_MAX", "32KiB"),
    )
}

/// The node reads file bodies in chunks of up to 1 MiB; with the smallest message limit a node
/// accepts, each chunk must go out as several messages within it, or the client refuses them.
#[tokio::test]
async fn bytestream_reads_stay_within_the_smallest_message_limit() {
    let node = node_with_64k_messages("32KiB");
    let grpc = Grpc::connect(&node).await;
    let data = payload(13, 3 * 1024 * 1024 + 5);
    let digest = sha256(&data);
    let messages = write_messages(
        &upload_name("ios", "small", &digest),
        &data,
        0,
        32 * 1024,
        true,
    );
    assert_eq!(grpc.send(messages).await.unwrap(), data.len() as i64);
    let name = blob_name("ios", &digest);
    let limit = 64 * 1024;
    let whole = grpc.read_messages_of_at_most(&name, 0, 0, limit).await;
    assert_eq!(whole.unwrap(), data);
    let range = grpc
        .read_messages_of_at_most(&name, 70_000, 200_000, limit)
        .await;
    assert_eq!(range.unwrap(), &data[70_000..270_000]);
}

#[tokio::test]
async fn bytestream_writes_verify_size_digest_and_offsets_and_store_nothing_wrong() {
    let node = Node::start();
    let grpc = Grpc::connect(&node).await;
    let data = payload(11, 300_000);
    let other = payload(12, 300_000);
    // Digest mismatch: right size, wrong bytes.
    let status = grpc
        .write(&upload_name("ios", "m1", &sha256(&data)), &other)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    // Too few bytes before finish_write, and too many.
    let status = grpc
        .write(&upload_name("ios", "m2", &sha256(&data)), &data[..1000])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let mut longer = data.clone();
    longer.push(0);
    let status = grpc
        .write(&upload_name("ios", "m3", &sha256(&data)), &longer)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    // A write_offset that is not the bytes received so far.
    let mut messages = write_messages(
        &upload_name("ios", "m4", &sha256(&data)),
        &data,
        0,
        65536,
        true,
    );
    messages[2].write_offset += 1;
    let status = grpc.send(messages).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    // The resource name may not change mid-stream.
    let mut messages = write_messages(
        &upload_name("ios", "m5", &sha256(&data)),
        &data,
        0,
        65536,
        true,
    );
    messages[1].resource_name = upload_name("ios", "m6", &sha256(&data));
    let status = grpc.send(messages).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        grpc.missing("ios", vec![sha256(&data), sha256(&other)], SHA256)
            .await
            .unwrap()
            .len(),
        2
    );

    // zstd: a mismatch is refused; the right bytes are stored, and read back compressed.
    let compressed_name = |d: &Digest, u: &str| {
        format!(
            "ios/uploads/{u}/compressed-blobs/zstd/{}/{}",
            d.hash, d.size_bytes
        )
    };
    let status = grpc
        .write(&compressed_name(&sha256(&data), "z1"), &zstd(&other))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        grpc.missing("ios", vec![sha256(&data)], SHA256)
            .await
            .unwrap()
            .len(),
        1
    );
    let sent = zstd(&data);
    // An interrupted zstd upload kept nothing (it is decoded as it arrives): it is queried at 0
    // and starts over under the same name.
    let interrupted = compressed_name(&sha256(&data), "z2");
    let status = grpc
        .write_from(&interrupted, &sent[..sent.len() / 2], 0, 16_384, false)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let status = grpc.query(&interrupted).await.unwrap();
    assert_eq!((status.committed_size, status.complete), (0, false));
    let committed = grpc.write(&interrupted, &sent).await.unwrap();
    assert_eq!(committed, sent.len() as i64);
    let compressed_read = format!(
        "ios/compressed-blobs/zstd/{}/{}",
        sha256(&data).hash,
        data.len()
    );
    let read = grpc.read(&compressed_read, 0, 0).await.unwrap();
    assert_eq!(zstd::stream::decode_all(&read[..]).unwrap(), data);
    // A compressed read's offset counts uncompressed bytes: a resumed download gets a frame of
    // the rest. A limit cannot apply to compressed bytes, so REAPI has it refused.
    let rest = grpc.read(&compressed_read, 100_000, 0).await.unwrap();
    assert_eq!(
        zstd::stream::decode_all(&rest[..]).unwrap(),
        data[100_000..]
    );
    let status = grpc.read(&compressed_read, 0, 10).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let past = data.len() as i64 + 1;
    let status = grpc.read(&compressed_read, past, 0).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange);
    assert_eq!(
        grpc.read(&blob_name("ios", &sha256(&data)), 0, 0)
            .await
            .unwrap(),
        data
    );

    // An existing blob ends the upload early: the size, or -1 for a compressed name.
    let messages = write_messages(
        &upload_name("ios", "again", &sha256(&data)),
        &data,
        0,
        65536,
        false,
    );
    let early = grpc.send(messages[..1].to_vec()).await.unwrap();
    assert_eq!(early, data.len() as i64);
    assert_eq!(
        grpc.write(&compressed_name(&sha256(&data), "z3"), &sent)
            .await
            .unwrap(),
        -1
    );
}

#[tokio::test]
async fn blake3_is_used_when_asked_and_never_inferred_from_a_hash_length() {
    let node = Node::start();
    let grpc = Grpc::connect(&node).await;
    let data = payload(13, 70_000);
    let name = format!(
        "ios/uploads/b1/blobs/blake3/{}/{}",
        blake3(&data).hash,
        data.len()
    );
    assert_eq!(grpc.write(&name, &data).await.unwrap(), data.len() as i64);
    assert!(
        grpc.missing("ios", vec![blake3(&data)], BLAKE3)
            .await
            .unwrap()
            .is_empty()
    );
    // The same 64-hex hash without the digest function is a SHA-256 digest: not stored.
    assert_eq!(
        grpc.missing("ios", vec![blake3(&data)], 0)
            .await
            .unwrap()
            .len(),
        1
    );
    let plain_name = blob_name("ios", &blake3(&data));
    assert_eq!(
        grpc.read(&plain_name, 0, 0).await.unwrap_err().code(),
        Code::NotFound
    );
    let b3_name = format!("ios/blobs/blake3/{}/{}", blake3(&data).hash, data.len());
    assert_eq!(grpc.read(&b3_name, 0, 0).await.unwrap(), data);
    // A BLAKE3 upload whose bytes do not match is refused.
    // (Another blob's digest: an upload of a stored blob ends early, whatever it sends.)
    let wrong = format!(
        "ios/uploads/b2/blobs/blake3/{}/{}",
        blake3(&payload(20, 70_000)).hash,
        data.len()
    );
    let status = grpc.write(&wrong, &payload(14, 70_000)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let codes = grpc
        .batch_update(
            "ios",
            vec![
                (blake3(b"small"), b"small".to_vec(), 0),
                (blake3(b"x"), b"y".to_vec(), 0),
            ],
            BLAKE3,
        )
        .await
        .unwrap();
    assert_eq!(codes, vec![Code::Ok, Code::InvalidArgument]);
    let unsupported = grpc
        .missing("ios", vec![sha256(b"a")], 2)
        .await
        .unwrap_err();
    assert_eq!(
        unsupported.code(),
        Code::InvalidArgument,
        "SHA1 is not offered"
    );
}

#[tokio::test]
async fn an_interrupted_upload_resumes_at_the_committed_offset_also_after_a_restart() {
    let mut node = Node::start();
    let grpc = Grpc::connect(&node).await;
    let data = payload(15, 1_000_000);
    let digest = sha256(&data);
    let name = upload_name("ios", "resume-1", &digest);
    assert_eq!(grpc.query(&name).await.unwrap_err().code(), Code::NotFound);
    // The first 400,000 bytes arrive, then the stream ends without finish_write.
    let status = grpc
        .write_from(&name, &data[..400_000], 0, 100_000, false)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Cancelled, "{status:?}");
    let status = grpc.query(&name).await.unwrap();
    assert_eq!((status.committed_size, status.complete), (400_000, false));

    // kill -9 with the next 200,000 bytes committed, then a restart.
    let ahead = grpc
        .write_from(&name, &data[..600_000], 400_000, 100_000, false)
        .await;
    assert!(ahead.is_err());
    node.kill9();
    node.restart();
    let grpc = Grpc::connect(&node).await;
    let status = grpc.query(&name).await.unwrap();
    assert_eq!(status.committed_size, 600_000, "survives kill -9");
    // Resuming anywhere else is refused; at the committed offset it completes.
    let wrong = grpc
        .write_from(&name, &data, 500_000, 100_000, true)
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::InvalidArgument);
    let committed = grpc
        .write_from(&name, &data, 600_000, 100_000, true)
        .await
        .unwrap();
    assert_eq!(committed, data.len() as i64);
    assert_eq!(
        grpc.read(&blob_name("ios", &digest), 0, 0).await.unwrap(),
        data
    );
    let status = grpc.query(&name).await.unwrap();
    assert_eq!((status.committed_size, status.complete), (1_000_000, true));
}

#[tokio::test]
async fn a_query_publishes_an_upload_that_holds_every_byte_but_missed_finish_write() {
    let node = Node::start();
    let grpc = Grpc::connect(&node).await;
    let data = payload(16, 300_000);
    let digest = sha256(&data);
    let name = upload_name("ios", "whole-1", &digest);
    // Every byte arrives, then the stream ends before finish_write. A client resuming at the
    // size would have nothing left to send: the query publishes the blob, verified.
    let status = grpc
        .write_from(&name, &data, 0, 100_000, false)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Cancelled, "{status:?}");
    let status = grpc.query(&name).await.unwrap();
    assert_eq!((status.committed_size, status.complete), (300_000, true));
    assert_eq!(
        grpc.read(&blob_name("ios", &digest), 0, 0).await.unwrap(),
        data
    );

    // The same with bytes that do not match the digest: discarded, to be sent again from 0.
    let other = payload(17, 300_000);
    let wrong = upload_name("ios", "whole-2", &sha256(&other));
    grpc.write_from(&wrong, &data, 0, 100_000, false)
        .await
        .unwrap_err();
    let status = grpc.query(&wrong).await.unwrap();
    assert_eq!((status.committed_size, status.complete), (0, false));
    assert_eq!(
        grpc.missing("ios", vec![sha256(&other)], SHA256)
            .await
            .unwrap()
            .len(),
        1,
        "nothing unverified is stored"
    );
    let committed = grpc
        .write_from(&wrong, &other, 0, 100_000, true)
        .await
        .unwrap();
    assert_eq!(committed, other.len() as i64);
}

fn action_result(outputs: &[(&str, &[u8])], stdout: &[u8]) -> ActionResult {
    ActionResult {
        output_files: outputs
            .iter()
            .map(|(path, data)| OutputFile {
                path: path.to_string(),
                digest: Some(sha256(data)),
                is_executable: false,
                ..Default::default()
            })
            .collect(),
        exit_code: 0,
        stdout_digest: Some(sha256(stdout)),
        ..Default::default()
    }
}

/// Inlined outputs travel in the result's own message: a large result with inlining asked
/// for is served with what fits, not failed whole for going over the message limit.
#[tokio::test]
async fn inlining_never_pushes_an_action_result_over_the_message_limit() {
    let node = node_with_64k_messages("48KiB");
    let grpc = Grpc::connect(&node).await;
    let output = payload(17, 20_000);
    grpc.batch_update("ios", vec![(sha256(&output), output.clone(), 0)], SHA256)
        .await
        .unwrap();
    let action = sha256(b"action-large-result");
    let result = ActionResult {
        stderr_raw: payload(18, 50_000).into(),
        ..action_result(&[("out/a.o", &output)], b"")
    };
    grpc.update_action_result("ios", action.clone(), result.clone())
        .await
        .unwrap();
    let get = GetActionResultRequest {
        instance_name: "ios".into(),
        action_digest: Some(action),
        inline_output_files: vec!["out/a.o".into()],
        ..Default::default()
    };
    let served = grpc
        .action_cache()
        .get_action_result(grpc.request(get))
        .await
        .expect("served without the output that does not fit")
        .into_inner();
    assert_eq!(served.stderr_raw, result.stderr_raw);
    assert!(served.output_files[0].contents.is_empty());
}

#[tokio::test]
async fn action_results_round_trip_inline_on_request_and_miss_without_outputs() {
    let node = Node::start();
    let grpc = Grpc::connect(&node).await;
    let output = payload(16, 10_000);
    let stdout = b"compiling...\n".to_vec();
    grpc.batch_update(
        "ios",
        vec![
            (sha256(&output), output.clone(), 0),
            (sha256(&stdout), stdout.clone(), 0),
        ],
        SHA256,
    )
    .await
    .unwrap();
    let action = sha256(b"action-1");
    let result = action_result(&[("out/a.o", &output)], &stdout);
    let stored = grpc
        .update_action_result("ios", action.clone(), result.clone())
        .await
        .unwrap();
    assert_eq!(stored, result);
    let get = |inline: bool| GetActionResultRequest {
        instance_name: "ios".into(),
        action_digest: Some(action.clone()),
        inline_stdout: inline,
        inline_output_files: if inline {
            vec!["out/a.o".into()]
        } else {
            vec![]
        },
        ..Default::default()
    };
    let plain = grpc
        .action_cache()
        .get_action_result(grpc.request(get(false)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(plain, result);
    let inlined = grpc
        .action_cache()
        .get_action_result(grpc.request(get(true)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(inlined.stdout_raw, stdout);
    assert_eq!(inlined.output_files[0].contents, output);

    // A result naming a blob that is not stored is a miss, never a broken hit.
    let orphan_action = sha256(b"action-2");
    let orphan = action_result(&[("out/b.o", b"never uploaded")], b"");
    grpc.update_action_result("ios", orphan_action.clone(), orphan)
        .await
        .unwrap();
    let miss = grpc
        .get_action_result("ios", orphan_action)
        .await
        .unwrap_err();
    assert_eq!(miss.code(), Code::NotFound);
    // Malformed updates are refused.
    let bad = UpdateActionResultRequest {
        instance_name: "ios".into(),
        action_digest: Some(sha256(b"action-3")),
        action_result: Some(ActionResult {
            output_files: vec![OutputFile {
                path: "x".into(),
                digest: Some(Digest {
                    hash: "nothex".into(),
                    size_bytes: 1,
                }),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    let status = grpc
        .action_cache()
        .update_action_result(grpc.request(bad))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

/// Room for about three 400 KB blobs: every new one evicts the least recently used, and every
/// access counts (no access-time resolution).
fn small_capacity_node() -> Node {
    Node::start_with(
        NodeOptions::default()
            .env("KURA_STORAGE_CAPACITY", "1300KB")
            .env("KURA_STORAGE_ACCESS_TIME_RESOLUTION", "0s"),
    )
}

#[tokio::test]
async fn an_action_result_whose_output_was_evicted_is_not_found() {
    let node = small_capacity_node();
    let grpc = Grpc::connect(&node).await;
    let output = payload(17, 400_000);
    grpc.write(&upload_name("ios", "o", &sha256(&output)), &output)
        .await
        .unwrap();
    let action = sha256(b"action-evicted");
    grpc.update_action_result(
        "ios",
        action.clone(),
        action_result(&[("out/big", &output)], b""),
    )
    .await
    .unwrap();
    let ac_url = node.url(&format!("/bazel/dev/ios/ac/{}", action.hash));
    for seed in 0..6 {
        let filler = payload(100 + seed, 400_000);
        grpc.write(
            &upload_name("ios", &format!("f{seed}"), &sha256(&filler)),
            &filler,
        )
        .await
        .unwrap();
        // Keep the action result itself the most recently used.
        assert_eq!(client().get(&ac_url).send().await.unwrap().status(), 200);
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    assert_eq!(
        grpc.missing("ios", vec![sha256(&output)], SHA256)
            .await
            .unwrap()
            .len(),
        1,
        "evicted"
    );
    assert_eq!(
        client().get(&ac_url).send().await.unwrap().status(),
        200,
        "the result itself is kept"
    );
    let status = grpc.get_action_result("ios", action).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
}

/// A directory holding the given files (by content) and child directories (by encoded bytes).
fn directory(files: &[(&str, &[u8])], children: &[(&str, &[u8])]) -> Directory {
    Directory {
        files: files
            .iter()
            .map(|(name, data)| FileNode {
                name: name.to_string(),
                digest: Some(sha256(data)),
                ..Default::default()
            })
            .collect(),
        directories: children
            .iter()
            .map(|(name, bytes)| DirectoryNode {
                name: name.to_string(),
                digest: Some(sha256(bytes)),
            })
            .collect(),
        ..Default::default()
    }
}

/// An output directory is served in either of REAPI's forms (a `Tree`, or the digest of its
/// root `Directory`, or both), and only while everything a client would fetch below it is
/// stored: a result whose tree, directories or files are gone is a miss, not a broken hit.
#[tokio::test]
async fn output_directories_are_hits_only_while_everything_below_them_is_stored() {
    let node = Node::start();
    let grpc = Grpc::connect(&node).await;
    let (top_file, leaf_file) = (b"top file".as_slice(), b"leaf file".as_slice());
    let leaf = directory(&[("b.txt", leaf_file)], &[]).encode_to_vec();
    let root = directory(&[("a.txt", top_file)], &[("leaf", &leaf)]).encode_to_vec();
    let tree = Tree {
        root: Some(Directory::decode(root.as_slice()).unwrap()),
        children: vec![Directory::decode(leaf.as_slice()).unwrap()],
    }
    .encode_to_vec();
    // The same shape again with a leaf that is never stored, and with a file that is not.
    let lost_leaf = directory(&[("c.txt", b"c")], &[]).encode_to_vec();
    let root_of_lost_leaf = directory(&[("a.txt", top_file)], &[("leaf", &lost_leaf)]);
    let root_of_lost_file = directory(&[("gone.txt", b"never uploaded")], &[]);
    let (root_of_lost_leaf, root_of_lost_file) = (
        root_of_lost_leaf.encode_to_vec(),
        root_of_lost_file.encode_to_vec(),
    );
    let tree_of_lost_file = Tree {
        root: Some(Directory::decode(root_of_lost_file.as_slice()).unwrap()),
        children: vec![],
    }
    .encode_to_vec();
    let stored: [&[u8]; 9] = [
        top_file,
        leaf_file,
        b"c",
        &leaf,
        &root,
        &tree,
        &root_of_lost_leaf,
        &root_of_lost_file,
        &tree_of_lost_file,
    ];
    grpc.put_blobs("ios", &stored).await;

    let mut actions = 0;
    let mut stored_then_read = async |tree: Option<Digest>, root: Option<Digest>| {
        actions += 1;
        let action = sha256(format!("action-with-directory-{actions}").as_bytes());
        let result = ActionResult {
            output_directories: vec![OutputDirectory {
                path: "out/dir".into(),
                tree_digest: tree,
                root_directory_digest: root,
                ..Default::default()
            }],
            ..Default::default()
        };
        grpc.update_action_result("ios", action.clone(), result.clone())
            .await?;
        let served = grpc.get_action_result("ios", action).await?;
        assert_eq!(served, result, "a hit serves the result as stored");
        Ok::<_, tonic::Status>(())
    };
    let d = |bytes: &[u8]| Some(sha256(bytes));
    let code = |outcome: Result<(), tonic::Status>| outcome.err().map(|status| status.code());

    assert_eq!(code(stored_then_read(d(&tree), None).await), None);
    assert_eq!(code(stored_then_read(None, d(&root)).await), None);
    assert_eq!(code(stored_then_read(d(&tree), d(&root)).await), None);
    let not_found = Some(Code::NotFound);
    assert_eq!(
        code(stored_then_read(None, d(&root_of_lost_leaf)).await),
        not_found,
        "a directory below the root is not stored"
    );
    assert_eq!(
        code(stored_then_read(d(&tree), d(&root_of_lost_leaf)).await),
        not_found,
        "a tree whose files are all stored does not vouch for the directories below the root"
    );
    assert_eq!(
        code(stored_then_read(None, d(&root_of_lost_file)).await),
        not_found,
        "a file in a directory is not stored"
    );
    assert_eq!(
        code(stored_then_read(d(&tree_of_lost_file), None).await),
        not_found,
        "a file the tree lists is not stored"
    );
    assert_eq!(
        code(stored_then_read(d(b"no such tree".as_slice()), None).await),
        not_found,
        "the tree is not stored"
    );
    assert_eq!(
        code(stored_then_read(None, None).await),
        Some(Code::InvalidArgument),
        "an output directory naming neither form is malformed"
    );
}

#[tokio::test]
async fn blobs_are_shared_between_the_bazel_http_routes_and_grpc_both_ways() {
    let node = Node::start();
    let grpc = Grpc::connect(&node).await;
    let over_http = payload(18, 50_000);
    let digest = sha256(&over_http);
    let url = node.url(&format!("/bazel/dev/ios/cas/{}", digest.hash));
    assert_eq!(
        client()
            .put(&url)
            .body(over_http.clone())
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert!(
        grpc.missing("ios", vec![digest.clone()], SHA256)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        grpc.read(&blob_name("ios", &digest), 0, 0).await.unwrap(),
        over_http
    );

    let over_grpc = payload(19, 2_000_000);
    let digest = sha256(&over_grpc);
    grpc.write(&upload_name("ios", "g", &digest), &over_grpc)
        .await
        .unwrap();
    let url = node.url(&format!("/bazel/dev/ios/cas/{}", digest.hash));
    let response = client().get(&url).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.bytes().await.unwrap(), over_grpc);

    // An opaque action-cache value written over HTTP (ccache's) is a miss over gRPC.
    let key = sha256(b"ccache-key");
    let ac_url = node.url(&format!("/bazel/dev/ios/ac/{}", key.hash));
    let opaque = b"cCrS\x00\x01opaque ccache entry".to_vec();
    assert_eq!(
        client()
            .put(&ac_url)
            .body(opaque)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let status = grpc.get_action_result("ios", key).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
}

/// GetTree leases a page's worth of the body-memory budget for its walk; with a budget of one
/// message that lease is the whole budget, and a walk that leased each read besides waited on
/// its own lease until the call failed RESOURCE_EXHAUSTED. (The action cache's walk, which
/// holds no page, leases each read.)
#[tokio::test]
async fn directory_walks_work_within_a_body_memory_budget_of_one_message() {
    let node = Node::start_with(
        NodeOptions::default()
            .env("KURA_LIMITS_BODY_MEMORY", "4MiB")
            .env("KURA_LIMITS_BODY_MEMORY_WAIT", "1s"),
    );
    let grpc = Grpc::connect(&node).await;
    let leaf = directory(&[("b.txt", b"b")], &[]).encode_to_vec();
    let root = directory(&[], &[("leaf", &leaf)]).encode_to_vec();
    grpc.put_blobs("ios", &[b"b", &leaf, &root]).await;
    let request = GetTreeRequest {
        instance_name: "ios".into(),
        root_digest: Some(sha256(&root)),
        ..Default::default()
    };
    let mut stream = grpc
        .cas()
        .get_tree(grpc.request(request))
        .await
        .unwrap()
        .into_inner();
    let mut walked = 0;
    while let Some(page) = stream.message().await.unwrap() {
        walked += page.directories.len();
    }
    assert_eq!(walked, 2);
    let result = ActionResult {
        output_directories: vec![OutputDirectory {
            path: "out".into(),
            root_directory_digest: Some(sha256(&root)),
            ..Default::default()
        }],
        ..Default::default()
    };
    let action = sha256(b"action-in-a-small-budget");
    grpc.update_action_result("ios", action.clone(), result.clone())
        .await
        .unwrap();
    assert_eq!(grpc.get_action_result("ios", action).await.unwrap(), result);
}

#[tokio::test]
async fn get_tree_streams_every_directory_in_pages_and_misses_a_missing_root() {
    let node = Node::start();
    let grpc = Grpc::connect(&node).await;
    let leaf = Directory {
        files: vec![FileNode {
            name: "a.txt".into(),
            digest: Some(sha256(b"a")),
            ..Default::default()
        }],
        ..Default::default()
    };
    let leaf_bytes = leaf.encode_to_vec();
    // A directory holding one child directory, by the child's encoded bytes.
    let parent_of = |name: &str, child: &[u8]| Directory {
        directories: vec![DirectoryNode {
            name: name.into(),
            digest: Some(sha256(child)),
        }],
        ..Default::default()
    };
    let middle = parent_of("leaf", &leaf_bytes);
    let middle_bytes = middle.encode_to_vec();
    let root = parent_of("middle", &middle_bytes);
    let root_bytes = root.encode_to_vec();
    grpc.put_blobs("ios", &[&root_bytes, &middle_bytes, &leaf_bytes])
        .await;
    let tree = |page_size: i32, page_token: String| GetTreeRequest {
        instance_name: "ios".into(),
        root_digest: Some(sha256(&root_bytes)),
        page_size,
        page_token,
        digest_function: 0,
    };
    let mut stream = grpc
        .cas()
        .get_tree(grpc.request(tree(0, String::new())))
        .await
        .unwrap()
        .into_inner();
    let mut all = Vec::new();
    while let Some(page) = stream.message().await.unwrap() {
        all.extend(page.directories);
    }
    assert_eq!(all, vec![root.clone(), middle.clone(), leaf.clone()]);
    // One call streams every page, read to its end as REAPI clients read it; each page carries
    // the token that resumes the walk after it, the last none.
    let mut stream = grpc
        .cas()
        .get_tree(grpc.request(tree(1, String::new())))
        .await
        .unwrap()
        .into_inner();
    let mut pages = Vec::new();
    while let Some(page) = stream.message().await.unwrap() {
        pages.push((page.directories, page.next_page_token));
    }
    assert_eq!(
        pages,
        vec![
            (vec![root.clone()], "1".to_string()),
            (vec![middle.clone()], "2".to_string()),
            (vec![leaf.clone()], String::new()),
        ]
    );

    let mut token = String::new();
    let mut paged = Vec::new();
    for _ in 0..5 {
        let mut stream = grpc
            .cas()
            .get_tree(grpc.request(tree(2, token.clone())))
            .await
            .unwrap()
            .into_inner();
        let mut next = String::new();
        while let Some(page) = stream.message().await.unwrap() {
            paged.extend(page.directories);
            next = page.next_page_token;
        }
        if next.is_empty() {
            break;
        }
        token = next;
    }
    assert_eq!(paged, vec![root, middle, leaf]);
    let missing = GetTreeRequest {
        root_digest: Some(sha256(b"no such directory")),
        ..tree(0, String::new())
    };
    let status = grpc
        .cas()
        .get_tree(grpc.request(missing))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
}

/// A GetTree page stops before it outgrows one message (4 MiB by default), whatever
/// `page_size` asks, since the node builds a page in memory; the pages of one call still hold
/// the whole tree. (A page held up to 10,000 directories of up to a message each.)
#[tokio::test]
async fn get_tree_pages_stop_at_one_message_and_together_hold_the_tree() {
    let node = Node::start();
    let grpc = Grpc::connect(&node).await;
    // Four directories of 1.5 MiB under one root: 6 MiB, past one message.
    let children: Vec<Directory> = (0..4)
        .map(|i| Directory {
            files: vec![FileNode {
                name: format!("{i}{}", "x".repeat(3 << 19)),
                digest: Some(sha256(b"a")),
                ..Default::default()
            }],
            ..Default::default()
        })
        .collect();
    let encoded: Vec<Vec<u8>> = children.iter().map(|d| d.encode_to_vec()).collect();
    let root = Directory {
        directories: encoded
            .iter()
            .enumerate()
            .map(|(i, bytes)| DirectoryNode {
                name: format!("d{i}"),
                digest: Some(sha256(bytes)),
            })
            .collect(),
        ..Default::default()
    };
    let root_bytes = root.encode_to_vec();
    for bytes in encoded.iter().chain([&root_bytes]) {
        let stored = grpc
            .batch_update("ios", vec![(sha256(bytes), bytes.clone(), 0)], SHA256)
            .await
            .unwrap();
        assert_eq!(stored, vec![Code::Ok]);
    }
    let request = |page_token: &str| GetTreeRequest {
        instance_name: "ios".into(),
        root_digest: Some(sha256(&root_bytes)),
        page_size: 0,
        page_token: page_token.to_string(),
        digest_function: 0,
    };
    let pages = |page_token: &'static str| {
        let grpc = &grpc;
        let request = request(page_token);
        async move {
            let mut stream = grpc
                .cas()
                .get_tree(grpc.request(request))
                .await
                .unwrap()
                .into_inner();
            let mut pages = Vec::new();
            while let Some(message) = stream.message().await.unwrap() {
                pages.push((message.directories, message.next_page_token));
            }
            pages
        }
    };
    // The root and two children fit one message; the other two come in the next.
    let all = pages("").await;
    let shape: Vec<(usize, &str)> = all.iter().map(|(d, t)| (d.len(), t.as_str())).collect();
    assert_eq!(shape, vec![(3, "3"), (2, "")]);
    let mut expected = vec![root];
    expected.extend(children);
    let directories: Vec<Directory> = all.into_iter().flat_map(|(d, _)| d).collect();
    assert_eq!(directories, expected);
    // A call resumed at the token gets the rest.
    let rest = pages("3").await;
    assert_eq!(rest, vec![(expected[3..].to_vec(), String::new())]);
}

#[tokio::test]
async fn health_follows_ready_and_a_draining_node_answers_unavailable() {
    use kura::grpc::proto::health::HealthCheckRequest;
    let node = Node::start();
    let grpc = Grpc::connect(&node).await;
    let check = || {
        grpc.request(HealthCheckRequest {
            service: String::new(),
        })
    };
    assert_eq!(
        grpc.health()
            .check(check())
            .await
            .unwrap()
            .into_inner()
            .status,
        1,
        "SERVING"
    );
    node.signal(libc::SIGUSR1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        client()
            .get(node.url("/ready"))
            .send()
            .await
            .unwrap()
            .status(),
        503
    );
    assert_eq!(
        grpc.health()
            .check(check())
            .await
            .unwrap()
            .into_inner()
            .status,
        2,
        "NOT_SERVING"
    );
    let grpc = Grpc::connect(&node).await;
    let status = grpc
        .missing("ios", vec![sha256(b"x")], SHA256)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
}

#[tokio::test]
async fn calls_are_counted_by_method_and_code_without_tokens_in_metrics() {
    let node = Node::start();
    let grpc = Grpc::connect(&node)
        .await
        .token("tok-secret-in-metadata-42");
    grpc.missing("ios", vec![sha256(b"x")], SHA256)
        .await
        .unwrap();
    let _ = grpc.read(&blob_name("ios", &sha256(b"nope")), 0, 0).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let metrics = node.metrics().await;
    let find = "kura_grpc_calls_total{method=\"/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs\",code=\"ok\"} 1";
    assert!(metrics.contains(find), "{metrics}");
    assert!(metrics.contains("code=\"not_found\""), "{metrics}");
    assert!(
        metrics.contains("kura_grpc_message_bytes_total"),
        "{metrics}"
    );
    assert!(!metrics.contains("tok-secret"));
    assert!(!node.logs().contains("tok-secret"));
}

/// kill -9 while 32 ByteStream writes run, several rounds: after each restart every write that
/// returned OK reads back whole and verified, and no blob reads back wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_32_concurrent_bytestream_writes_loses_no_acknowledged_blob() {
    let mut node = Node::start();
    let mut acknowledged: Vec<Vec<u8>> = Vec::new();
    let mut attempted: Vec<Vec<u8>> = Vec::new();
    for round in 0..3u64 {
        let grpc = Grpc::connect(&node).await;
        let writers: Vec<_> = (0..32u64)
            .map(|i| {
                let grpc = grpc.clone();
                // Sizes across the inline limit and several chunks.
                let data = payload(round * 1000 + i, 20_000 + (i as usize) * 40_000);
                tokio::spawn(async move {
                    let name = upload_name("ios", &format!("r{round}-{i}"), &sha256(&data));
                    let ok = grpc
                        .write_from(&name, &data, 0, 16 * 1024, true)
                        .await
                        .is_ok();
                    (data, ok)
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(150 + round * 100)).await;
        node.kill9();
        for writer in writers {
            let (data, ok) = writer.await.unwrap();
            if ok {
                acknowledged.push(data.clone());
            }
            attempted.push(data);
        }
        node.restart();
    }
    let grpc = Grpc::connect(&node).await;
    for data in &acknowledged {
        let read = grpc.read(&blob_name("ios", &sha256(data)), 0, 0).await;
        assert_eq!(
            read.as_deref().ok(),
            Some(&data[..]),
            "an acknowledged blob is intact"
        );
    }
    for data in &attempted {
        match grpc.read(&blob_name("ios", &sha256(data)), 0, 0).await {
            Ok(read) => assert_eq!(&read, data, "whatever is readable is the right bytes"),
            Err(status) => assert_eq!(status.code(), Code::NotFound),
        }
    }
    assert!(
        !acknowledged.is_empty(),
        "some writes finished before the kills"
    );
}

#[tokio::test]
async fn a_small_upload_is_received_in_memory_and_an_interrupted_one_restarts_at_zero() {
    let node = Node::start();
    let grpc = Grpc::connect(&node).await;
    // Within storage.inline_max (32 KiB): no staging file, so nothing to resume.
    let data = payload(21, 20_000);
    let name = upload_name("ios", "small-1", &sha256(&data));
    let status = grpc
        .write_from(&name, &data[..8_000], 0, 4_000, false)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    // Bazel queries before it retries, and its newer uploader fails on NOT_FOUND: an upload the node began
    // reports 0 bytes committed, so the retry starts over.
    let status = grpc.query(&name).await.unwrap();
    assert_eq!((status.committed_size, status.complete), (0, false));
    let never_begun = upload_name("ios", "small-never", &sha256(&data));
    assert_eq!(
        grpc.query(&never_begun).await.unwrap_err().code(),
        Code::NotFound
    );
    let resumed = grpc
        .write_from(&name, &data, 8_000, 4_000, true)
        .await
        .unwrap_err();
    assert_eq!(resumed.code(), Code::InvalidArgument, "not resumable");
    assert_eq!(
        grpc.write_from(&name, &data, 0, 4_000, true).await.unwrap(),
        data.len() as i64
    );
    assert_eq!(
        grpc.read(&blob_name("ios", &sha256(&data)), 0, 0)
            .await
            .unwrap(),
        data
    );
    // Small and wrong: refused, nothing stored.
    let other = payload(22, 20_000);
    let wrong = upload_name("ios", "small-2", &sha256(&other));
    let status = grpc.write(&wrong, &data).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        grpc.missing("ios", vec![sha256(&other)], SHA256)
            .await
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn find_missing_blobs_keeps_what_it_vouches_for_from_eviction() {
    let node = small_capacity_node();
    let grpc = Grpc::connect(&node).await;
    let vouched = payload(30, 400_000);
    let ignored = payload(31, 400_000);
    for (name, data) in [("v", &vouched), ("i", &ignored)] {
        grpc.write(&upload_name("ios", name, &sha256(data)), data)
            .await
            .unwrap();
    }
    for seed in 0..4 {
        // A build asks whether `vouched` is there before it relies on it.
        let missing = grpc
            .missing("ios", vec![sha256(&vouched)], SHA256)
            .await
            .unwrap();
        assert!(
            missing.is_empty(),
            "round {seed}: the vouched blob was evicted"
        );
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let filler = payload(200 + seed, 400_000);
        grpc.write(
            &upload_name("ios", &format!("f{seed}"), &sha256(&filler)),
            &filler,
        )
        .await
        .unwrap();
    }
    assert!(
        grpc.missing("ios", vec![sha256(&vouched)], SHA256)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        grpc.missing("ios", vec![sha256(&ignored)], SHA256)
            .await
            .unwrap()
            .len(),
        1,
        "the blob nobody asked for is the one evicted"
    );
}
