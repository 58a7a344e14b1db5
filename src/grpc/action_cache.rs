//! `ActionCache`: action results keyed by action digest, stored in the same `ac` kind as the
//! Bazel HTTP `/ac/` routes.
//!
//! A stored value is served only if it is an `ActionResult` whose outputs are all still
//! stored: its files, and for each output directory its tree and the files the tree lists, or
//! (REAPI's newer directory-only form) every `Directory` below its root and their files.
//! Eviction may have taken a blob the result names, and a result whose outputs are gone
//! would fail the client's build, so it is a miss. Values written over HTTP that are not
//! action results (ccache stores its own bytes under `/ac/`) are misses too. Serving a result
//! refreshes the access time of every blob it names, so they are not the next evicted.

use std::sync::Arc;

use prost::Message;
use tonic::{Request, Response, Status};

use super::access::admit;
use super::blobs::{lease_memory, read_blob, read_whole, store_value};
use super::digest::{BlobDigest, HashFunction};
use super::proto::reapi::action_cache_server::ActionCache;
use super::proto::reapi::{
    ActionResult, Digest, Directory, GetActionResultRequest, Tree, UpdateActionResultRequest,
};
use super::status::of_store_error;
use super::tree::{DirectoryWalk, Walked};
use crate::auth::Action;
use crate::context::NodeContext;
use crate::storage::KeyBatch;

/// The most directories a served result's output directories may hold below their roots
/// together, in the directory-only form: each hit walks them all, so a result naming more is a
/// miss.
const MAX_WALKED_DIRECTORIES: usize = 100_000;

pub(crate) struct ActionCacheService {
    pub node: Arc<NodeContext>,
}

#[tonic::async_trait]
impl ActionCache for ActionCacheService {
    async fn get_action_result(
        &self,
        request: Request<GetActionResultRequest>,
    ) -> Result<Response<ActionResult>, Status> {
        let (project, request) = admit(&self.node, request, Action::Read).await?;
        let function = HashFunction::from_field(request.digest_function)?;
        let action =
            BlobDigest::from_proto(function, request.action_digest.as_ref(), "action_digest")?;
        let max = self.node.config.grpc.max_message_size.0;
        let miss = || Status::not_found("no action result for this action");
        let value = read_whole(&self.node, &action.action_key(&project), None, max)
            .await?
            .ok_or_else(miss)?;
        let Ok(mut result) = ActionResult::decode(value) else {
            return Err(Status::not_found(
                "the value stored for this action is not an ActionResult",
            ));
        };
        let outputs = outputs_of(&self.node, &project, function, &result).await?;
        if !all_present(&self.node, &project, outputs).await? {
            return Err(Status::not_found(
                "an output of this action result is no longer stored",
            ));
        }
        // Inlined bytes travel in the same message as the result: never more than the room it
        // leaves under the message limit (a large result with inlining asked for failed whole).
        let room =
            (self.node.config.grpc.max_message_size.0).saturating_sub(result.encoded_len() as u64);
        let budget = self.node.config.grpc.inline_max.0.min(room);
        inline(
            &self.node,
            &project,
            function,
            &request,
            &mut result,
            budget,
        )
        .await?;
        Ok(Response::new(result))
    }

    async fn update_action_result(
        &self,
        request: Request<UpdateActionResultRequest>,
    ) -> Result<Response<ActionResult>, Status> {
        let (project, request) = admit(&self.node, request, Action::Write).await?;
        let function = HashFunction::from_field(request.digest_function)?;
        let action =
            BlobDigest::from_proto(function, request.action_digest.as_ref(), "action_digest")?;
        let result = request
            .action_result
            .ok_or_else(|| Status::invalid_argument("action_result is missing"))?;
        check_result(function, &result)?;
        store_value(
            &self.node,
            &action.action_key(&project),
            &result.encode_to_vec(),
        )
        .await?;
        Ok(Response::new(result))
    }
}

/// Every digest an action result names, each checked. An output directory names its tree,
/// its root `Directory` (REAPI's newer directory-only form), or both.
fn named_digests(function: HashFunction, result: &ActionResult) -> Result<Vec<BlobDigest>, Status> {
    if let Some(directory) = result
        .output_directories
        .iter()
        .find(|d| d.tree_digest.is_none() && d.root_directory_digest.is_none())
    {
        return Err(Status::invalid_argument(format!(
            "output directory {:?} names neither a tree_digest nor a root_directory_digest",
            directory.path
        )));
    }
    let files = result
        .output_files
        .iter()
        .map(|f| (f.digest.as_ref(), "output_files.digest"));
    let directories = result.output_directories.iter().flat_map(|d| {
        [
            (d.tree_digest.as_ref(), "output_directories.tree_digest"),
            (
                d.root_directory_digest.as_ref(),
                "output_directories.root_directory_digest",
            ),
        ]
    });
    let logs = [
        (result.stdout_digest.as_ref(), "stdout_digest"),
        (result.stderr_digest.as_ref(), "stderr_digest"),
    ];
    files
        .chain(
            directories
                .chain(logs)
                .filter(|(digest, _)| digest.is_some()),
        )
        .map(|(digest, what)| BlobDigest::from_proto(function, digest, what))
        .collect()
}

/// A result the node may store: every digest in it well-formed.
fn check_result(function: HashFunction, result: &ActionResult) -> Result<(), Status> {
    named_digests(function, result).map(|_| ())
}

/// The blobs a served result depends on: the ones it names, and the files inside its output
/// directories (listed by their trees, or found by walking down from their root directories).
/// `None` when the result cannot be served: a tree or directory under it is not stored or not
/// what it should be, or a digest in it is malformed.
async fn outputs_of(
    node: &Arc<NodeContext>,
    project: &str,
    function: HashFunction,
    result: &ActionResult,
) -> Result<Option<Vec<BlobDigest>>, Status> {
    let Ok(mut outputs) = named_digests(function, result) else {
        // Stored by another front end with a malformed digest: not a result to serve.
        return Ok(None);
    };
    let mut walked = 0;
    for directory in &result.output_directories {
        if let Some(tree_digest) = directory.tree_digest.as_ref()
            && !tree_files(node, project, function, tree_digest, &mut outputs).await?
        {
            return Ok(None);
        }
        // A client that asked for directories fetches each `Directory` below the root itself:
        // all of them must be stored, whether or not a tree lists the same files.
        if let Some(root) = directory.root_directory_digest.as_ref()
            && !directory_files(node, project, function, root, &mut outputs, &mut walked).await?
        {
            return Ok(None);
        }
    }
    Ok(Some(outputs))
}

/// Adds the files listed by the `Tree` under `tree_digest` to `outputs`; false if the tree is
/// not stored or not a well-formed `Tree`.
async fn tree_files(
    node: &NodeContext,
    project: &str,
    function: HashFunction,
    tree_digest: &Digest,
    outputs: &mut Vec<BlobDigest>,
) -> Result<bool, Status> {
    let Ok(tree_digest) = BlobDigest::from_proto(function, Some(tree_digest), "tree_digest") else {
        return Ok(false);
    };
    let max_tree = node.config.limits.blob.0;
    // A tree is read whole (up to limits.blob): under a lease of the body-memory budget
    // like any transfer, so that hits on results with large trees wait their turn instead
    // of each holding their tree at once. A tree over the whole budget takes all of it.
    let _lease = lease_memory(node, tree_digest.size.min(max_tree)).await?;
    let Some(bytes) = read_blob(node, project, &tree_digest, max_tree).await? else {
        return Ok(false);
    };
    let Ok(tree) = Tree::decode(bytes) else {
        return Ok(false);
    };
    Ok(tree
        .root
        .iter()
        .chain(&tree.children)
        .all(|directory| add_files(function, directory, outputs)))
}

/// Adds the files of every directory under `root` to `outputs`, walking down from it and
/// counting what it reads in `walked`; false if a directory below it cannot be read (the client
/// could not fetch it either), or the count passes [`MAX_WALKED_DIRECTORIES`].
async fn directory_files(
    node: &Arc<NodeContext>,
    project: &str,
    function: HashFunction,
    root: &Digest,
    outputs: &mut Vec<BlobDigest>,
    walked: &mut usize,
) -> Result<bool, Status> {
    let Ok(root) = BlobDigest::from_proto(function, Some(root), "root_directory_digest") else {
        return Ok(false);
    };
    // Each directory at most one message long, as GetTree reads them.
    let limit = node.config.grpc.max_message_size.0;
    let mut walk =
        DirectoryWalk::new(node.clone(), project.to_string(), root, limit).leasing_reads();
    while let Some(step) = walk.next().await? {
        let Walked::Read(directory) = step else {
            return Ok(false);
        };
        *walked += 1;
        if *walked > MAX_WALKED_DIRECTORIES || !add_files(function, &directory, outputs) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Adds the digests of `directory`'s files to `outputs`; false if one is malformed.
fn add_files(function: HashFunction, directory: &Directory, outputs: &mut Vec<BlobDigest>) -> bool {
    for file in &directory.files {
        match BlobDigest::from_proto(function, file.digest.as_ref(), "digest") {
            Ok(digest) => outputs.push(digest),
            Err(_) => return false,
        }
    }
    true
}

/// Whether every output is stored with its size (refreshing their access times).
async fn all_present(
    node: &NodeContext,
    project: &str,
    outputs: Option<Vec<BlobDigest>>,
) -> Result<bool, Status> {
    let Some(outputs) = outputs else {
        return Ok(false);
    };
    let mut keys = KeyBatch::with_capacity(outputs.len());
    let mut sizes = Vec::with_capacity(outputs.len());
    for digest in outputs.iter().filter(|digest| !digest.is_empty_blob()) {
        keys.push(project, digest.function.cas_kind(), &digest.hash);
        sizes.push(digest.size);
    }
    let stored = node
        .store
        .stored_sizes(keys)
        .await
        .map_err(of_store_error)?;
    Ok(stored
        .iter()
        .zip(&sizes)
        .all(|(stored, size)| *stored == Some(*size)))
}

/// Inlines what the request asks for, within `budget` bytes together.
async fn inline(
    node: &NodeContext,
    project: &str,
    function: HashFunction,
    request: &GetActionResultRequest,
    result: &mut ActionResult,
    mut budget: u64,
) -> Result<(), Status> {
    // Each inlined field also costs its tag and length.
    const FIELD_OVERHEAD: u64 = 16;
    let mut take = |size: u64| {
        let cost = size.saturating_add(FIELD_OVERHEAD);
        let fits = cost <= budget;
        if fits {
            budget -= cost;
        }
        fits
    };
    if request.inline_stdout
        && result.stdout_raw.is_empty()
        && let Some(digest) = checked(function, result.stdout_digest.as_ref())
        && take(digest.size)
        && let Some(bytes) = read_blob(node, project, &digest, digest.size).await?
    {
        result.stdout_raw = bytes;
    }
    if request.inline_stderr
        && result.stderr_raw.is_empty()
        && let Some(digest) = checked(function, result.stderr_digest.as_ref())
        && take(digest.size)
        && let Some(bytes) = read_blob(node, project, &digest, digest.size).await?
    {
        result.stderr_raw = bytes;
    }
    for file in &mut result.output_files {
        if file.contents.is_empty()
            && request.inline_output_files.contains(&file.path)
            && let Some(digest) = checked(function, file.digest.as_ref())
            && take(digest.size)
            && let Some(bytes) = read_blob(node, project, &digest, digest.size).await?
        {
            file.contents = bytes;
        }
    }
    Ok(())
}

fn checked(function: HashFunction, digest: Option<&Digest>) -> Option<BlobDigest> {
    digest.and_then(|digest| BlobDigest::from_proto(function, Some(digest), "digest").ok())
}
