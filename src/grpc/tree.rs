//! `GetTree`: the directories under a root, breadth-first, each once, streamed page by page.
//!
//! One call streams every page (REAPI clients read the stream to its end); each page carries
//! the token that resumes the walk at the next one, for a client whose call broke off. A token
//! is the position of its page's first directory in the walk, so a resumed call walks the tree
//! again from its root up to there, keeping nothing it skips. The walk reads one directory at
//! a time and holds at most one page and the directory that did not fit it: a page stops at
//! `page_size` directories or before it would outgrow one message.
//!
//! The walk itself ([`DirectoryWalk`]) also serves the action cache, which checks that every
//! directory below an output directory's root is stored before it serves a result.

use std::collections::{HashSet, VecDeque};
use std::pin::Pin;
use std::sync::Arc;

use futures_util::{Stream, StreamExt, stream};
use prost::Message;
use tonic::Status;

use super::blobs::{lease_memory, read_blob};
use super::digest::BlobDigest;
use super::proto::reapi::{Directory, GetTreeResponse};
use crate::context::NodeContext;

pub(super) type TreeStream = Pin<Box<dyn Stream<Item = Result<GetTreeResponse, Status>> + Send>>;

/// Where the walk of one tree is.
pub(super) struct TreeWalk {
    directories: DirectoryWalk,
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
            directories: DirectoryWalk::new(node, project, root, message_limit as u64),
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
        while let Some(step) = self.directories.next().await? {
            if let Walked::Read(directory) = step {
                return Ok(Some(directory));
            }
        }
        Ok(None)
    }
}

/// What one step of a [`DirectoryWalk`] found.
pub(super) enum Walked {
    /// A directory, read and decoded; its children are next in line.
    Read(Directory),
    /// A directory the walk could not read: not stored, over the walk's size limit, not a
    /// `Directory` message, or named by a malformed digest. Nothing below it is walked.
    Unreadable,
}

/// The directories under a root, breadth-first, each read once however often it is named:
/// what both GetTree and the output check of an action result walk. It queues each directory
/// once (however many parents name it).
pub(super) struct DirectoryWalk {
    node: Arc<NodeContext>,
    project: String,
    /// The largest directory read, in bytes (a larger one is [`Walked::Unreadable`]).
    limit: u64,
    /// Whether each read takes a lease of the body-memory budget: a caller that leased for
    /// what the walk reads (GetTree's page lease) must not, or with a small budget it would
    /// wait on its own lease.
    leases_reads: bool,
    /// Every directory queued so far.
    seen: HashSet<BlobDigest>,
    /// Directories to read, in order; `None` for a child named by a malformed digest.
    queue: VecDeque<Option<BlobDigest>>,
}

impl DirectoryWalk {
    pub(super) fn new(
        node: Arc<NodeContext>,
        project: String,
        root: BlobDigest,
        limit: u64,
    ) -> DirectoryWalk {
        DirectoryWalk {
            node,
            project,
            limit,
            leases_reads: false,
            seen: HashSet::from([root.clone()]),
            queue: VecDeque::from([Some(root)]),
        }
    }

    /// The walk, each read under a lease of the body-memory budget for its size.
    pub(super) fn leasing_reads(self) -> DirectoryWalk {
        DirectoryWalk {
            leases_reads: true,
            ..self
        }
    }

    /// The next directory in breadth-first order, or `None` once the walk is over.
    pub(super) async fn next(&mut self) -> Result<Option<Walked>, Status> {
        let Some(digest) = self.queue.pop_front() else {
            return Ok(None);
        };
        let Some(digest) = digest else {
            return Ok(Some(Walked::Unreadable));
        };
        let directory = {
            let _lease = match self.leases_reads {
                true => Some(lease_memory(&self.node, digest.size.min(self.limit)).await?),
                false => None,
            };
            let blob = read_blob(&self.node, &self.project, &digest, self.limit).await?;
            match blob.map(Directory::decode) {
                Some(Ok(directory)) => directory,
                _ => return Ok(Some(Walked::Unreadable)),
            }
        };
        for child in &directory.directories {
            match BlobDigest::from_proto(digest.function, child.digest.as_ref(), "digest") {
                Ok(child) if self.seen.insert(child.clone()) => self.queue.push_back(Some(child)),
                Ok(_) => {}
                Err(_) => self.queue.push_back(None),
            }
        }
        Ok(Some(Walked::Read(directory)))
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
