//! `GetTree`: the directories under a root, breadth-first, each once, streamed page by page.
//!
//! One call streams every page (REAPI clients read the stream to its end); each page carries
//! the token that resumes the walk at the next one, for a client whose call broke off. A token
//! is the position of its page's first directory in the walk, so a resumed call walks the tree
//! again from its root up to there, keeping nothing it skips. The walk reads one directory at
//! a time and holds at most one page and the directory that did not fit it: a page stops at
//! `page_size` directories or before it would outgrow one message.

use std::collections::{HashSet, VecDeque};
use std::pin::Pin;
use std::sync::Arc;

use futures_util::{Stream, StreamExt, stream};
use prost::Message;
use tonic::Status;

use super::blobs::read_blob;
use super::digest::BlobDigest;
use super::proto::reapi::{Directory, GetTreeResponse};
use crate::context::NodeContext;

pub(super) type TreeStream = Pin<Box<dyn Stream<Item = Result<GetTreeResponse, Status>> + Send>>;

/// Where the walk of one tree is.
pub(super) struct TreeWalk {
    node: Arc<NodeContext>,
    project: String,
    seen: HashSet<BlobDigest>,
    queue: VecDeque<BlobDigest>,
    /// Directories handed out so far (sent, or skipped for a token).
    position: usize,
    /// Read, and left for the next page because the last one was full.
    held: Option<Directory>,
    page_size: usize,
    message_limit: usize,
}

impl TreeWalk {
    pub(super) fn new(
        node: Arc<NodeContext>,
        project: String,
        root: BlobDigest,
        page_size: usize,
        message_limit: usize,
    ) -> TreeWalk {
        TreeWalk {
            node,
            project,
            seen: HashSet::new(),
            queue: VecDeque::from([root]),
            position: 0,
            held: None,
            page_size,
            message_limit,
        }
    }

    /// Walks past the first `count` directories (a page token), keeping none of them.
    pub(super) async fn skip(&mut self, count: usize) -> Result<(), Status> {
        while self.position < count && self.next_directory().await?.is_some() {
            self.position += 1;
        }
        Ok(())
    }

    /// The next page, or `None` once the walk is over. Its token is empty on the last page.
    pub(super) async fn next_page(&mut self) -> Result<Option<GetTreeResponse>, Status> {
        let mut directories = Vec::new();
        let mut bytes = 0;
        while let Some(directory) = self.next_directory().await? {
            // What the directory adds to the response message: its bytes and their framing.
            // A page always takes its first directory.
            let length = directory.encoded_len() + 8;
            let full = directories.len() >= self.page_size
                || (!directories.is_empty() && bytes + length > self.message_limit);
            if full {
                self.held = Some(directory);
                break;
            }
            bytes += length;
            directories.push(directory);
        }
        if directories.is_empty() {
            return Ok(None);
        }
        self.position += directories.len();
        // The token is the client's to send back: a huge one must not wrap.
        let next_page_token = match self.held {
            Some(_) => self.position.to_string(),
            None => String::new(),
        };
        Ok(Some(GetTreeResponse {
            directories,
            next_page_token,
        }))
    }

    /// The walk's next directory in breadth-first order. Directories missing from the store,
    /// or not `Directory` messages, are left out with what is below them.
    async fn next_directory(&mut self) -> Result<Option<Directory>, Status> {
        if let Some(directory) = self.held.take() {
            return Ok(Some(directory));
        }
        while let Some(digest) = self.queue.pop_front() {
            if !self.seen.insert(digest.clone()) {
                continue;
            }
            let limit = self.message_limit as u64;
            let Some(blob) = read_blob(&self.node, &self.project, &digest, limit).await? else {
                continue;
            };
            let Ok(directory) = Directory::decode(blob) else {
                continue;
            };
            for child in &directory.directories {
                if let Ok(child) =
                    BlobDigest::from_proto(digest.function, child.digest.as_ref(), "digest")
                {
                    self.queue.push_back(child);
                }
            }
            return Ok(Some(directory));
        }
        Ok(None)
    }
}

/// `first`, then the walk's pages until its last (or an error, which ends the stream); `held`
/// (a memory lease) lives as long as the stream.
pub(super) fn pages<H: Send + 'static>(
    first: GetTreeResponse,
    walk: TreeWalk,
    held: H,
) -> TreeStream {
    let more = !first.next_page_token.is_empty();
    let rest = stream::unfold(more.then_some(walk), |walk| async move {
        let mut walk = walk?;
        match walk.next_page().await {
            Ok(Some(page)) => {
                let more = !page.next_page_token.is_empty();
                Some((Ok(page), more.then_some(walk)))
            }
            Ok(None) => None,
            Err(status) => Some((Err(status), None)),
        }
    });
    let all = stream::once(async { Ok(first) }).chain(rest);
    Box::pin(all.map(move |page| {
        let _held = &held;
        page
    }))
}
